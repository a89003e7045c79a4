"""Checkpoints as folders: ``model.pt`` (a plain state_dict, loads with ``weights_only=True``),
``model.json`` (the architecture and its config, ``mscnn.models``: an ``ODENet`` or a ResNet-34)
and ``lineage.json`` (the stage and transfer that made it).

A checkpoint is written into a temporary sibling folder and renamed into place when whole, so a
crash never leaves a folder that looks like a complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from mscnn.models import build_model, config_from_dict, config_to_dict

__all__ = ["load_checkpoint", "save_checkpoint"]

FILES = ("model.pt", "model.json", "lineage.json")


def save_checkpoint(path: str | os.PathLike, model: nn.Module, lineage: dict | None = None) -> Path:
    """Write ``model`` (an ``ODENet`` or ``mscnn.resnet.build_resnet`` network: it has ``.config``)
    to the folder ``path`` (replacing an older checkpoint there) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        torch.save(state, tmp / "model.pt")
        (tmp / "model.json").write_text(json.dumps(config_to_dict(model.config), indent=1))
        (tmp / "lineage.json").write_text(json.dumps(lineage or {}, indent=1, default=str))
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old)
        else:
            tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str = "cpu") -> tuple[nn.Module, dict]:
    """Load a checkpoint folder: ``(model, lineage)``. Errors name the folder and missing file."""
    path = Path(path)
    missing = [f for f in FILES if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint {path} is incomplete: missing {missing}")
    try:
        cfg = config_from_dict(json.loads((path / "model.json").read_text()))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path / 'model.json'}: {e}") from None
    # the sizes model.json promises are checked against model.pt's tensors (memory-mapped, not
    # read) on a network built on the meta device: a small file cannot make us allocate gigabytes
    try:
        state = torch.load(path / "model.pt", map_location=map_location, weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError) as e:
        raise ValueError(f"{path / 'model.pt'}: not a readable state dict ({e})") from None
    with torch.device("meta"):
        probe = build_model(cfg)
    want = {k: tuple(v.shape) for k, v in probe.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()} if isinstance(state, dict) else {}
    if want != have:
        diff = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))[:5]
        raise ValueError(f"{path / 'model.pt'} does not match {path / 'model.json'}: tensors differ "
                         + ", ".join(f"{k} {have.get(k)} (json: {want.get(k)})" for k in diff))
    model = build_model(cfg)
    model.load_state_dict(state)
    return model, json.loads((path / "lineage.json").read_text())
