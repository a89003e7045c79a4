"""The architectures a checkpoint or a schedule can name, and what they have in common.

``model.json`` of a checkpoint holds ``{"arch": ..., **config}``; ``arch`` is ``"odenet"`` (the
paper's ResNet-as-ODE, ``mscnn.ode``; also when the key is missing, as in older checkpoints) or
``"resnet34"`` (``mscnn.resnet``).

>>> cfg = config_from_dict({"arch": "resnet34", "n": 32, "classes": 4})
>>> config_to_dict(cfg)["arch"], build_model(cfg)(torch.zeros(1, 3, 32, 32)).shape
('resnet34', torch.Size([1, 4]))
>>> cost(ODENetConfig(n=28, steps=4)) / cost(ODENetConfig(n=14, steps=4))
4.0
"""

from __future__ import annotations

import torch  # noqa: F401  (the doctest)
from torch import nn

from mscnn.ode import ODENet, ODENetConfig
from mscnn.resnet import ResNetConfig, build_resnet

__all__ = ["ARCHS", "NetConfig", "build_model", "config_from_dict", "config_to_dict", "cost"]

NetConfig = ODENetConfig | ResNetConfig
ARCHS: dict[str, tuple[type, callable]] = {"odenet": (ODENetConfig, ODENet),
                                           "resnet34": (ResNetConfig, build_resnet)}


def arch_of(cfg: NetConfig) -> str:
    for name, (kind, _) in ARCHS.items():
        if isinstance(cfg, kind):
            return name
    raise TypeError(f"not a model config: {type(cfg).__name__}")


def config_to_dict(cfg: NetConfig) -> dict:
    return {"arch": arch_of(cfg), **cfg.to_dict()}


def config_from_dict(d: dict) -> NetConfig:
    d = dict(d)
    arch = d.pop("arch", "odenet")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid: {sorted(ARCHS)}")
    return ARCHS[arch][0].from_dict(d)


def build_model(cfg: NetConfig) -> nn.Module:
    """A freshly initialised network for ``cfg`` (with ``.config == cfg``)."""
    return ARCHS[arch_of(cfg)][1](cfg)


def cost(cfg: NetConfig) -> float:
    """Relative cost of one image through the network, for fine-grid-equivalent compute between
    levels of one schedule: pixels times Euler steps (ODENet), pixels (ResNet)."""
    steps = sum(cfg.unit_steps) if isinstance(cfg, ODENetConfig) else 1
    return float(cfg.n**2 * steps)
