"""The GPU machine's script (benchmarks/gpu/ray_stage.sh), checked on a CPU: its dry run runs the
same commands, tiny -- `mscnn train` on Ray Train with MLflow to a file store, then the Ray stage
against the plain loop (benchmarks/system_overhead.py) -- and the ResNet part resolves its schedule."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu" / "ray_stage.sh"


def _run(part: str, out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DRY_RUN": "1", "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), part, str(out)], env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.ray
def test_the_gpu_script_runs_its_mnist_part_on_a_cpu(tmp_path):
    r = _run("mnist", tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "no GPU" in r.stdout  # the versions line: the dry run is on this CPU
    res = json.loads((tmp_path / "system_overhead.json").read_text())
    runs = res["runs"]
    assert set(runs) == {"Ray Train stage, worker reads", "plain PyTorch loop"}
    for rs in runs.values():
        assert len(rs) == 1 and rs[0]["loop"] > 0 and rs[0]["gpu_util"] is None
    with tarfile.open(tmp_path / "mlruns.tar.gz") as t:  # the schedule's runs, tracked to a file store
        names = t.getnames()
    assert any(n.endswith("/metrics/val_accuracy") for n in names), names[:20]
    assert not (tmp_path / "mlruns").exists()


def test_the_gpu_script_resolves_the_resnet_schedule(tmp_path):
    r = _run("resnet", tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    cfg = yaml.safe_load((tmp_path / "resnet_schedule.yaml").read_text())
    assert cfg["model"]["arch"] == "resnet34"
    assert [(lv["n"], lv["epochs"]) for lv in cfg["levels"]] == [(112, 4), (224, 4)]
    assert cfg["scaling"]["use_gpu"] == "auto" and cfg["scaling"]["cpus_per_worker"] == 8


def test_the_gpu_script_refuses_an_unknown_part(tmp_path):
    r = _run("cifar", tmp_path)
    assert r.returncode == 2 and "unknown part: cifar" in r.stdout + r.stderr
