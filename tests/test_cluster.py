"""A real two-node Ray cluster on this machine, an MLflow server, and `ray job submit`.

Starts a Ray head and a second Ray node as cluster/README.md documents it (`cluster/start-head.sh`
creates the token and turns token auth on, `cluster/start-worker.sh` joins with it; both on
127.0.0.1, each with its own resources and a temp dir of this test's), proves that a submit without
the token or with a wrong one is refused and runs nothing, starts an `mlflow server` with a SQLite
store, submits a small multiscale schedule with `ray job submit`, waits for SUCCEEDED (bounded),
then checks through MLflow's REST client that the parent and stage runs hold metrics, that the stage
checkpoints are on the shared storage path, and that the stage's workers ran on both nodes. Stops
exactly the processes it started.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

pytestmark = [pytest.mark.ray, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _procs_under(tag: str) -> list[int]:
    """PIDs whose command line mentions ``tag`` (this test's temp dir)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit() and int(d.name) != os.getpid():
            try:
                if tag in (d / "cmdline").read_bytes().decode(errors="replace"):
                    out.append(int(d.name))
            except OSError:
                pass
    return out


def _wait_http(port: int, seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {seconds} s")


def _ray_start(script: str, args, env, tries: int = 3) -> None:
    """Run ``cluster/<script>`` (the documented start); show its stderr when it fails and retry a
    port another process took between ``_free_port`` and the start (``args`` is re-evaluated)."""
    for attempt in range(tries):
        run = subprocess.run(["bash", ROOT / "cluster" / script, *args()], env=env,
                             capture_output=True, text=True, timeout=300)
        if run.returncode == 0:
            return
        collided = any(w in run.stderr.lower() for w in (
            "already in use", "address in use", "failed to bind"))
        if not collided or attempt == tries - 1:
            raise RuntimeError(f"cluster/{script} exited {run.returncode}:\n"
                               f"{run.stdout[-3000:]}\n{run.stderr[-6000:]}")
        time.sleep(2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("cluster")
    temp = Path(tempfile.mkdtemp(prefix="mscnn-rc-", dir="/tmp"))  # short: Ray's socket paths
    shared = tmp_path / "shared"
    shared.mkdir()
    home = tmp_path / "home"  # the token the head creates lives here, not in the user's ~/.ray
    home.mkdir()
    gcs, dash, mlf = _free_port(), _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "HOME": str(home)}
    for var in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        env.pop(var, None)
    started: list[subprocess.Popen] = []
    try:
        def own_ports():  # two nodes on one machine: every per-node service on its own port
            return [f"--{name}={_free_port()}" for name in (
                "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
                "metrics-export-port", "node-manager-port", "object-manager-port")]

        # as cluster/README.md documents it: the head creates the token, the worker is given it
        _ray_start("start-head.sh", lambda: [
            "--node-ip-address=127.0.0.1", *own_ports(), f"--port={gcs}", "--num-cpus=2",
            '--resources={"head_node": 1}', "--include-dashboard=true",
            f"--dashboard-port={dash}", f"--temp-dir={temp}"], env)
        token = (home / ".ray" / "auth_token").read_text().strip()
        assert len(token) >= 32
        worker_env = {k: v for k, v in env.items() if k != "HOME"} | {
            "HOME": str(tmp_path), "RAY_AUTH_TOKEN": token}  # a machine without the token file
        _ray_start("start-worker.sh", lambda: [
            f"127.0.0.1:{gcs}", *own_ports(), "--node-ip-address=127.0.0.1", "--num-cpus=2",
            '--resources={"second_node": 1}', f"--temp-dir={temp}"], worker_env)
        env = {**env, "RAY_AUTH_MODE": "token"}  # the client: the documented export
        store = tmp_path / "mlflow"
        store.mkdir()
        started.append(subprocess.Popen(
            [BIN / "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
             "--artifacts-destination", str(store / "artifacts"), "--host", "127.0.0.1",
             "--port", str(mlf), "--workers", "1"],
            env=env, stdout=open(tmp_path / "mlflow.log", "w"), stderr=subprocess.STDOUT,
            start_new_session=True))
        _wait_http(mlf, 120)
        _wait_http(dash, 60)
        yield {"dashboard": f"http://127.0.0.1:{dash}", "mlflow": f"http://127.0.0.1:{mlf}",
               "shared": shared, "env": env, "temp": temp, "gcs": f"127.0.0.1:{gcs}",
               "token": token}
    finally:
        for p in started:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in _procs_under(str(temp)):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            time.sleep(3)
        assert not _procs_under(str(temp)), "processes of the test cluster survived"


def test_multiscale_job_on_two_node_cluster(cluster, tmp_path):
    shared = cluster["shared"]
    cfg = {
        "name": "cluster-ms", "kind": "multiscale", "experiment": "cluster",
        "pyramid": {"name": "syn", "source": {"kind": "synthetic", "size": 16, "count": 200},
                    "levels": 2},
        "pyramid_root": str(shared / "pyramids"), "storage_path": str(shared / "runs"),
        "model": {"channels": 4, "classes": 4},
        "scaling": {"num_workers": 2, "placement_strategy": "STRICT_SPREAD"},
        "levels": [{"n": 8, "steps": 1, "epochs": 1}, {"n": 16, "steps": 1, "epochs": 1}],
    }
    config = tmp_path / "schedule.yaml"
    config.write_text(yaml.safe_dump(cfg))
    env = {**cluster["env"], "MLFLOW_TRACKING_URI": cluster["mlflow"]}
    runtime_env = {"working_dir": str(ROOT), "env_vars": {"MLFLOW_TRACKING_URI": cluster["mlflow"]},
                   "excludes": [".venv", "outputs", ".git", "mlflow.db", "mlruns", "*.parquet"]}
    # without the token, and with a wrong one, the job server refuses (and so does the GCS)
    no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"} | {"HOME": str(tmp_path)}
    wrong = {**env, "HOME": str(tmp_path), "RAY_AUTH_TOKEN": "0" * len(cluster["token"])}
    for bad, says in ((no_token, "missing authentication token"),
                      (wrong, "invalid authentication token")):
        sub = subprocess.run(
            [BIN / "ray", "job", "submit", "--address", cluster["dashboard"], "--",
             "python", "-c", "open('PWNED', 'w')"], env=bad, capture_output=True, text=True,
            timeout=300)
        assert says in (sub.stdout + sub.stderr).lower(), sub.stdout + sub.stderr
    gcs = subprocess.run([BIN / "ray", "status", "--address", cluster["gcs"]], env=no_token,
                         capture_output=True, text=True, timeout=120)
    assert gcs.returncode != 0 and "authentication" in (gcs.stdout + gcs.stderr).lower()
    listed = subprocess.run([BIN / "ray", "job", "list", "--address", cluster["dashboard"]],
                            env=env, capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0 and "raysubmit_" not in listed.stdout, listed.stdout

    for _ in range(30):  # the job agent comes up a little after the dashboard's port
        sub = subprocess.run(
            [BIN / "ray", "job", "submit", "--address", cluster["dashboard"], "--no-wait",
             "--runtime-env-json", json.dumps(runtime_env), "--",
             "python", "-m", "pipelines.cli", "train", "--config", str(config)],
            env=env, capture_output=True, text=True, timeout=300)
        if "No available agent" not in sub.stderr:
            break
        time.sleep(4)
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job_id = next(w.strip("'") for line in sub.stdout.splitlines() if "submitted successfully" in line
                  for w in line.split() if w.strip("'").startswith("raysubmit_"))
    deadline, status = time.time() + 600, ""
    while time.time() < deadline:
        st = subprocess.run([BIN / "ray", "job", "status", "--address", cluster["dashboard"], job_id],
                            env=env, capture_output=True, text=True, timeout=120)
        status = (st.stdout + st.stderr).lower()
        if any(f"job '{job_id.lower()}' {s}" in status for s in ("succeeded", "failed", "stopped")):
            break
        time.sleep(5)
    logs = subprocess.run([BIN / "ray", "job", "logs", "--address", cluster["dashboard"], job_id],
                          env=env, capture_output=True, text=True, timeout=120).stdout
    assert f"job '{job_id.lower()}' succeeded" in status, f"job {job_id}: {status}\n{logs[-4000:]}"

    # MLflow, through the REST API of the server
    from mlflow.tracking import MlflowClient

    client = MlflowClient(cluster["mlflow"])
    exp = client.get_experiment_by_name("cluster")
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'multiscale'")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and "final_val_accuracy" in parents[0].data.metrics
    kids = client.search_runs([exp.experiment_id],
                              f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert len(kids) == 2 and all("val_accuracy" in k.data.metrics for k in kids)
    # checkpoints on the shared storage path; workers of each stage on both nodes
    run_dir = next((shared / "runs").glob("cluster-ms-*"))
    results = json.loads((run_dir / "results.json").read_text())
    for stage in results["stages"]:
        assert (Path(stage["checkpoint"]) / "model.pt").is_file()
        assert str(shared) in stage["checkpoint"]
        assert len(set(stage["nodes"])) == 2, stage["nodes"]
    # both levels in one Ray Train run: one worker group across the two nodes (worker_group: schedule)
    assert list((run_dir / f"cluster-ms-{results['config_hash']}-L0-n8-N1..L1-n16-N1").glob("checkpoint_*"))


def test_the_readmes_job_submit_runs_as_written_from_a_fresh_clone(cluster, tmp_path):
    """README.md's `ray job submit` block, copied as a user copies it, run in a fresh clone; only
    the head's address, the tracking server and `/shared` are this test's. The demo's two stages
    on MNIST's demo subset run on the cluster; the runs reach the tracking server, the outputs the
    shared folder."""
    from mlflow.tracking import MlflowClient

    from mscnn.data import find_mnist_dir
    from tests.readme import fresh_clone, readme_command

    try:
        mnist = find_mnist_dir()
    except FileNotFoundError as e:
        pytest.skip(f"real MNIST not staged here: {e}")
    shared = cluster["shared"]
    (shared / "data").mkdir(exist_ok=True)
    (shared / "data" / "mnist").symlink_to(mnist)
    cmd = (readme_command("RAY_AUTH_MODE=token ray job submit")
           .replace("http://127.0.0.1:8265", cluster["dashboard"])
           .replace("http://127.0.0.1:5000", cluster["mlflow"]).replace("/shared", str(shared)))
    repo = fresh_clone(tmp_path / "mscnn")
    env = {k: v for k, v in cluster["env"].items()
           if k not in ("RAY_AUTH_MODE", "MLFLOW_TRACKING_URI", "MSCNN_DATA_DIR")}
    for _ in range(30):  # the job agent comes up a little after the dashboard's port
        sub = subprocess.run(["bash", "-c", cmd], cwd=repo, env=env, capture_output=True, text=True,
                             timeout=900)
        if "No available agent" not in sub.stderr:
            break
        time.sleep(4)
    assert sub.returncode == 0, sub.stdout[-4000:] + sub.stderr[-4000:]
    assert "succeeded" in (sub.stdout + sub.stderr).lower()
    client = MlflowClient(cluster["mlflow"])
    exp = client.get_experiment_by_name("mscnn")
    parent, = [r for r in client.search_runs([exp.experiment_id], "tags.schedule = 'demo-multiscale'")
               if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED" and parent.data.metrics["final_val_accuracy"] > 0.5
    run_dir, = (shared / "ray_results").glob("demo-multiscale-*")
    assert (run_dir / "results.json").is_file()
    assert (shared / "pyramids" / "mnist-demo" / "manifest.json").is_file()
