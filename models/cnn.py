"""The ``cnn`` family: a small ResNet with GroupNorm, the fast CPU default, for 2D and 3D.

Built from MONAI's layer factories rather than ``monai.networks.nets.ResNet``: in MONAI 1.6.1
``ResNet`` does not pass ``norm`` or ``act`` to its blocks (they keep BatchNorm and in-place ReLU
whatever is asked), and ``ResNetBlock`` ends with ``out += residual``, which Opacus' backward hooks
reject ("Output 0 of BackwardHookFunction is a view and is being modified inplace"). The block
below is MONAI's basic block with GroupNorm, ``inplace=False`` and an out-of-place residual sum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.layers.factories import Conv, Pool
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from torch import nn

from models.checks import check_common_args, check_positive_ints

__all__ = [
    "DEFAULT_WIDTHS",
    "ResNetClassifier",
    "ResNetEncoder",
    "ResidualBlock",
    "build_cnn",
    "check_widths",
]

DEFAULT_WIDTHS: tuple[int, ...] = (16, 32, 64)

_ACT = ("relu", {"inplace": False})


def _norm(spatial_dims: int, channels: int) -> nn.Module:
    # Up to 8 groups; the gcd always divides the width, so any width is accepted.
    groups = math.gcd(channels, 8)
    layer: nn.Module = get_norm_layer(("group", {"num_groups": groups}), spatial_dims, channels)
    return layer


class ResidualBlock(nn.Module):
    """Basic ResNet block: two 3x3 convolutions with GroupNorm and a projected shortcut.

    Parameters
    ----------
    spatial_dims : int
        2 or 3.
    in_channels : int
        Channels coming in.
    out_channels : int
        Channels going out.
    stride : int
        Stride of the first convolution and of the shortcut (2 halves each side).
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.conv1 = conv(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(spatial_dims, out_channels)
        self.act1 = get_act_layer(_ACT)
        self.conv2 = conv(out_channels, out_channels, 3, padding=1, bias=False)
        self.norm2 = _norm(spatial_dims, out_channels)
        self.act2 = get_act_layer(_ACT)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                conv(in_channels, out_channels, 1, stride=stride, bias=False),
                _norm(spatial_dims, out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``act(norm(conv(act(norm(conv(x))))) + shortcut(x))``."""
        out = self.act1(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        # out of place: Opacus hooks forbid "+="
        result: torch.Tensor = self.act2(out + self.shortcut(x))
        return result


_POOLS = {
    "avg": (Pool.ADAPTIVEAVG,),
    "max": (Pool.ADAPTIVEMAX,),
    "avgmax": (Pool.ADAPTIVEAVG, Pool.ADAPTIVEMAX),
}


class ResNetEncoder(nn.Module):
    """Stride-1 3x3 stem, one residual block per width (each after the first halves the size).

    Maps ``(B, C, *spatial)`` to features by global pooling: ``avg`` (``(B, widths[-1])``),
    ``max``, or ``avgmax`` (both, concatenated: ``(B, 2 * widths[-1])``). Max pooling keeps a
    small, local finding (a nodule) from being averaged away over the whole image.

    Parameters
    ----------
    spatial_dims : int
        2 or 3.
    in_channels : int
        Input channels.
    widths : Sequence[int]
        Channels of each stage, for example ``(16, 32, 64)``.
    pool : str
        ``avg``, ``max`` or ``avgmax``.
    """

    def __init__(
        self, spatial_dims: int, in_channels: int, widths: Sequence[int], pool: str = "avgmax"
    ):
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.stem = nn.Sequential(
            conv(in_channels, widths[0], 3, padding=1, bias=False),
            _norm(spatial_dims, widths[0]),
            get_act_layer(_ACT),
        )
        blocks = []
        previous = widths[0]
        for index, width in enumerate(widths):
            blocks.append(ResidualBlock(spatial_dims, previous, width, 1 if index == 0 else 2))
            previous = width
        self.blocks = nn.Sequential(*blocks)
        self.pools = nn.ModuleList([Pool[kind, spatial_dims](1) for kind in _POOLS[pool]])
        self.num_features = previous * len(self.pools)
        for module in self.modules():
            if isinstance(module, conv):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return pooled features of shape ``(B, widths[-1])``."""
        features = self.blocks(self.stem(x))
        return torch.cat([pool(features).flatten(1) for pool in self.pools], dim=1)


class ResNetClassifier(nn.Module):
    """A :class:`ResNetEncoder` followed by a linear head; returns logits ``(B, num_classes)``.

    Parameters
    ----------
    spatial_dims : int
        2 or 3.
    in_channels : int
        Input channels.
    num_classes : int
        Number of logits.
    widths : Sequence[int]
        Channels of each stage.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        num_classes: int,
        widths: Sequence[int],
        pool: str = "avgmax",
    ):
        super().__init__()
        self.encoder = ResNetEncoder(spatial_dims, in_channels, widths, pool)
        self.head = nn.Linear(self.encoder.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(B, num_classes)``."""
        logits: torch.Tensor = self.head(self.encoder(x))
        return logits


def check_widths(widths: Sequence[int], image_size: Sequence[int]) -> tuple[int, ...]:
    """Check ``widths`` against ``image_size`` and return it as a tuple.

    Each stage after the first halves every side, so each side of ``image_size`` must be at
    least ``2 ** (len(widths) - 1)``.

    Parameters
    ----------
    widths : Sequence[int]
        Channels of each stage.
    image_size : Sequence[int]
        ``(H, W)`` or ``(D, H, W)``.

    Returns
    -------
    tuple[int, ...]
        ``widths`` as a tuple.
    """
    check_positive_ints("widths", widths)
    smallest = 2 ** (len(widths) - 1)
    if min(image_size) < smallest:
        raise ValueError(
            f"image_size {tuple(image_size)} is too small for {len(widths)} stages "
            f"(widths={tuple(widths)}): each side must be at least {smallest}; "
            f"pass fewer widths or a larger image"
        )
    return tuple(widths)


def build_cnn(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: Sequence[int],
    widths: Sequence[int] = DEFAULT_WIDTHS,
    pool: str = "avgmax",
) -> nn.Module:
    """Build the small GroupNorm ResNet (about 78k parameters in 2D, 230k in 3D by default).

    Parameters
    ----------
    spatial_dims : int
        2 for ``(B, C, H, W)`` input, 3 for ``(B, C, D, H, W)``.
    in_channels : int
        Input channels.
    num_classes : int
        Number of logits, at least 2.
    image_size : Sequence[int]
        ``(H, W)`` or ``(D, H, W)``; checked against the number of stages.
    widths : Sequence[int]
        Channels of each stage; each stage after the first halves the size.
    pool : str
        Global pooling: ``avg``, ``max`` or ``avgmax`` (default).

    Returns
    -------
    nn.Module
        A :class:`ResNetClassifier`.
    """
    size = check_common_args(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=image_size,
    )
    if pool not in _POOLS:
        raise ValueError(f"pool must be one of {', '.join(_POOLS)}, got {pool!r}")
    return ResNetClassifier(
        spatial_dims, in_channels, num_classes, check_widths(widths, size), pool
    )
