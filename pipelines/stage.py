"""One level of a schedule = one Ray Train ``TorchTrainer`` run.

``train_func(config)`` runs on every worker: it reads its shard of the level's pyramid
(``get_dataset_shard``), builds the model from Train's own checkpoint (a resumed stage), from the
incoming prolonged checkpoint (``config["init_checkpoint"]``) or from scratch, trains with DDP
(``prepare_model``), validates (accuracy all-reduced over workers) and reports metrics and a
checkpoint every epoch. Rank 0 alone writes checkpoints and logs to MLflow.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from mscnn.checkpoint import load_checkpoint, save_checkpoint
from mscnn.models import NetConfig, build_model, config_from_dict, config_to_dict
from mscnn.optim import BCD
from mscnn.train import make_optimizer

__all__ = ["StageSpec", "run_stage", "train_func"]


def _maybe_fail(config: dict, rank: int, step: int) -> None:
    """Test-only switch: ``config["fail_once"] = {"rank", "step", "marker"}`` makes that worker
    exit hard once at that global step (the marker file, on shared storage, records it)."""
    f = config.get("fail_once")
    if f and rank == f["rank"] and step == f["step"] and not os.path.exists(f["marker"]):
        Path(f["marker"]).write_text(f"failed at step {step}\n")
        os._exit(17)


def _all_reduce(values: list[float]) -> list[float]:
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def _mean_across_workers(t: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def _all_nodes() -> list[str]:
    """The Ray node id of every worker, in rank order."""
    import ray
    import torch.distributed as dist

    me = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return [me]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, me)
    return out


def _validate(model, val_ds, scale, device) -> tuple[float, float, float]:
    """Summed cross-entropy, correct count and count on this worker's validation shard."""
    model.eval()
    loss = correct = total = 0.0
    with torch.no_grad():
        for batch in val_ds.iter_torch_batches(batch_size=1000, device=device):
            logits = model(batch["image"] * scale)
            loss += F.cross_entropy(logits, batch["label"], reduction="sum").item()
            correct += (logits.argmax(1) == batch["label"]).sum().item()
            total += len(batch["label"])
    model.train()
    return loss, correct, total


def _save(dirpath: str, model: torch.nn.Module, opt, sched, state: dict, lineage: dict) -> None:
    save_checkpoint(Path(dirpath) / "model", model, lineage)
    torch.save({"optimizer": opt.state_dict() if opt else None,
                "scheduler": sched.state_dict() if sched else None}, Path(dirpath) / "optimizer.pt")
    (Path(dirpath) / "train_state.json").write_text(json.dumps(state))


