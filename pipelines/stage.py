"""The levels of a schedule in one Ray Train ``TorchTrainer`` run (or one level per run).

``train_func(config)`` runs on every worker, level after level: it reads its shard of the level's
pyramid (its own pyarrow read, or ``get_dataset_shard``), builds the model from Train's own
checkpoint (a resumed run), from the incoming prolonged checkpoint (``init_checkpoint``), from the
level before's best network moved by the level's handover, or from scratch, trains with DDP
(``prepare_model``), validates (accuracy all-reduced over workers) and reports metrics and a
checkpoint every epoch. Rank 0 alone writes checkpoints. Workers never talk to MLflow: the
``MlflowStageCallback`` runs in Ray Train's controller, on the driver's node, and logs each reported
epoch once, to the level's run and to the schedule's parent run (one step axis: the global epoch),
so a worker on another node needs no route to the tracking server.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import yaml
from ray.train import UserCallback

from mscnn.checkpoint import load_checkpoint, save_checkpoint
from mscnn.models import NetConfig, build_model, handover
from mscnn.train import eval_batch_size, evaluate, make_step, train_epoch

__all__ = ["CURVES", "MlflowStageCallback", "ProgressCallback", "ShardCache", "StageSpec", "after_level",
           "dataset_name", "level_states", "resolve_gpu", "run_stage", "train_extras_env", "train_func",
           "train_poll_env", "worker_reads"]

# what the stage and parent runs plot per epoch; bookkeeping (epoch, n, steps) are params and tags
CURVES = ("train_loss", "val_loss", "val_accuracy", "images_per_s", "wallclock", "stage_seconds",
          "fine_equiv_epochs")


@dataclass
class StageSpec:
    """What the driver hands one stage (passed whole to every worker)."""

    name: str  # deterministic: rerunning with the same name resumes the stage
    model: NetConfig
    level: int  # pyramid level
    epochs: int
    optim: dict  # pipelines.config.OptimConfig, dumped: make_step's options + batch_size
    patience: int | None
    seed: int
    init_checkpoint: str | None
    lineage: dict
    epoch_offset: int = 0
    wallclock_offset: float = 0.0
    compute_offset: float = 0.0
    compute_per_epoch: float = 1.0
    input_scale: list[float] = field(default_factory=lambda: [1.0])  # 1 / std per channel
    train_count: int = 0  # images in the level's train split (all workers)
    mge: dict | None = None  # {"sizes", "batch_sizes"}: multilevel gradient estimation
    cache_mb: float = 2048.0  # per worker and split: shards up to this size are kept as tensors
    read_root: str | None = None  # the pyramid, when each worker reads its rows itself (no Ray Data)
    extra: dict = field(default_factory=dict)  # e.g. the test-only fail_once switch
    # a later level of a worker group: mscnn.models.handover's options and "init_path" (the moved
    # network is written there, as the driver writes a level's own start)
    handover: dict | None = None


def _maybe_fail(spec: StageSpec, rank: int, step: int) -> None:
    """Test-only switches: ``extra["fail_once"] = {"rank", "step", "marker"}`` makes that worker
    exit hard once at that global step (the marker file, on shared storage, records it);
    ``extra["batch_sleep"]`` seconds slow every batch (time for a test to send a signal)."""
    if spec.extra.get("batch_sleep"):
        time.sleep(spec.extra["batch_sleep"])
    f = spec.extra.get("fail_once")
    if f and rank == f["rank"] and step == f["step"] and not os.path.exists(f["marker"]):
        Path(f["marker"]).write_text(f"failed at step {step}\n")
        os._exit(17)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def _all_reduce(values: list[float]) -> list[float]:
    """The sums over every worker. NCCL (GPU workers) reduces only CUDA tensors: found on the
    first stage run on a GPU, whose validation stopped on 'No backend type associated with device
    type cpu'."""
    dist = _dist()
    if not dist:
        return list(values)
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


def _mean_across_workers(t: torch.Tensor) -> torch.Tensor:
    dist = _dist()
    if dist and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def _all_gather(value) -> list:
    """``value`` of every worker, in rank order."""
    if not _dist():
        return [value]
    out: list = [None] * _dist().get_world_size()
    _dist().all_gather_object(out, value)
    return out


