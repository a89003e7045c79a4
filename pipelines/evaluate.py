"""Cross-resolution evaluation of two trained checkpoints (the paper's Sec. 4.1), on a pyramid,
logged to MLflow."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mscnn.checkpoint import load_checkpoint
from mscnn.data import Split
from mscnn.hierarchy import PREFILTER_FACTORS, choose_prefilter, handover_sigma, to_resolution
from mscnn.ode import ODENet
from mscnn.train import accuracy
from pipelines.pyramid import input_scale, level_for, level_tensors, read_manifest
from pipelines.tracking import Tracker

__all__ = ["evaluate_checkpoints", "transfer_rows"]


def evaluate_checkpoints(fine: str | os.PathLike, coarse: str | os.PathLike,
                         pyramid: str | os.PathLike, split: str = "val",
                         pairs: list[str] | None = None, experiment: str | None = "mscnn-evaluations",
                         tags: dict | None = None) -> list[dict]:
    """Rows of the Sec. 4.1 table for a fine- and a coarse-trained checkpoint on ``split`` of the
    pyramid (images scaled by its recorded normalisation). ``pairs`` default to the pyramid's pair:
    the coarse images were made with it. The ``-prefilter-chosen`` rows pick their sigma on the
    pyramid's ``val`` split whatever ``split`` is (on ``val`` itself they read optimistic). Logs one
    MLflow run when ``experiment`` is given (an experiment of its own by default: evaluations are
    not schedules to compare)."""
    fine_m, _ = load_checkpoint(fine)
    coarse_m, _ = load_checkpoint(coarse)
    for path, m in ((fine, fine_m), (coarse, coarse_m)):
        if not isinstance(m, ODENet):
            raise ValueError(f"checkpoint {path} holds a {type(m).__name__}; the cross-resolution "
                             "table is for ODE networks (model.arch: odenet)")
    if fine_m.n <= coarse_m.n:
        raise ValueError(f"fine checkpoint {fine} (n={fine_m.n}) must be finer than coarse "
                         f"{coarse} (n={coarse_m.n})")
    man = read_manifest(pyramid)
    scale = torch.tensor(input_scale(man)).view(1, -1, 1, 1)

    def data(model, what, which=split):
        s = level_tensors(pyramid, level_for(man, model.n, what), which)
        return Split(s.x * scale, s.y)

    fine_eval, coarse_eval = data(fine_m, f"fine checkpoint {fine}"), data(coarse_m, f"coarse {coarse}")
    fine_val = fine_eval if split == "val" else data(fine_m, f"fine checkpoint {fine}", "val")
    rows = []
    for pair in pairs or [man["pair"]]:
        rows += transfer_rows(fine_m, coarse_m, fine_eval, coarse_eval, pair,
                              handover_sigma(man["sigma"], man["pair"]) if man.get("sigma") else 0.0,
                              choose_on=fine_val)
    if experiment:
        tr = Tracker(experiment)
        run = tr.start_run(f"evaluate-{fine_m.n}-{coarse_m.n}",
                           tags={"kind": "evaluate", **(tags or {})},
                           params={"fine": str(fine), "coarse": str(coarse), "split": split,
                                   "pyramid": Path(pyramid).name})
        def key(r: dict) -> str:
            return f"{r['pair']}/{r['direction'].replace('->', '_to_')}/{r['method']}"

        metrics = {key(r): r["accuracy"] for r in rows}
        metrics |= {key(r) + "/sigma": r["sigma"] for r in rows if "sigma" in r}  # chosen prefilter, px
        tr.log_metrics(run, metrics, step=0)
        tr.log_dict(run, {"rows": rows}, "cross_resolution.json")
        tr.end_run(run)
    return rows


def transfer_rows(fine: ODENet, coarse: ODENet, fine_eval: Split, coarse_eval: Split,
                  pair: str, sigma: float = 0.0, choose_on: Split | None = None) -> list[dict]:
    """Native accuracy of both networks, and each moved to the other's resolution with Galerkin
    stencils and naively (``pair`` for both stencils and ``W``); networks with scale-consistent
    stencils (``stencil`` other than ``free``) are re-discretised, one row ``consistent`` per
    direction. With a prefilter ``sigma`` (pixels; ``evaluate`` passes the pyramid's
    ``handover_sigma``: its blur and its restriction's smoothing), every coarse -> fine move also
    prefiltered (``<method>-prefilter``: ``to_resolution(prefilter=sigma)``), and fine -> coarse
    too when the fine network carries an input blur (which that move takes off). A free coarse
    network also moves up by ``dilate`` (its stencils' taps kept at their physical offsets), and
    ``dilate-prefilter`` with ``sigma``; a dilated free fine network (``ODENetConfig.dilation``)
    moves down the same way. With ``choose_on`` (fine images of a validation split) and ``sigma``,
    each prefiltered coarse -> fine move once more with the prefilter ``choose_prefilter`` picks on
    it among ``PREFILTER_FACTORS`` times ``sigma`` (``<method>-prefilter-chosen``, the row also
    carries that ``sigma``). Rows ``{pair, direction, method, accuracy}``."""
    rows = [
        dict(pair=pair, direction="fine", method="native", accuracy=accuracy(fine, fine_eval)),
        dict(pair=pair, direction="coarse", method="native", accuracy=accuracy(coarse, coarse_eval)),
    ]
    free = "free" in (fine.config.stencil, coarse.config.stencil)
    for naive in (False, True) if free else (False,):
        method = ("naive" if naive else "galerkin") if free else "consistent"
        up = to_resolution(coarse, fine.n, naive=naive, pair=pair)
        rows.append(dict(pair=pair, direction="coarse->fine", method=method,
                         accuracy=accuracy(up, fine_eval)))
        down = to_resolution(fine, coarse.n, naive=naive, pair=pair)
        rows.append(dict(pair=pair, direction="fine->coarse", method=method,
                         accuracy=accuracy(down, coarse_eval)))
        if sigma:
            up = to_resolution(coarse, fine.n, naive=naive, pair=pair, prefilter=sigma)
            rows.append(dict(pair=pair, direction="coarse->fine", method=method + "-prefilter",
                             accuracy=accuracy(up, fine_eval)))
        if sigma and choose_on is not None:
            rows.append(_chosen(coarse, fine.n, fine_eval, choose_on, pair, sigma, method, naive=naive))
        if sigma and fine.config.input_blur:
            down = to_resolution(fine, coarse.n, naive=naive, pair=pair, prefilter=sigma)
            rows.append(dict(pair=pair, direction="fine->coarse", method=method + "-prefilter",
                             accuracy=accuracy(down, coarse_eval)))
    if coarse.config.stencil == "free":
        for blur in (0.0, sigma) if sigma else (0.0,):
            up = to_resolution(coarse, fine.n, pair=pair, prefilter=blur, dilate=True)
            rows.append(dict(pair=pair, direction="coarse->fine", method="dilate" + "-prefilter" * bool(blur),
                             accuracy=accuracy(up, fine_eval)))
        if sigma and choose_on is not None:
            rows.append(_chosen(coarse, fine.n, fine_eval, choose_on, pair, sigma, "dilate", dilate=True))
    if fine.config.stencil == "free" and fine.config.dilation * coarse.n >= fine.n:  # a dilated fine net
        down = to_resolution(fine, coarse.n, pair=pair, prefilter=sigma, dilate=True)
        rows.append(dict(pair=pair, direction="fine->coarse", method="dilate" + "-prefilter" * bool(sigma),
                         accuracy=accuracy(down, coarse_eval)))
    return rows


def _chosen(coarse: ODENet, n: int, fine_eval: Split, choose_on: Split, pair: str, sigma: float,
            method: str, **move) -> dict:
    """The ``<method>-prefilter-chosen`` row: the prefilter picked on ``choose_on``."""
    sigmas = [f * sigma for f in PREFILTER_FACTORS]
    best, _ = choose_prefilter(coarse, n, choose_on, sigmas, pair=pair, **move)
    up = to_resolution(coarse, n, pair=pair, prefilter=best, **move)
    return dict(pair=pair, direction="coarse->fine", method=method + "-prefilter-chosen",
                accuracy=accuracy(up, fine_eval), sigma=best)