def train_func(config: dict) -> None:
    """The per-worker training loop of one stage (see the module docstring for ``config``)."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = config_from_dict(config["model"])
    opt_state, state = None, {"epoch": -1, "best": -1.0, "bad_epochs": 0, "seconds": 0.0, "step": 0,
                              "history": []}
    resumed = ray.train.get_checkpoint()
    if resumed:
        with resumed.as_directory() as d:
            model, _ = load_checkpoint(Path(d) / "model")
            opt_state = torch.load(Path(d) / "optimizer.pt", weights_only=True)
            state = json.loads((Path(d) / "train_state.json").read_text())
    elif config.get("init_checkpoint"):
        model, _ = load_checkpoint(config["init_checkpoint"])
    else:
        torch.manual_seed(config["seed"])
        model = build_model(cfg)
    if model.config != cfg:
        raise ValueError(f"stage {config['stage']}: checkpoint architecture {model.config} "
                         f"differs from the level's {cfg}")
    net = model
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    o = config["optim"]
    opt = sched = bcd = None
    if o["name"] == "bcd":  # the paper's optimiser, on the unwrapped model; reductions its own
        bcd = BCD(net.to(device), o["alpha_time"], o["alpha_space"], o["newton_steps"],
                  o["cg_iters"], o["damping"], reduce=_mean_across_workers)
    else:
        opt = make_optimizer(model, o["name"], o["lr"])
        steps_per_epoch = -(-config["train_count"] // (o["batch_size"] * max(world, 1)))
        if o["cosine"]:
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, config["epochs"] * steps_per_epoch)
    if opt_state and opt:
        opt.load_state_dict(opt_state["optimizer"])
        if sched and opt_state["scheduler"]:
            sched.load_state_dict(opt_state["scheduler"])

    tracker = None
    if rank == 0 and config.get("mlflow"):
        from pipelines.tracking import Tracker

        tracker = Tracker(config["mlflow"]["experiment"], config["mlflow"]["uri"])
    scale = torch.tensor(config["input_scale"], dtype=torch.float32, device=device).view(1, -1, 1, 1)
    train_ds = ray.train.get_dataset_shard("train")
    val_ds = ray.train.get_dataset_shard("val")
    bs = config["optim"]["batch_size"]
    state["nodes"] = _all_nodes()  # where this stage's workers run (the last attempt)
    if "init" not in state:  # how good is the incoming (prolonged / interpolated / random) model?
        vloss, correct, total = _all_reduce(list(_validate(model, val_ds, scale, device)))
        state["init"] = {"init_val_loss": vloss / max(total, 1),
                         "init_val_accuracy": correct / max(total, 1)}
        if tracker:
            tracker.log_metrics(config["mlflow"]["run_id"], state["init"], step=config["epoch_offset"])
    for epoch in range(state["epoch"] + 1, config["epochs"]):
        t0, loss_sum, count = time.perf_counter(), 0.0, 0
        for batch in train_ds.iter_torch_batches(batch_size=bs, device=device,
                                                 local_shuffle_buffer_size=4 * bs,
                                                 local_shuffle_seed=config["seed"] + epoch):
            x, y = batch["image"] * scale, batch["label"]
            if bcd:
                loss = bcd.step(x, y)["loss"]
            else:
                loss_t = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss_t.backward()
                opt.step()
                if sched:
                    sched.step()
                loss = loss_t.item()
            state["step"] += 1
            loss_sum += loss * len(y)
            count += len(y)
            _maybe_fail(config, rank, state["step"])
        train_seconds = time.perf_counter() - t0
        vloss, correct, total = _validate(model, val_ds, scale, device)
        loss_sum, count, vloss, correct, total, imgs = _all_reduce(
            [loss_sum, count, vloss, correct, total, count / train_seconds])
        val_acc = correct / max(total, 1)
        state["seconds"] += time.perf_counter() - t0
        improved = val_acc > state["best"]
        state["best"] = max(state["best"], val_acc)
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        state["epoch"] = epoch
        compute = config["compute_offset"] + (epoch + 1) * config["compute_per_epoch"]
        metrics = {
            "epoch": epoch, "global_epoch": config["epoch_offset"] + epoch,
            "train_loss": loss_sum / max(count, 1), "val_accuracy": val_acc,
            "val_loss": vloss / max(total, 1),
            "images_per_s": imgs, "stage_seconds": state["seconds"],
            "wallclock": config["wallclock_offset"] + state["seconds"],
            "fine_equiv_epochs": compute, "n": cfg.n, "steps": sum(getattr(cfg, "unit_steps", [0])),
        }
        state["history"].append(metrics)
        stop = config.get("patience") is not None and state["bad_epochs"] >= config["patience"]
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                _save(tmp, net, opt, sched, state, {**config["lineage"], "epoch": epoch})
                checkpoint = Checkpoint.from_directory(tmp)
                if tracker:
                    tracker.log_metrics(config["mlflow"]["run_id"], metrics,
                                        step=metrics["global_epoch"])
            ray.train.report(metrics, checkpoint=checkpoint)
        if stop:
            break


@dataclass
class StageSpec:
    """What the driver hands one stage."""

    name: str  # deterministic: rerunning with the same name resumes the stage
    model: NetConfig
    level: int  # pyramid level
    epochs: int
    optim: dict
    patience: int | None
    seed: int
    init_checkpoint: str | None
    lineage: dict
    epoch_offset: int = 0
    wallclock_offset: float = 0.0
    compute_offset: float = 0.0
    compute_per_epoch: float = 1.0
    extra: dict = field(default_factory=dict)  # e.g. the test-only fail_once switch


def run_stage(spec: StageSpec, pyramid: str, storage_path: str, scaling: dict,
              max_failures: int, mlflow: dict | None, materialize: bool = True,
              callbacks: list | None = None):
    """Run one stage with ``TorchTrainer``; returns Ray Train's ``Result``. ``materialize`` reads
    the level into Ray's object store once (fast epochs for data that fits); otherwise every
    epoch streams the Parquet shards."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.pyramid import load_level, read_manifest

    manifest = read_manifest(pyramid)
    n_level = manifest["levels"][spec.level]["n"]
    if n_level != spec.model.n:
        raise ValueError(f"stage {spec.name}: pyramid level {spec.level} has n={n_level}, "
                         f"the model n={spec.model.n}")
    use_gpu = scaling["use_gpu"]
    gpus = ray.cluster_resources().get("GPU", 0)
    if use_gpu == "auto":
        use_gpu = gpus > 0
    elif use_gpu and not gpus:
        raise ValueError("scaling.use_gpu: true, but the Ray cluster has no GPUs")
    config = {
        "stage": spec.name, "model": config_to_dict(spec.model), "epochs": spec.epochs,
        "optim": spec.optim, "patience": spec.patience, "seed": spec.seed,
        "init_checkpoint": spec.init_checkpoint, "lineage": spec.lineage,
        "epoch_offset": spec.epoch_offset, "wallclock_offset": spec.wallclock_offset,
        "compute_offset": spec.compute_offset, "compute_per_epoch": spec.compute_per_epoch,
        "input_scale": [1.0 / s for s in manifest["normalisation"]["std"]],
        "train_count": manifest["counts"]["train"]["total"], "mlflow": mlflow, **spec.extra,
    }
    trainer = TorchTrainer(
        train_func,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=scaling["num_workers"], use_gpu=use_gpu,
            resources_per_worker={"CPU": scaling["cpus_per_worker"]},
            placement_strategy=scaling["placement_strategy"],
        ),
        run_config=RunConfig(
            name=spec.name, storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            callbacks=callbacks or None,
        ),
        datasets={s: ds.materialize() if materialize else ds
                  for s, ds in ((s, load_level(pyramid, spec.level, s)) for s in ("train", "val"))},
    )
    return trainer.fit()
