"""``mscnn report``: single-scale vs multiscale vs depth schedules, read back from MLflow.

Runs come from ``MlflowClient`` by experiment and tags (not from local files): every parent run
whose ``kind`` is single, multiscale or depth, with its stage runs' per-epoch metrics joined on the
common step axis. Produces a table (final val accuracy, wall-clock, fine-grid-equivalent compute,
compute and wall-clock to reach a target accuracy, speedup over the single-scale baseline) and
PNG plots, written to a folder and logged as artifacts of a ``report`` run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pipelines.tracking import Tracker  # noqa: E402

__all__ = ["RunCurve", "collect_runs", "fig1_kernels", "make_report", "summary_rows", "unique_labels"]

KINDS = ("single", "multiscale", "depth")
CURVE_METRICS = ("val_accuracy", "val_loss", "train_loss", "wallclock", "fine_equiv_epochs")


@dataclass
class RunCurve:
    run_id: str
    name: str
    kind: str
    tags: dict
    final_val_accuracy: float | None
    points: list[dict] = field(default_factory=list)  # one per epoch, sorted by step
    stage_inits: list[dict] = field(default_factory=list)  # init_val_loss/accuracy per stage

    label_suffix: str = ""  # set by unique_labels when names repeat

    @property
    def label(self) -> str:
        init = self.tags.get("init", "transfer")
        return (f"{self.name}{self.label_suffix} "
                f"({self.kind}{', random init' if init == 'random' else ''})")

    def to_target(self, target: float) -> dict | None:
        """The first epoch at which val accuracy reaches ``target`` on the final resolution's
        images (a coarse level's accuracy is on coarse images: another task). Shallower levels
        of a depth schedule see the same images, so they count."""
        if not self.points:
            return None
        n = self.points[-1].get("n")
        return next((p for p in self.points
                     if p.get("n") == n and p.get("val_accuracy", -1) >= target), None)


def collect_runs(experiment: str, tracker: Tracker | None = None,
                 filter_string: str = "", unfinished: bool = False) -> list[RunCurve]:
    """Parent runs of schedules in ``experiment`` (optionally narrowed by an MLflow filter, e.g.
    ``tags.sweep_id = 'x'``), each with its per-epoch curve from the stage runs. Only FINISHED
    runs unless ``unfinished`` (a failed or killed schedule is no result)."""
    tr = tracker or Tracker(experiment)
    c = tr.client
    if not unfinished:
        done = "attributes.status = 'FINISHED'"
        filter_string = f"{filter_string} and {done}" if filter_string else done
    runs = c.search_runs([tr.experiment_id], filter_string, max_results=5000,
                         order_by=["attributes.start_time ASC"])
    out = []
    for r in runs:
        tags = r.data.tags
        if tags.get("kind") not in KINDS or "mlflow.parentRunId" in tags:
            continue
        curve = RunCurve(r.info.run_id, r.info.run_name, tags["kind"], tags,
                         r.data.metrics.get("final_val_accuracy"))
        kids = c.search_runs([tr.experiment_id], f"tags.mlflow.parentRunId = '{r.info.run_id}'",
                             max_results=1000, order_by=["attributes.start_time ASC"])
        for k in kids:
            # the level's resolution and depth are params of its run (bookkeeping, not curves)
            raw = k.data.params.get("steps", "None")  # a JSON list, or str(None)
            steps = None if raw == "None" else json.loads(raw)
            level = {"n": int(k.data.params["n"]), "steps": sum(steps) if steps else None,
                     "stage": k.data.tags.get("stage")}
            by_step: dict[int, dict] = {}
            for m in CURVE_METRICS:
                for h in c.get_metric_history(k.info.run_id, m):
                    by_step.setdefault(h.step, {"step": h.step, **level})[m] = h.value
            curve.points += sorted((p for p in by_step.values() if "val_accuracy" in p),
                                   key=lambda p: p["step"])
            init = {m: k.data.metrics[m] for m in ("init_val_loss", "init_val_accuracy")
                    if m in k.data.metrics}
            curve.stage_inits.append({"stage": k.data.tags.get("stage"), **init})
        curve.points.sort(key=lambda p: p["step"])
        out.append(curve)
    return out


def summary_rows(curves: list[RunCurve], target: float) -> list[dict]:
    """One row per run; ``speedup`` = the single-scale baseline's compute to reach ``target``
    divided by this run's, ``wallclock_speedup`` the same in seconds (baseline: the first finished
    single-scale run that reaches the target)."""
    base = next((c.to_target(target) for c in curves if c.kind == "single" and c.to_target(target)),
                None)
    rows = []
    for c in curves:
        last = c.points[-1] if c.points else {}
        hit = c.to_target(target)
        rows.append({
            "run": c.name + c.label_suffix, "kind": c.kind, "init": c.tags.get("init", "transfer"),
            "final_val_accuracy": c.final_val_accuracy,
            "wallclock_s": last.get("wallclock"), "fine_equiv_epochs": last.get("fine_equiv_epochs"),
            "compute_to_target": hit["fine_equiv_epochs"] if hit else None,
            "wallclock_to_target": hit["wallclock"] if hit else None,
            "speedup": (base["fine_equiv_epochs"] / hit["fine_equiv_epochs"]) if base and hit else None,
            "wallclock_speedup": (base["wallclock"] / hit["wallclock"]) if base and hit else None,
        })
    return rows


def _fmt(v, pat):
    return "" if v is None else pat.format(v)


def markdown(rows: list[dict], target: float) -> str:
    out = [f"| run | kind | init | final val acc | wall-clock s | fine-equiv epochs | "
           f"compute to {100 * target:.1f}% | wall-clock to {100 * target:.1f}% | speedup (compute) "
           "| speedup (wall-clock) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['run']} | {r['kind']} | {r['init']} | "
                   f"{_fmt(r['final_val_accuracy'], '{:.4f}')} | {_fmt(r['wallclock_s'], '{:.0f}')} | "
                   f"{_fmt(r['fine_equiv_epochs'], '{:.2f}')} | {_fmt(r['compute_to_target'], '{:.2f}')} "
                   f"| {_fmt(r['wallclock_to_target'], '{:.0f}')} | {_fmt(r['speedup'], '{:.2f}x')} "
                   f"| {_fmt(r['wallclock_speedup'], '{:.2f}x')} |")
    return "\n".join(out)


def unique_labels(curves: list[RunCurve]) -> None:
    """Runs of the same schedule (repeats) get the start of their run id in the label."""
    names = [c.label for c in curves]
    for c in curves:
        if names.count(c.label) > 1:
            c.label_suffix = f" #{c.run_id[:6]}"


def _save_figure(fig, axes, path: Path) -> Path:
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _curves_plot(curves: list[RunCurve], x: str, xlabel: str, path: Path, target: float) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    draw_curves(ax, curves, x, target)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation accuracy (%), on each level's own images")
    ax.set_title(f"Validation accuracy against {xlabel}")
    return _save_figure(fig, [ax], path)


def draw_curves(ax, curves: list[RunCurve], x: str, target: float) -> None:
    """Validation accuracy against ``x``: one line per level, so a handover is a break (dotted,
    marked) and not a drop along one line. Each run has a colour; its coarser levels are lighter
    shades of it and each level's resolution is in the legend (a coarse level's accuracy is on
    coarse images: another task). A dashed line at ``target``."""
    colours = plt.get_cmap("tab10")
    for j, c in enumerate(curves):
        pts = [p for p in c.points if x in p]
        stages = list(dict.fromkeys(p.get("stage") for p in pts))
        finest = max((p["n"] for p in pts), default=1)
        prev = None
        for stage in stages:
            seg = [p for p in pts if p.get("stage") == stage]
            n = seg[0]["n"]
            shade = 0.35 + 0.65 * n / finest
            colour = tuple(1 - shade * (1 - v) for v in colours(j % 10)[:3])
            label = f"{c.label} @ {n}x{n}" if len(stages) > 1 else c.label
            ax.plot([p[x] for p in seg], [100 * p["val_accuracy"] for p in seg], "o-", ms=3,
                    color=colour, label=label)
            if prev is not None:  # the handover: previous level's last point -> this level's first
                ax.plot([prev[x], seg[0][x]], [100 * prev["val_accuracy"], 100 * seg[0]["val_accuracy"]],
                        ":", color=colour)
                ax.annotate(f"{prev['n']}->{n}", (seg[0][x], 100 * seg[0]["val_accuracy"]),
                            fontsize=6, xytext=(3, -10), textcoords="offset points")
            prev = seg[-1]
    ax.axhline(100 * target, color="grey", ls="--", lw=0.8, label=f"target {100 * target:.1f}%")


def _depth_plot(curves: list[RunCurve], path: Path) -> Path | None:
    """The paper's Fig. 2 in our terms: for each depth schedule, the validation loss of the
    model each level starts from (prolonged or random) and after each epoch, against depth."""
    depth = [c for c in curves if c.kind == "depth"]
    if not depth:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for c in depth:
        steps = [p["steps"] for p in c.points]
        axes[0].plot(range(len(c.points)), [p.get("train_loss") for p in c.points], "o-",
                     label=c.label)
        inits = [s.get("init_val_loss") for s in c.stage_inits]
        level_steps = sorted(set(steps))
        if len(inits) == len(level_steps):
            axes[1].plot(level_steps, inits, "s--", label=f"{c.label}: at start of level")
        axes[1].plot(steps, [p.get("val_loss") for p in c.points], "o-", alpha=0.6,
                     label=f"{c.label}: after each epoch")
    axes[0].set_xlabel("epoch (all levels)")
    axes[0].set_ylabel("training loss")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xlabel("Euler steps (layers)")
    axes[1].set_ylabel("validation loss")
    return _save_figure(fig, axes, path)


def fig1_kernels(path: Path, image: torch.Tensor | None = None) -> Path:
    """The paper's Fig. 1: an image filtered by the fine stencil of Example 1 (bottom) and its
    restriction filtered by the Galerkin coarse stencil (top)."""
    import torch.nn.functional as F

    from mscnn.transfer import gaussian_blur, restrict_image, restrict_stencil

    if image is None:
        try:
            from mscnn.data import load_mnist

            image = load_mnist("test")[0][0]
        except FileNotFoundError:
            from mscnn.data import synthetic

            image = torch.from_numpy(synthetic(1, 28, seed=3)[0][0])
    s_h = torch.tensor([[-0.89, -2.03, 4.30], [-2.07, 0.00, -2.07], [4.39, -2.03, 1.28]])
    s_H = restrict_stencil(s_h)
    fine = image[None].float()
    coarse = restrict_image(gaussian_blur(fine, 1.0))
    panels = [(coarse[0, 0], "coarse image"), (F.conv2d(coarse, s_H[None, None], padding=1)[0, 0],
                                                "coarse image * Galerkin stencil"),
              (fine[0, 0], "fine image"), (F.conv2d(fine, s_h[None, None], padding=1)[0, 0],
                                           "fine image * fine stencil")]
    fig, axes = plt.subplots(2, 2, figsize=(6, 6))
    for ax, (img, title) in zip(axes.flat, panels, strict=True):
        ax.imshow(img.numpy(), cmap="gray")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle("s_H = R K(s_h) P:\n" + "\n".join(
        " ".join(f"{v:6.2f}" for v in row) for row in s_H.tolist()), fontsize=8, family="monospace")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def make_report(experiment: str = "mscnn", out: str = "outputs/report", target: float = 0.9,
                filter_string: str = "", log_to_mlflow: bool = True, unfinished: bool = False) -> dict:
    """Build the table and plots from MLflow runs (FINISHED ones unless ``unfinished``); returns
    ``{"rows", "table", "plots"}``. The report itself is a run of ``<experiment>-reports``, so the
    schedules' experiment holds only schedules."""
    tracker = Tracker(experiment)
    curves = collect_runs(experiment, tracker, filter_string, unfinished)
    unique_labels(curves)
    if not curves:
        raise ValueError(f"no schedule runs in MLflow experiment {experiment!r} at {tracker.uri}"
                         + (f" matching {filter_string!r}" if filter_string else ""))
    outdir = Path(out)
    outdir.mkdir(parents=True, exist_ok=True)
    rows = summary_rows(curves, target)
    table = markdown(rows, target)
    (outdir / "comparison.md").write_text(table + "\n")
    (outdir / "comparison.json").write_text(json.dumps(rows, indent=1))
    plots = [_curves_plot(curves, "wallclock", "wall-clock (s)", outdir / "val_acc_vs_wallclock.png",
                          target),
             _curves_plot(curves, "fine_equiv_epochs", "fine-grid-equivalent epochs",
                          outdir / "val_acc_vs_compute.png", target),
             _depth_plot(curves, outdir / "depth_loss.png"),
             fig1_kernels(outdir / "fig1_kernels.png")]
    plots = [p for p in plots if p]
    if log_to_mlflow:
        reports = Tracker(f"{experiment}-reports", tracker.uri)
        run = reports.start_run("report", tags={"kind": "report", "target": str(target),
                                                "experiment": experiment},
                                params={"filter": filter_string or "(all)", "runs": len(curves)})
        reports.log_artifacts(run, outdir)
        reports.end_run(run)
    return {"rows": rows, "table": table, "plots": [str(p) for p in plots]}
