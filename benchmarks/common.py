"""Shared by the benchmarks: the machine line, table formatting and logging results to MLflow."""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from the repository root
    sys.path.insert(0, str(ROOT))


def machine() -> str:
    """One line naming the machine, the date and the library versions."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{time.strftime('%Y-%m-%d')}, {platform.machine()} {os.cpu_count()} cores, {gpu}, "
            f"torch {torch.__version__}, {torch.get_num_threads()} torch threads")


def unit_channels(values: list[int]) -> int | tuple[int, ...]:
    """``--channels``: one unit, or one unit per entry (connective restrictions between them)."""
    return values[0] if len(values) == 1 else tuple(values)


def mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.2f} +- {sd:.2f}"


def log_benchmark(name: str, params: dict, metrics: dict[str, float], files: list[Path]) -> str | None:
    """One MLflow run (experiment ``mscnn-benchmarks``, tracking URI as everywhere in the project)
    with ``params``, ``metrics`` and the result ``files`` as artifacts. Returns the run id, or None
    (with a message) when MLflow cannot be reached: a benchmark's numbers are never lost to that."""
    try:
        from pipelines.tracking import Tracker

        tr = Tracker("mscnn-benchmarks")
        run = tr.start_run(name, tags={"kind": "benchmark", "benchmark": name}, params=params)
        tr.log_metrics(run, metrics, step=0)
        for f in files:
            tr.log_artifacts(run, f)
        tr.end_run(run)
        print(f"logged to MLflow: {tr.uri} run {run}")
        return run
    except Exception as e:  # noqa: BLE001 - report and keep the files
        print(f"MLflow logging skipped: {type(e).__name__}: {e}")
        return None


def publish(out: str | Path, stem: str, text: str, data: dict, params: dict,
            metrics: dict[str, float]) -> list[Path]:
    """Print a benchmark's table ``text``, write ``<out>/<stem>.md`` and ``<stem>.json`` (``data``)
    and log both with ``params`` and ``metrics`` to MLflow (``log_benchmark``)."""
    print("\n" + text)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"{stem}.md", out / f"{stem}.json"]
    files[0].write_text(text.rstrip("\n") + "\n")
    files[1].write_text(json.dumps(data, indent=1, default=str))
    log_benchmark(stem, params, metrics, files)
    return files


def metrics_of(d, prefix: str = "") -> dict[str, float]:
    """The int/float leaves of a nested dict (a JSON result) as MLflow metrics named ``a.b.c``,
    each part reduced to letters, digits, ``-`` and ``_`` (``coarse then fine (naive)`` ->
    ``coarse_then_fine_naive``)."""
    out = {}
    for k, v in d.items() if isinstance(d, dict) else []:
        key = prefix + re.sub(r"[^\w\-]+", "_", str(k)).strip("_")
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[key] = float(v)
        elif isinstance(v, dict):
            out.update(metrics_of(v, key + "."))
    return out


if __name__ == "__main__":  # log results written where MLflow was not installed (the GPU machine)
    import argparse

    ap = argparse.ArgumentParser(description="Log a benchmark's result files (written elsewhere, "
                                 "e.g. on a GPU machine without MLflow) to the MLflow experiment "
                                 "mscnn-benchmarks: params from the JSON's 'args', metrics from its "
                                 "numbers.")
    ap.add_argument("json", type=Path)
    ap.add_argument("files", type=Path, nargs="*", help="more artifacts (the .md beside it is added)")
    a = ap.parse_args()
    data = json.loads(a.json.read_text())
    extra = [f for f in [a.json.with_suffix(".md"), *a.files] if f.exists()]
    if log_benchmark(a.json.stem, data.get("args", {}), metrics_of(data), [a.json, *extra]) is None:
        sys.exit(1)


def alternate(paths: dict, repeats: int) -> dict[str, list]:
    """Run every path (a name -> zero-argument callable) once per round, ``repeats`` rounds (A B A
    B ...): machine noise falls on all of them alike. Each round starts one path later (A B C, B C
    A, C A B, ...; two paths: A B, B A, A B), so no path always runs first: what the path before
    leaves behind (Ray actors still exiting, a warm cache) does not always fall on the same one.
    Returns each path's results in round order."""
    out: dict[str, list] = {name: [] for name in paths}
    names = list(paths)
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            run = paths[name]
            print(f"round {r + 1}/{repeats}: {name}", flush=True)
            out[name].append(run())
    return out


def paired_ratio(a: list[float], b: list[float]) -> dict:
    """The per-round ratios ``a[i] / b[i]`` as median and min-max, with the load average at the
    end, and whether the spread is narrower than the effect the median claims (its distance from
    1): a ratio whose spread is wider than that claims nothing."""
    ratios = [x / y for x, y in zip(a, b, strict=True)]
    med = statistics.median(ratios)
    spread = max(ratios) - min(ratios)
    return {"median": med, "min": min(ratios), "max": max(ratios), "ratios": ratios,
            "load_avg_1m": os.getloadavg()[0], "conclusive": spread < abs(med - 1)}


def fmt_ratio(r: dict) -> str:
    return (f"{r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}]"
            + ("" if r["conclusive"] else " (INCONCLUSIVE: spread wider than the effect)"))
