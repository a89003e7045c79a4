"""The README's commands as a user runs them: copied from README.md, in a fresh clone.

The `train` commands are checked with `--dry-run` (the resolved schedule, no training: the full
protocols take hours); the first sweep command and the sweep report run for real on MNIST's demo
subset. The `ray job submit` command runs on a two-node cluster in `test_cluster.py`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.readme import fresh_clone, readme_command, readme_commands

BIN = Path(sys.executable).parent


def _env() -> dict:
    """The user's shell: no tracking URI, no Ray address; the data found where the README says."""
    return {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return fresh_clone(tmp_path_factory.mktemp("fresh") / "mscnn")


def _run(cmd: str, repo: Path, timeout: float) -> subprocess.CompletedProcess:
    run = subprocess.run(["bash", "-c", cmd], cwd=repo, env=_env(), capture_output=True, text=True,
                         timeout=timeout)
    assert run.returncode == 0, f"{cmd}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return run


def _mnist_or_skip() -> Path:
    from mscnn.data import find_mnist_dir

    try:
        return find_mnist_dir()
    except FileNotFoundError as e:
        pytest.skip(f"real MNIST not staged here: {e}")


def test_every_train_command_resolves_as_written(repo):
    cmds = [c for c in readme_commands() if c.startswith(".venv/bin/mscnn train ")]
    assert len(cmds) >= 5
    for cmd in cmds:
        out = _run(f"{cmd} --dry-run", repo, 120).stdout
        config = cmd.split("--config ")[1].split()[0]
        name = yaml.safe_load((repo / config).read_text())["name"]
        assert f"name: {name}" in out, (cmd, out[-2000:])


@pytest.mark.ray
@pytest.mark.slow
def test_the_first_sweep_command_and_its_report_run_as_written(repo):
    _mnist_or_skip()
    sweep = _run(readme_command(".venv/bin/mscnn sweep --config configs/sweep_mnist.yaml"), repo, 1500)
    assert "best config: " in sweep.stdout
    best = yaml.safe_load((repo / "outputs" / "sweeps" / "sweep-mnist.best.yaml").read_text())
    assert best["name"] == "sweep-mnist-best"
    table = (repo / "outputs" / "sweeps" / "sweep-mnist.trials.md").read_text()
    assert table.count("| 0.") >= 4, table  # four trials, each with its final val accuracy
    report = _run(readme_command(".venv/bin/mscnn report --experiment mscnn-sweeps --sweep sweep-mnist"),
                  repo, 600)
    rows = (repo / "outputs" / "report" / "comparison.md").read_text()
    assert rows.count("sweep-mnist-") >= 4, rows
    assert "report" in report.stdout.lower()


@pytest.mark.ray
@pytest.mark.slow
def test_the_pyramid_command_runs_as_written(repo):
    _mnist_or_skip()
    run = _run(readme_command(".venv/bin/mscnn pyramid --config configs/pyramid_mnist.yaml"), repo, 600)
    assert "pyramid built" in run.stdout or "up to date" in run.stdout
    manifest = json.loads((repo / "outputs" / "pyramids" / "mnist" / "manifest.json").read_text())
    assert manifest["counts"]["train"]["total"] == 50_000
    assert [lv["n"] for lv in manifest["levels"]] == [28, 14, 7]


@pytest.mark.ray
@pytest.mark.slow
def test_evaluate_predict_and_export_run_as_written(repo):
    """The README's evaluate / predict / export lines with their placeholders bound as a user binds
    them: F.best and C.best the fine and coarse checkpoints of the sweep's multiscale trial above,
    digit.png and other.png two 28x28 MNIST test digits (C.best reads them coarsened to 14x14)."""
    from PIL import Image

    from mscnn.data import MNIST_FILES, read_idx

    fine = sorted((repo / "outputs" / "sweeps").glob("sweep-mnist-runs/*/L1-n28-N2.best"))
    pyramid = repo / "outputs" / "pyramids" / "mnist"
    if not fine or not pyramid.is_dir():
        pytest.skip("needs the sweep's and the pyramid's outputs (the tests above, in this order)")
    (repo / "F.best").symlink_to(fine[0])
    (repo / "C.best").symlink_to(fine[0].parent / "L0-n14-N2.best")
    images, labels = (read_idx(_mnist_or_skip() / f) for f in MNIST_FILES["test"])
    Image.fromarray(images[0]).save(repo / "digit.png")  # a 7, 28x28 (C.best is a 14x14 network)
    Image.fromarray(images[1]).save(repo / "other.png")  # a 2
    ev = _run(readme_command(".venv/bin/mscnn evaluate --fine F.best"), repo, 600)
    assert "naive-prefilter" in ev.stdout and "native" in ev.stdout
    pr = _run(readme_command(".venv/bin/mscnn predict --checkpoint C.best") + " --json", repo, 300)
    rows = json.loads(pr.stdout)
    assert [r["image"].rsplit("/", 1)[-1] for r in rows] == ["digit.png", "other.png"]
    assert [r["label"] for r in rows] == [int(labels[0]), int(labels[1])] == [7, 2]
    _run(readme_command(".venv/bin/mscnn export --checkpoint C.best"), repo, 600)
    assert {p.name for p in (repo / "outputs" / "export").iterdir()} >= {"model.ts", "model.onnx"}


@pytest.mark.slow
def test_the_mlflow_ui_command_serves_the_store(repo):
    """`mlflow ui` as the README writes it (its port replaced by a free one): the UI answers."""
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = readme_command(".venv/bin/mlflow ui").replace("--port 5000", f"--port {port}")
    proc = subprocess.Popen(["bash", "-c", f"exec {cmd}"], cwd=repo, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline, body = time.time() + 120, ""
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    body = r.read().decode(errors="replace")
                break
            except OSError:
                time.sleep(1)
        why = proc.stderr.read().decode()[-2000:] if proc.poll() is not None else body[:500]
        assert "mlflow" in body.lower(), why
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