def _all_nodes() -> list[str]:
    """The Ray node id of every worker, in rank order."""
    import ray

    return _all_gather(ray.get_runtime_context().get_node_id())


def _fresh_state() -> dict:
    return {"epoch": -1, "best": -1.0, "bad_epochs": 0, "seconds": 0.0, "step": 0, "history": []}


def _resumed():
    """Train's own checkpoint of this run (a restarted worker group or a resumed run):
    ``(model, step state, train state, best model of the level so far or None)``, or None."""
    import ray.train

    resumed = ray.train.get_checkpoint()
    if not resumed:
        return None
    with resumed.as_directory() as d:
        model, _ = load_checkpoint(Path(d) / "model")
        step_state = torch.load(Path(d) / "step.pt", weights_only=True)
        best = load_checkpoint(Path(d) / "best")[0] if (Path(d) / "best").exists() else None
        return model, step_state, json.loads((Path(d) / "train_state.json").read_text()), best


def _initial(spec: StageSpec) -> torch.nn.Module:
    if spec.init_checkpoint:
        model, _ = load_checkpoint(spec.init_checkpoint)
    else:
        torch.manual_seed(spec.seed)
        model = build_model(spec.model)
    if model.config != spec.model:
        raise ValueError(f"stage {spec.name}: checkpoint architecture {model.config} "
                         f"differs from the level's {spec.model}")
    return model


def after_level(spec: StageSpec, last: dict) -> StageSpec:
    """``spec`` continuing the axes (global epoch, wall-clock, fine-grid compute) where the level
    before ended, ``last`` being that level's last epoch's metrics."""
    return replace(spec, epoch_offset=last["global_epoch"] + 1, wallclock_offset=last["wallclock"],
                   compute_offset=last["fine_equiv_epochs"])


def _hand_over(spec: StageSpec, best: torch.nn.Module, rank: int) -> tuple[torch.nn.Module, StageSpec]:
    """A later level of a worker group: the level before's best network moved by the level's
    handover (``spec.handover``: ``mscnn.models.handover``'s options and the ``init_path`` where rank
    0 writes it, as the driver does for a level of its own)."""
    options = {k: v for k, v in spec.handover.items() if k != "init_path"}
    moved, transfers = handover(best, spec.model, **options)
    lineage = {**spec.lineage, "transfers": transfers}
    if rank == 0:
        save_checkpoint(spec.handover["init_path"], moved, lineage)
    return moved, replace(spec, lineage=lineage)


def level_states(state: dict) -> list[dict]:
    """The train state of each level a stage ran, in order, from its last checkpoint's
    ``train_state.json`` (a worker group of several levels keeps the finished ones in ``levels``)."""
    return [*state.get("levels", []), {k: v for k, v in state.items() if k != "levels"}]


class ShardCache:
    """One worker's shard of a split as batches, every epoch, inputs multiplied by ``scale`` (the
    pyramid's 1 / std per channel). The first pass streams it from Ray Data
    (``iter_torch_batches``, a local shuffle buffer) and, while the shard fits in ``limit_bytes``,
    keeps its scaled tensors on the worker's device; later passes are plain tensor indexing (a
    fresh permutation per epoch when shuffled), as a plain PyTorch loop over a scaled split. A
    shard larger than the limit (or ``limit_bytes <= 0``) streams every epoch."""

    def __init__(self, shard, limit_bytes: float, scale: torch.Tensor | float = 1.0) -> None:
        self.shard, self.limit, self.scale = shard, limit_bytes, scale
        self.x = self.y = None
        self.streaming = limit_bytes <= 0

    @classmethod
    def of_tensors(cls, x: torch.Tensor, y: torch.Tensor, rank: int, world: int, device,
                   equal: bool, scale: torch.Tensor | float = 1.0) -> ShardCache:
        """A cache filled up front with this worker's rows of a whole split (``scaling.reader:
        worker``), scaled once: rows ``rank, rank + world, ...``; ``equal`` trims every worker to
        the same count (training: DDP's all-reduces need the same number of batches on every
        worker)."""
        rows = len(y) // world if equal else len(y)
        cache = cls(None, float("inf"), scale)  # its own copy of its rows: the whole split is let go
        cache.x = (x[rank::world][:rows].to(device) * scale).contiguous()
        cache.y = y[rank::world][:rows].contiguous().to(device)
        return cache

    def batches(self, batch_size: int, device, seed: int | None = None):
        if self.x is not None:
            yield from self._cached(batch_size, seed)
            return
        shuffle = {} if seed is None else {"local_shuffle_buffer_size": 4 * batch_size,
                                           "local_shuffle_seed": seed}
        xs, ys, size = [], [], 0
        for b in self.shard.iter_torch_batches(batch_size=batch_size, device=device, **shuffle):
            x = b["image"] * self.scale
            if not self.streaming:
                size += x.nelement() * x.element_size()
                if size > self.limit:
                    self.streaming, xs, ys = True, [], []
                else:
                    xs.append(x)
                    ys.append(b["label"])
            yield x, b["label"]
        if not self.streaming and xs:
            self.x, self.y = torch.cat(xs), torch.cat(ys)

    def _cached(self, batch_size: int, seed: int | None):
        n = len(self.y)
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(self.x.device)
                 if seed is not None else None)
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size] if order is not None else slice(i, i + batch_size)
            yield self.x[idx], self.y[idx]


