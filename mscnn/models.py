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

__all__ = ["ARCHS", "NetConfig", "build_model", "config_from_dict", "config_to_dict", "cost", "handover"]

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


def _ode_handover(model: nn.Module, target: ODENetConfig, naive: bool = False, lam: float = 0.0,
                  galerkin=("opening", "units"), prefilter: float = 0.0, dilate: bool = False
                  ) -> tuple[nn.Module, list[str]]:
    from mscnn.hierarchy import to_depth, to_resolution

    done = []
    if model.config.n != target.n:
        model = to_resolution(model, target.n, naive=naive, lam=lam, galerkin=galerkin, prefilter=prefilter,
                              dilate=dilate)
        opts = [", naive"] if naive else []
        opts += [", dilate"] if dilate else []
        opts += [f", prefilter={prefilter:g}"] if prefilter else []
        opts += [f", lam={lam:g}"] if lam else []
        opts += [f", galerkin={list(galerkin)}"] if set(galerkin) != {"opening", "units"} else []
        done.append(f"to_resolution({target.n}{''.join(opts)})")
    if model.config.unit_steps != target.unit_steps:
        model = to_depth(model, target.unit_steps)
        done.append(f"to_depth({target.unit_steps})")
    return model, done


def _resnet_handover(model: nn.Module, target: ResNetConfig, naive: bool = False, lam: float = 0.0,
                     galerkin=None, prefilter: float = 0.0, dilate: bool = False
                     ) -> tuple[nn.Module, list[str]]:
    import math

    from mscnn.resnet import resnet_to_resolution

    if dilate:
        raise ValueError("dilate: an ODE-network handover (model.arch: odenet), not resnet34")
    if model.config.n == target.n:
        return model, []
    levels = round(math.log2(target.n / model.config.n))
    if model.config.n * 2.0**levels != target.n:
        raise ValueError(f"n: {target.n} is not {model.config.n} times a power of 2")
    model = resnet_to_resolution(model, levels, naive=naive, pair=target.pair, lam=lam, prefilter=prefilter)
    opts = (", naive" if naive else "") + (f", prefilter={prefilter:g}" if prefilter else "")
    opts += f", lam={lam:g}" if lam else ""
    return model, [f"resnet_to_resolution({target.n}{opts})"]


HANDOVERS = {"odenet": _ode_handover, "resnet34": _resnet_handover}


def handover(model: nn.Module, target: NetConfig, **options) -> tuple[nn.Module, list[str]]:
    """``model`` moved to the architecture ``target`` (resolution, depth), by the handover of its
    arch; returns the moved network and the transfers done, as text for the lineage. ``options``:
    ``naive``, ``lam``, ``galerkin``, ``prefilter``, ``dilate`` (see ``mscnn.hierarchy.to_resolution``)."""
    return HANDOVERS[arch_of(target)](model, target, **options)
