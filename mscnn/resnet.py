"""ResNet-34 as in the paper's Sec. 4.3, and moving it across image resolutions.

``resnet34``: torchvision's ResNet-34 with a 3x3 first convolution (stride ``stem_stride``, default 1)
in place of the 7x7, and global average pooling straight into the softmax classifier (torchvision's
``avgpool`` + ``fc``). Global pooling makes the network accept any input size, so it can be trained
on coarse images and continued on fine ones.

``resnet_to_resolution(model, levels)``: a copy whose 3x3 convolution stencils are Galerkin-prolonged
(``levels > 0``: images ``2**levels`` times finer) or restricted (``levels < 0``) with
``mscnn.transfer``; 1x1 convolutions, batch norm and the classifier are unchanged. The transfer is
exact for stride-1 convolutions between grids of the same kind (``mscnn.transfer``); the stride-2
3x3 convolutions get the same map, an approximation. ``naive=True`` copies the network unchanged.

``ResNetConfig`` / ``build_resnet``: the network's description (with the image size ``n`` it is
trained at), for checkpoints and schedules; ``build_resnet(cfg).config`` is ``cfg``, and
``resnet_to_resolution`` updates ``n`` in the copy's config.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, fields, replace

import torch
from torch import nn

from mscnn.transfer import get_pair, prolong_stencil, restrict_stencil

__all__ = ["ResNetConfig", "build_resnet", "resnet34", "resnet_to_resolution"]


@dataclass(frozen=True)
class ResNetConfig:
    """A ``resnet34`` and the image size ``n`` it works at (global pooling accepts any n >= 8).

    >>> ResNetConfig.from_dict(ResNetConfig(n=112).to_dict()) == ResNetConfig(n=112)
    True
    """

    classes: int = 10
    in_channels: int = 3
    n: int = 224
    stem_stride: int = 1
    pair: str = "full-weighting"  # the transfer pair resnet_to_resolution uses in schedules

    def __post_init__(self) -> None:
        if self.n < 8:
            raise ValueError(f"ResNetConfig.n: images must be at least 8x8, got n={self.n}")
        if self.classes < 1 or self.in_channels < 1 or self.stem_stride not in (1, 2):
            raise ValueError(f"ResNetConfig: classes and in_channels must be >= 1 and stem_stride "
                             f"1 or 2, got {self.classes}, {self.in_channels}, {self.stem_stride}")
        get_pair(self.pair)

    def replace(self, **changes) -> ResNetConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ResNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"ResNetConfig: unknown fields {unknown}; valid: {sorted(known)}")
        return cls(**d)


def build_resnet(cfg: ResNetConfig) -> nn.Module:
    """``resnet34`` as ``cfg`` describes it, with ``cfg`` attached as ``.config``."""
    net = resnet34(cfg.classes, cfg.in_channels, cfg.stem_stride)
    net.config = cfg
    return net


def resnet34(classes: int = 10, in_channels: int = 3, stem_stride: int = 1) -> nn.Module:
    """ResNet-34 with a 3x3 stem: ``(B, in_channels, n, n) -> logits (B, classes)`` for any ``n >= 8``.

    >>> net = resnet34(classes=10)
    >>> net.conv1.weight.shape, net(torch.zeros(2, 3, 32, 32)).shape
    (torch.Size([64, 3, 3, 3]), torch.Size([2, 10]))
    >>> sum(p.numel() for p in net.parameters())  # torchvision 21,289,802 less the 7x7 stem
    21282122
    """
    from torchvision.models import resnet34 as tv_resnet34  # here: torchvision's import costs 1.3 s

    net = tv_resnet34(weights=None, num_classes=classes)
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=stem_stride, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return net


@torch.no_grad()
def resnet_to_resolution(model: nn.Module, levels: int, naive: bool = False,
                         pair: str = "full-weighting", lam: float = 0.0) -> nn.Module:
    """A copy of ``model`` for images ``2**levels`` times finer (``levels < 0``: coarser).

    >>> net = resnet34()
    >>> up = resnet_to_resolution(net, 1)
    >>> torch.allclose(resnet_to_resolution(up, -1).conv1.weight, net.conv1.weight, atol=1e-5)
    True
    """
    new = copy.deepcopy(model)
    cfg = getattr(new, "config", None)
    if isinstance(cfg, ResNetConfig):
        n = cfg.n * 2**levels if levels >= 0 else cfg.n // 2**-levels
        new.config = cfg.replace(n=n)
    if naive or levels == 0:
        return new
    for m in new.modules():
        if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (3, 3):
            w = m.weight.double()
            for _ in range(abs(levels)):
                w = prolong_stencil(w, pair, lam=lam) if levels > 0 else restrict_stencil(w, pair)
            m.weight.copy_(w.to(m.weight.dtype))
    return new