def _validate(model, net, val: ShardCache, batch_size: int, device) -> tuple[float, float, float]:
    """Summed cross-entropy, correct count and count over every worker's validation shard, in
    batches of ``eval_batch_size`` (on a CPU, sized to its caches: 2.9x faster than the 1,000 of
    before for the demo network; up to twice the training batch) once the shard is cached, of
    ``batch_size`` while it streams."""
    if val.x is not None:
        batch_size = eval_batch_size(net, val.x[:1], 2 * batch_size)
    v = evaluate(model, val.batches(batch_size, device))
    return tuple(_all_reduce([v["loss_sum"], v["correct"], v["count"]]))


def _report(spec: StageSpec, net, step, state: dict, metrics: dict, best=None) -> None:
    """Rank 0 writes the checkpoint (model, step state, train state; ``best``: the level's best
    network when it is not ``net``); every worker reports."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            save_checkpoint(Path(tmp) / "model", net, {**spec.lineage, "epoch": metrics["epoch"]})
            torch.save(step.state_dict(), Path(tmp) / "step.pt")
            (Path(tmp) / "train_state.json").write_text(json.dumps(state))
            if best is not None:
                save_checkpoint(Path(tmp) / "best", best, spec.lineage)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


class MlflowStageCallback(UserCallback):
    """Ray Train callback, run in the Train controller (on the driver's node, never on a worker):
    rank 0's metrics of each report go to the level's MLflow run and the ``CURVES`` also to the
    schedule's parent run, at step ``global_epoch``. Each global epoch is logged once, also when a
    worker group restarts or a killed driver resumes the stage (the epochs already in the level's
    run are read back first).

    The store is opened (MLflow imported, about 2 s of CPU) in a background thread as soon as the
    callback arrives in the controller, while the worker group starts: opened at the first report
    instead, it took a core from the training for the whole second epoch, which ran at 0.67x the
    others (``benchmarks/system_overhead.py``, session 13)."""

    def __init__(self, uri: str, experiment: str, run_id: str | list[str],
                 parent_id: str | None = None) -> None:
        self.uri, self.experiment, self.run_id, self.parent_id = uri, experiment, run_id, parent_id
        self._tracker, self._seen, self._lock, self._warm = None, set(), threading.Lock(), None

    def __getstate__(self) -> dict:
        return {k: self.__dict__[k] for k in ("uri", "experiment", "run_id", "parent_id")}

    def __setstate__(self, state: dict) -> None:  # unpickled in the controller: open the store now
        self.__init__(**state)
        self._warm = threading.Thread(target=self._open_quietly, daemon=True, name="mlflow-open")
        self._warm.start()

    def _open_quietly(self) -> None:
        with contextlib.suppress(Exception):  # an error shows again, raised, at the first report
            self._open()

    def _open(self):
        with self._lock:
            if self._tracker is None:
                from pipelines.tracking import Tracker

                tracker = Tracker(self.experiment, self.uri)
                self._seen = {m.step for r in self._run_ids()
                              for m in tracker.client.get_metric_history(r, "val_accuracy")}
                self._tracker = tracker
            return self._tracker

    def _run_ids(self) -> list[str]:
        return self.run_id if isinstance(self.run_id, list) else [self.run_id]

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        m = metrics[0] if metrics else {}
        if "global_epoch" not in m:
            return
        tracker, step = self._open(), int(m["global_epoch"])
        if step in self._seen:  # an epoch reported again after a restart: logged already
            return
        curves = {k: m[k] for k in CURVES if k in m}
        run_id = self._run_ids()[int(m.get("group_index", 0))]  # a group: each level to its run
        tracker.log_metrics(run_id, curves | {k: v for k, v in m.items()
                                              if k.startswith("init_")}, step=step)
        if self.parent_id:
            tracker.log_metrics(self.parent_id, curves, step=step)
        self._seen.add(step)


class ProgressCallback(UserCallback):
    """Ray Train callback (in the controller, on the driver's node): after each report, rank 0's
    metrics go to the local file ``path`` (replaced whole), which the driver polls for its
    progress bar."""

    def __init__(self, path: str, epochs: int | list[int]) -> None:
        self.path, self.epochs = path, epochs if isinstance(epochs, list) else [epochs]

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if not metrics or "epoch" not in metrics[0]:
            return
        tmp = f"{self.path}.tmp"
        epochs = self.epochs[int(metrics[0].get("group_index", 0))]  # of the metrics' level
        Path(tmp).write_text(json.dumps({**metrics[0], "epochs": epochs}))
        os.replace(tmp, self.path)


def _fit_with_progress(trainer, path: Path, progress: Callable[[dict], None]):
    """``trainer.fit()`` in a daemon thread while this thread hands each new progress record
    (``ProgressCallback``'s file) to ``progress``; returns or raises what ``fit`` did."""
    out: dict = {}

    def fit():
        try:
            out["result"] = trainer.fit()
        except BaseException as e:  # handed to the calling thread
            out["error"] = e

    t = threading.Thread(target=fit, daemon=True, name="train-fit")
    t.start()
    seen = None
    while t.is_alive():
        t.join(0.25)
        try:
            text = path.read_text()
        except FileNotFoundError:
            continue
        if text != seen:
            seen = text
            progress(json.loads(text))
    if "error" in out:
        raise out["error"]
    return out["result"]


def _metrics(spec: StageSpec, state: dict, epoch: int, rec: list[float]) -> dict:
    loss_sum, count, vloss, correct, total, imgs = rec
    cfg = spec.model
    return {"epoch": epoch, "global_epoch": spec.epoch_offset + epoch,
            "train_loss": loss_sum / max(count, 1), "val_accuracy": correct / max(total, 1),
            "val_loss": vloss / max(total, 1), "images_per_s": imgs, "stage_seconds": state["seconds"],
            "wallclock": spec.wallclock_offset + state["seconds"],
            "fine_equiv_epochs": spec.compute_offset + (epoch + 1) * spec.compute_per_epoch,
            "n": cfg.n, "steps": sum(getattr(cfg, "unit_steps", [0]))}


def worker_reads(scaling: dict, manifest: dict, level: int, pyramid: str) -> bool:
    """Whether a stage's workers read the level themselves (pyarrow into ``ShardCache``) instead of
    through Ray Data: ``scaling.reader`` ``worker`` / ``ray_data``, or ``auto``: the worker when
    each split of the level, whole, fits ``worker_cache_mb`` (every worker reads the split and keeps
    its rows) and the pyramid is a path, not a URI. Ray Data's passes cost seconds per stage that a
    small level does not repay (benchmarks/RESULTS.md, issue 18); larger levels stream."""
    mode, uri = scaling.get("reader", "auto"), "://" in pyramid
    if mode == "worker" and uri:
        raise ValueError(f"scaling.reader: worker reads the pyramid from a path; {pyramid} is a URI "
                         "(use reader: ray_data or auto)")
    if mode != "auto":
        return mode == "worker"
    lv, c = manifest["levels"][level], manifest["channels"]
    largest = max(manifest["counts"][s]["total"] for s in ("train", "val")) * c * lv["n"] ** 2 * 4
    return not uri and 0 < largest <= scaling["worker_cache_mb"] * 2**20


def _read_caches(spec: StageSpec, k: int, rank: int, world: int, device, scale):
    if spec.read_root:  # scaling.reader: worker -- pyarrow straight into the cache, no Ray Data pass
        from pipelines.pyramid import level_tensors

        caches = []
        for s in ("train", "val"):
            split = level_tensors(spec.read_root, spec.level, s)
            caches.append(ShardCache.of_tensors(split.x, split.y, rank, world, device,
                                                equal=s == "train", scale=scale))
            del split  # the whole split: each cache holds its own rows
        return caches
    import ray.train

    limit = spec.cache_mb * 2**20
    return [ShardCache(ray.train.get_dataset_shard(dataset_name(s, k)), limit, scale)
            for s in ("train", "val")]


def dataset_name(split: str, k: int) -> str:
    """The Ray Data dataset of ``split`` for the ``k``-th level of a worker group."""
    return split if k == 0 else f"{split}_{k}"


def train_func(config: dict) -> None:
    """The per-worker loop, ``config = {"specs": [StageSpec, ...]}`` (or ``{"spec": StageSpec}``):
    one level after another in the same worker group (``scaling.worker_group: schedule``; one level
    per group otherwise), each level's shards into ``mscnn.train.train_epoch``, validation
    all-reduced, a checkpoint and a report every epoch. A later level starts from the level before's
    best network, moved by its handover here in the worker (no new worker group)."""
    import ray.train

    specs: list[StageSpec] = config.get("specs") or [config["spec"]]
    t_entry = time.time()  # wall-clock stamps (the driver's too): where the stage's time goes
    rank, world = ray.train.get_context().get_world_rank(), ray.train.get_context().get_world_size()
    resumed = _resumed()
    k0 = resumed[2].get("group_index", 0) if resumed else 0
    done = resumed[2].get("levels", []) if resumed else []
    best = None
    for k in range(k0, len(specs)):
        spec = specs[k] if k == 0 else after_level(specs[k], done[-1]["history"][-1])
        if resumed and k == k0:
            net, step_state, state, best = resumed
            best = best if best is not None else copy.deepcopy(net)
            if spec.handover:
                spec = replace(spec, lineage=load_checkpoint(spec.handover["init_path"])[1])
        elif spec.handover is None:  # the group's first level, or a level from random weights
            net, step_state, state = _initial(spec), None, _fresh_state()
        else:
            (net, spec), step_state, state = _hand_over(spec, best, rank), None, _fresh_state()
        state |= {"group_index": k, "levels": done} if len(specs) > 1 else {}
        best = _train_level(spec, k, net, step_state, state, rank, world, t_entry,
                            keep_best=k < len(specs) - 1, best=best if resumed and k == k0 else None)
        done = [*done, {key: v for key, v in state.items() if key != "levels"}]
        t_entry = time.time()


def _train_level(spec: StageSpec, k: int, net, step_state, state: dict, rank: int, world: int,
                 t_entry: float, keep_best: bool, best=None):
    """One level's epochs (``train_func``); returns its best network when ``keep_best`` (``best``:
    the best so far of a resumed level; the next level of the group starts from it, and each
    checkpoint carries it while it is not that epoch's network, so a restarted group has it too)."""
    import ray.train.torch

    model, device = ray.train.torch.prepare_model(net), ray.train.torch.get_device()
    bs = spec.optim["batch_size"]
    steps = spec.epochs * -(-spec.train_count // (bs * max(world, 1)))
    if spec.mge and world > 1:  # its forward bypasses DDP: the gradients would not be averaged
        raise ValueError(f"stage {spec.name}: estimator mge runs with scaling.num_workers <= 1")
    step = make_step(net, **spec.optim, total_steps=steps, forward=model, reduce=_mean_across_workers,
                     mge=spec.mge)
    if step_state:
        step.load_state_dict(step_state)
    scale = torch.tensor(spec.input_scale, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    train, val = _read_caches(spec, k, rank, world, device, scale)
    state["nodes"] = _all_nodes()  # where this stage's workers run (the last attempt)
    state["devices"] = _all_gather(str(device))  # and on what: cpu, cuda:0, ...
    t_setup = time.time()
    if "init" not in state:  # how good is the incoming (prolonged / interpolated / random) model?
        vloss, correct, total = _validate(model, net, val, bs, device)
        state["init"] = {"init_val_loss": vloss / max(total, 1), "init_val_accuracy": correct / max(total, 1)}
    # this attempt's stamps (a resumed stage starts a new attempt)
    state["timeline"] = {"entered": t_entry, "setup_done": t_setup, "init_validated": time.time(),
                         "report_s": 0.0, "seconds_before": state["seconds"]}
    step0, reported = state["step"], 0.0
    stopped = spec.patience is not None and state["bad_epochs"] >= spec.patience  # before a restart
    for epoch in range(state["epoch"] + 1, spec.epochs if not stopped else 0):
        t0 = time.perf_counter()
        rec = train_epoch(step, train.batches(bs, device, spec.seed + epoch), net,
                          on_batch=lambda i, s0=step0: _maybe_fail(spec, rank, s0 + i))
        state["step"] = step0 = step0 + rec["batches"]
        val_sums = _validate(model, net, val, bs, device)
        state["seconds"] += time.perf_counter() - t0  # training and validation
        summed = _all_reduce([rec["loss"] * rec["images"], rec["images"], rec["images_per_s"]])
        metrics = _metrics(spec, state, epoch, [summed[0], summed[1], *val_sums, summed[2]])
        if "group_index" in state:
            metrics["group_index"] = k
        if epoch == 0:  # the incoming network's accuracy, logged with the level's first epoch
            metrics |= state["init"]
        improved = metrics["val_accuracy"] > state["best"]
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        state |= {"best": max(state["best"], metrics["val_accuracy"]), "epoch": epoch}
        state["history"].append(metrics)
        if keep_best and improved:
            best = copy.deepcopy(net)
        t_report = time.time()
        state["timeline"]["last_report"] = t_report
        _report(spec, net, step, state, metrics, best if keep_best and not improved else None)
        reported = time.time() - t_report  # checkpoint written and reported
        state["timeline"]["report_s"] += reported
        if spec.patience is not None and state["bad_epochs"] >= spec.patience:
            break
    # as the level's last checkpoint holds it: its last report is the level's teardown
    state["timeline"]["report_s"] -= reported
    return best


def scalable_gpus() -> float:
    """GPUs the cluster's autoscaler could provide, 0 without one: what it reports to the GCS
    (node types' ``GPU`` x ``max_count``, as Ray Train V2 reads it; newer autoscalers), else the
    autoscaling config on this (head) node that ``ray up`` writes, resources filled in per
    instance type: ``~/ray_bootstrap_config.yaml`` or ``MSCNN_AUTOSCALER_CONFIG``
    (``available_node_types``' ``GPU`` x ``max_workers``)."""
    from ray._private.state import state

    try:
        reported = float((state.get_max_resources_from_cluster_config() or {}).get("GPU", 0))
    except Exception:  # noqa: BLE001 (nothing reported or reachable: try the config file)
        reported = 0.0
    if reported:
        return reported
    path = Path(os.environ.get("MSCNN_AUTOSCALER_CONFIG", "~/ray_bootstrap_config.yaml")).expanduser()
    try:
        types = (yaml.safe_load(path.read_text()) or {}).get("available_node_types") or {}
        return float(sum(float((t.get("resources") or {}).get("GPU", 0)) * int(t.get("max_workers", 0))
                         for t in types.values()))
    except (OSError, yaml.YAMLError, AttributeError, TypeError, ValueError):
        return 0.0


def resolve_gpu(scaling: dict, poll_s: float = 5.0, log: Callable[[str], None] = print) -> bool:
    """Whether the stage's workers take GPUs. ``use_gpu: auto``: when the cluster has the GPUs
    now, or when its autoscaler's node types can provide them (``scalable_gpus``: a GPU group at
    ``min_workers: 0`` has none yet); then as ``true``: the workers' GPUs are requested from the
    autoscaler (``request_resources``, so GPU nodes are added from zero) and awaited up to
    ``gpu_wait_s``; a cluster that never gets them is a ``ValueError`` naming what was asked for."""
    import ray
    from ray.autoscaler.sdk import request_resources

    want, workers = scaling["use_gpu"], max(scaling["num_workers"], 1)
    need = scaling["gpus_per_worker"] * workers
    have = ray.cluster_resources().get("GPU", 0)
    if want == "auto":
        if have > 0:
            return True
        offered = scalable_gpus()
        if offered < need:
            return False
        log(f"use_gpu: auto: no GPU yet, the autoscaler's node types offer {offered:g}; "
                f"requesting {need:g} and waiting up to {scaling['gpu_wait_s']:g} s")
    elif not want:
        return False
    if have >= need:
        return True
    bundle = {"GPU": scaling["gpus_per_worker"], "CPU": scaling["cpus_per_worker"]}
    request_resources(bundles=[bundle] * workers)
    deadline = time.monotonic() + scaling["gpu_wait_s"]
    try:
        while time.monotonic() < deadline:
            time.sleep(min(poll_s, max(deadline - time.monotonic(), 0)))
            if ray.cluster_resources().get("GPU", 0) >= need:
                return True
    finally:
        request_resources(bundles=[])  # the stage's own request now holds them; let them go after
    raise ValueError(f"scaling.use_gpu: {str(want).lower()} needs {need:g} GPU(s) ({workers} worker(s) x "
                     f"{scaling['gpus_per_worker']:g}); the cluster has "
                     f"{ray.cluster_resources().get('GPU', 0):g} and no GPU node came up within "
                     f"scaling.gpu_wait_s = {scaling['gpu_wait_s']:g} s (is there a GPU node type "
                     "in the autoscaler's config?)")


# Ray Train V2 (2.60) reads these in the driver (metrics) and propagates the watcher's flag to its
# controller (ENV_VARS_TO_PROPAGATE)
TRAIN_EXTRAS_ENV = ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_METRICS_ENABLED")


@contextlib.contextmanager
def _env_defaults(values: dict[str, str]):
    """``values`` in ``os.environ`` while the block runs, except a variable the user set (it wins
    and stays); yields the variables as they are in force."""
    saved = {k: os.environ.get(k) for k in values}
    for k, v in values.items():
        if saved[k] is None:
            os.environ[k] = v
    try:
        yield {k: os.environ[k] for k in values}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


@contextlib.contextmanager
def train_extras_env(setting: str, nodes: int | None = None):
    """While a stage's ``fit`` runs: Ray Train's preemption watcher and metrics callbacks on or off
    (``scaling.train_extras``; ``auto``: off when the Ray cluster has one alive node, ``nodes``
    counted when not given). A variable the user set wins. Yields what is in force: each
    variable's name and whether it is on (``"1"``/``"true"``)."""
    if setting == "auto":
        if nodes is None:
            import ray

            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        setting = "on" if nodes > 1 else "off"
    with _env_defaults(dict.fromkeys(TRAIN_EXTRAS_ENV, "1" if setting == "on" else "0")) as env:
        yield {k: v.strip().lower() in ("1", "true") for k, v in env.items()}


# read by Ray Train V2's controller (propagated from the driver, ENV_VARS_TO_PROPAGATE): how often
# it polls its workers, which is also how soon it sees them started, a report, and the end
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"


@contextlib.contextmanager
def train_poll_env(seconds: float):
    """While a stage's ``fit`` runs: Ray Train's controller polls its workers every ``seconds``
    (``scaling.train_poll_s``; Ray's own default is 2 s). A ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``
    the user set wins. Yields the interval in force, in seconds."""
    with _env_defaults({TRAIN_POLL_ENV: f"{seconds:g}"}) as env:
        yield float(env[TRAIN_POLL_ENV])


def run_stage(spec: StageSpec | list[StageSpec], pyramid: str, storage_path: str, scaling: dict,
              max_failures: int, mlflow: dict | None, materialize: bool = True,
              callbacks: list | None = None, progress: Callable[[dict], None] | None = None,
              stamps: dict | None = None, name: str | None = None):
    """Run one stage with ``TorchTrainer``; returns Ray Train's ``Result``. ``spec``: one level, or
    the levels one worker group trains one after another (``scaling.worker_group: schedule``; each
    later level starts from the one before's best network, moved by its ``handover``); the run is
    called ``name`` (default: the first level's). ``mlflow``: ``{"uri", "experiment", "run_id",
    "parent_id"}`` for ``MlflowStageCallback`` (``run_id``: one per level for a group). ``materialize``
    reads the level into Ray's object store once (fast epochs for data that fits); otherwise every
    epoch streams the Parquet shards; neither applies when the workers read the level themselves
    (``worker_reads``: no Ray Data datasets at all). ``progress(metrics)`` is called on this thread
    after each epoch (rank 0's metrics and ``epochs``). ``stamps`` receives the driver's wall-clock stamps
    (``start``, ``fit_start``, ``fit_end``) for the stage's timeline (``stage_phases``)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.pyramid import input_scale, load_level, read_manifest

    specs = spec if isinstance(spec, list) else [spec]
    stamps = {} if stamps is None else stamps
    stamps["start"] = time.time()
    manifest = read_manifest(pyramid)
    for sp in specs:
        n_level = manifest["levels"][sp.level]["n"]
        if n_level != sp.model.n:
            raise ValueError(f"stage {sp.name}: pyramid level {sp.level} has n={n_level}, "
                             f"the model n={sp.model.n}")
    use_gpu = resolve_gpu(scaling)
    for sp in specs:
        sp.input_scale = input_scale(manifest)
        sp.cache_mb = scaling["worker_cache_mb"]
        sp.train_count = manifest["counts"]["train"]["total"]
        reads = worker_reads(scaling, manifest, sp.level, pyramid)
        sp.read_root = str(Path(pyramid).resolve()) if reads else None
    callbacks = [*(callbacks or []), *([MlflowStageCallback(**mlflow)] if mlflow else [])]
    progress_file = None
    if progress:
        progress_file = Path(tempfile.mkdtemp(prefix="mscnn-progress-")) / "progress.json"
        callbacks.append(ProgressCallback(str(progress_file), [sp.epochs for sp in specs]))
    datasets = {dataset_name(s, k): load_level(pyramid, sp.level, s)
                for k, sp in enumerate(specs) if not sp.read_root for s in ("train", "val")}
    trainer = TorchTrainer(
        train_func,
        train_loop_config={"specs": specs},
        scaling_config=ScalingConfig(
            num_workers=scaling["num_workers"], use_gpu=use_gpu,
            resources_per_worker={"CPU": scaling["cpus_per_worker"],
                                  **({"GPU": scaling["gpus_per_worker"]} if use_gpu else {})},
            placement_strategy=scaling["placement_strategy"],
        ),
        run_config=RunConfig(
            name=name or specs[0].name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            callbacks=callbacks or None,
        ),
        datasets={s: ds.materialize() if materialize else ds for s, ds in datasets.items()} or None,
        # one worker reads the whole level: no split, so no split-coordinator actor per dataset
        # (starting them cost seconds of every stage's first pass over each split)
        dataset_config=DataConfig(datasets_to_split=[] if scaling["num_workers"] <= 1 else "all"),
    )
    stamps["fit_start"] = time.time()
    try:
        with (train_extras_env(scaling.get("train_extras", "on")),
              train_poll_env(scaling.get("train_poll_s", 0.5))):
            if not progress:
                return trainer.fit()
            return _fit_with_progress(trainer, progress_file, progress)
    finally:
        stamps["fit_end"] = time.time()
        if progress_file:
            shutil.rmtree(progress_file.parent, ignore_errors=True)


def stage_phases(stamps: dict, state: dict) -> dict[str, float]:
    """Where one stage's wall-clock went, in seconds, from the driver's ``stamps`` (``run_stage``)
    and the last attempt's worker ``timeline`` (``train_state.json``): ``datasets`` (the driver
    reading the level into Ray's object store), ``worker_start`` (from ``fit`` until the worker's
    loop runs: controller, worker group, imports), ``setup`` (model, optimiser, shards),
    ``init_validation`` (the incoming network on the val split), ``epochs`` (training and
    validation), ``reports`` (checkpoints written and reported, all but the last), ``teardown``
    (from the last report, its checkpoint's persistence included, until ``fit`` returned), and
    ``other`` (the rest of the fit: metric all-reduces between epochs). After a worker restart the
    phases are the last attempt's: the earlier attempts' time is in ``worker_start`` (from ``fit``
    until the last attempt's loop ran), their epochs are not counted again in ``epochs``."""
    t = state.get("timeline") or {}
    if not t or "fit_start" not in stamps:
        return {}
    fit = stamps["fit_end"] - stamps["fit_start"]
    out = {"datasets": stamps["fit_start"] - stamps["start"],
           "worker_start": t["entered"] - stamps["fit_start"],
           "setup": t["setup_done"] - t["entered"],
           "init_validation": t["init_validated"] - t["setup_done"],
           "epochs": state["seconds"] - t.get("seconds_before", 0.0), "reports": t["report_s"],
           "teardown": stamps["fit_end"] - t.get("last_report", t["init_validated"])}
    out["other"] = fit - sum(v for k, v in out.items() if k != "datasets")
    return {k: round(v, 3) for k, v in out.items()}
