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

Scale-consistent ResNets (``ResNetConfig.stencil``: ``"gaussian"``; ``RESNET_STENCILS``): every
3x3 convolution is a Gaussian-derivative operator with resolution-free coefficients
``(out, in, 6)``, re-discretised on whatever grid it meets (``mscnn.stencils.stencil_conv``); its
sigma is ``stencil_scale`` image widths at the stem and doubles at every 2x coarsening (the same
number of pixels at every stage, as the pyramid's blur per level). Everything that changes the grid
does it the way the pyramid does: a stride-2 convolution is the operator on its input grid followed
by ``restrict_image``, the shortcut's 1x1 stride-2 convolution likewise, and the stem's 3x3 max-pool
becomes ``restrict_image``. So one set of weights is the same continuous network at every
resolution, and ``resnet_to_resolution`` only changes ``n`` (no 9x9 solve). ``input_blur`` (image
widths): the input blurred first, as ``ODENetConfig.input_blur`` (the handover's prefilter,
``resnet_to_resolution(prefilter=...)``); free ResNets take it too.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from mscnn.fields import omit_later
from mscnn.stencils import blur, layer_kind, stencil_conv, stencil_kind
from mscnn.transfer import get_pair, prolong_stencil, restrict_image, restrict_stencil

__all__ = ["RESNET_STENCILS", "ConsistentConv", "ResNetConfig", "build_resnet", "resnet34",
           "resnet_to_resolution"]


# the kinds a ResNet takes: the moment kinds (no blur in the 32 layers after the stem) amplify the
# grid-scale mode ~(2 L / h)^2 per layer: a constant image's float64 round-off grew to 1e24
RESNET_STENCILS = ("free", "gaussian")


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
    # RESNET_STENCILS: "free" (torchvision's 3x3 convolutions) or "gaussian" (scale-consistent)
    stencil: str = "free"
    stencil_scale: float = 0.05  # consistent kinds: the stem's Gaussian sigma, in image widths
    stencil_length: float | None = None  # consistent kinds: the coefficients' normalising length
    input_blur: float = 0.0  # the input's Gaussian blur, in image widths (a prefiltered handover)

    LATER = {"stencil": "free", "stencil_scale": 0.05, "stencil_length": None, "input_blur": 0.0}

    def __post_init__(self) -> None:
        if self.n < 8:
            raise ValueError(f"ResNetConfig.n: images must be at least 8x8, got n={self.n}")
        if self.classes < 1 or self.in_channels < 1 or self.stem_stride not in (1, 2):
            raise ValueError(f"ResNetConfig: classes and in_channels must be >= 1 and stem_stride "
                             f"1 or 2, got {self.classes}, {self.in_channels}, {self.stem_stride}")
        get_pair(self.pair)
        if stencil_kind(self.stencil) not in RESNET_STENCILS:
            raise ValueError(f"ResNetConfig.stencil: {self.stencil!r} does not apply to a ResNet (valid: "
                             f"{list(RESNET_STENCILS)}): without a blur its second differences amplify the "
                             "grid-scale mode ~20x per layer, and 33 layers of it blow round-off up")
        coarsenings = 4 + (self.stem_stride == 2)  # the max-pool and three stride-2 stages (+ stem)
        if self.stencil != "free" and self.n % 2**coarsenings:
            raise ValueError(f"ResNetConfig.n: a {self.stencil} ResNet restricts its grid {coarsenings} "
                             f"times (n divisible by {2**coarsenings}), got n={self.n}")
        for name in ("stencil_scale", "stencil_length", "input_blur"):
            v = getattr(self, name)
            if v is None and name == "stencil_length":
                continue
            number = isinstance(v, (int, float)) and math.isfinite(v)
            if not (number and (v >= 0 if name == "input_blur" else v > 0)):
                raise ValueError(f"ResNetConfig.{name}: must be {'>= 0' if name == 'input_blur' else '> 0'}, "
                                 f"got {v!r}")

    @property
    def boundary(self) -> str:
        """The consistent stencils' and the input blur's boundary: the transfer pair's."""
        return get_pair(self.pair).boundary

    def replace(self, **changes) -> ResNetConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        # model.json of a free ResNet without an input blur stays as it was before these fields
        return omit_later(asdict(self), self.LATER)

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
    if cfg.stencil != "free":
        _make_consistent(net, cfg)
    if cfg.input_blur:
        net.register_forward_pre_hook(_InputBlur(cfg.input_blur, cfg.boundary))
    net.config = cfg
    return net


class _InputBlur:
    """A forward pre-hook: the network's input blurred by ``sigma`` image widths."""

    def __init__(self, sigma: float, boundary: str) -> None:
        self.sigma, self.boundary = sigma, boundary

    def __call__(self, module, args):
        return (blur(args[0], self.sigma, self.boundary), *args[1:])


class ConsistentConv(nn.Module):
    """A 3x3 convolution of a scale-consistent ResNet: ``stencil_conv`` of ``kind`` with
    coefficients ``weight (out, in, 6)`` (no bias: batch norm follows), sigma ``scale`` and length
    ``length`` in image widths; ``stride`` 2 restricts the result (``restrict_image``)."""

    def __init__(self, c_in: int, c_out: int, stride: int, kind: str, scale: float, length: float,
                 pair: str) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"ConsistentConv: stride must be 1 or 2, got {stride}")
        self.stride, self.kind, self.scale, self.length, self.pair = stride, kind, scale, length, pair
        self.boundary = get_pair(pair).boundary
        self.weight = nn.Parameter(torch.empty(c_out, c_in, 6))
        # the fan-in scale of the free kernel it replaces (kaiming, fan_out, as torchvision's)
        nn.init.normal_(self.weight, std=math.sqrt(2.0 / (c_out * 6)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = stencil_conv(x, self.weight, None, self.kind, self.scale, 1, self.length, self.boundary)
        return restrict_image(y, self.pair) if self.stride == 2 else y

    def extra_repr(self) -> str:
        return (f"{self.weight.shape[1]}, {self.weight.shape[0]}, kind={self.kind}, scale={self.scale:g}, "
                f"stride={self.stride}")


class RestrictedConv1x1(nn.Conv2d):
    """The shortcut's 1x1 stride-2 convolution of a consistent ResNet: a 1x1 convolution, then
    ``restrict_image`` (the same parameter as ``nn.Conv2d(c_in, c_out, 1)``)."""

    def __init__(self, c_in: int, c_out: int, pair: str) -> None:
        super().__init__(c_in, c_out, 1, bias=False)
        self.pair = pair

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return restrict_image(F.conv2d(x, self.weight), self.pair)


class Restrict(nn.Module):
    """``restrict_image`` as a module (the consistent ResNet's stem pooling)."""

    def __init__(self, pair: str) -> None:
        super().__init__()
        self.pair = pair

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return restrict_image(x, self.pair)


def _make_consistent(net: nn.Module, cfg: ResNetConfig) -> None:
    """Swap ``net``'s 3x3 convolutions, stride-2 shortcuts and max-pool for their consistent forms
    (module docstring); sigma and length double with every coarsening of the grid."""
    length = cfg.stencil_length if cfg.stencil_length is not None else cfg.stencil_scale
    stage = 0  # 2x coarsenings before the current layer's input

    def conv(old: nn.Conv2d, layer: str) -> ConsistentConv:
        f = 2.0**stage
        return ConsistentConv(old.in_channels, old.out_channels, old.stride[0],
                              layer_kind(cfg.stencil, layer), cfg.stencil_scale * f, length * f, cfg.pair)

    net.conv1 = conv(net.conv1, "opening")
    stage += cfg.stem_stride == 2
    net.maxpool = Restrict(cfg.pair)
    stage += 1
    for name in ("layer1", "layer2", "layer3", "layer4"):
        for block in getattr(net, name):
            block.conv1 = conv(block.conv1, "units")
            stage += block.conv1.stride == 2
            block.conv2 = conv(block.conv2, "units")
            if block.downsample is not None:
                old = block.downsample[0]
                block.downsample[0] = (RestrictedConv1x1(old.in_channels, old.out_channels, cfg.pair)
                                       if old.stride[0] == 2 else old)


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
                         pair: str = "full-weighting", lam: float = 0.0, prefilter: float = 0.0) -> nn.Module:
    """A copy of ``model`` for images ``2**levels`` times finer (``levels < 0``: coarser).

    A consistent ResNet (``config.stencil`` not ``"free"``) keeps every weight: its operators are
    re-discretised on the new grid (``naive``, ``pair`` and ``lam`` do not apply). ``prefilter``
    (pixels per level, as ``mscnn.hierarchy.to_resolution``'s; needs ``model.config``) adds the
    pyramid's blur to the input blur on the way up and takes it off on the way down.

    >>> net = resnet34()
    >>> up = resnet_to_resolution(net, 1)
    >>> torch.allclose(resnet_to_resolution(up, -1).conv1.weight, net.conv1.weight, atol=1e-5)
    True
    """
    cfg = getattr(model, "config", None)
    if isinstance(cfg, ResNetConfig):
        from mscnn.hierarchy import prefiltered_blur

        n = cfg.n * 2**levels if levels >= 0 else cfg.n // 2**-levels
        new_cfg = cfg.replace(n=n, input_blur=prefiltered_blur(cfg.input_blur, cfg.n, n, prefilter))
        if new_cfg.input_blur != cfg.input_blur or cfg.stencil != "free":
            p = next(model.parameters())
            new = build_resnet(new_cfg).to(device=p.device, dtype=p.dtype)
            new.load_state_dict(model.state_dict())
            new.train(model.training)
            if cfg.stencil != "free":
                return new
        else:
            new = copy.deepcopy(model)
            new.config = new_cfg
    elif prefilter or any(isinstance(m, ConsistentConv) for m in model.modules()):
        raise ValueError("resnet_to_resolution: prefilter and consistent stencils need a network "
                         "built by build_resnet (it has .config)")
    else:
        new = copy.deepcopy(model)
    if naive or levels == 0:
        return new
    for m in new.modules():
        if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) == (3, 3):
            w = m.weight.double()
            for _ in range(abs(levels)):
                w = prolong_stencil(w, pair, lam=lam) if levels > 0 else restrict_stencil(w, pair)
            m.weight.copy_(w.to(m.weight.dtype))
    return new
