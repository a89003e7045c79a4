"""The README's commands as a user runs them: copied from README.md, in a fresh clone.

The `train` commands are checked with `--dry-run` (the resolved schedule, no training: the full
protocols take hours); the first sweep command and the sweep report run for real on MNIST's demo
subset. The `ray job submit` command runs on a two-node cluster in `test_cluster.py`."""

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
    from mscnn.data import find_mnist_dir

    try:
        find_mnist_dir()
    except FileNotFoundError as e:
        pytest.skip(f"real MNIST not staged here: {e}")
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
