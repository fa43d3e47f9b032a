"""The ``transformer`` family: a small MONAI ViT that returns logits only, ready for Opacus.

Two changes to MONAI's ``ViT`` make it train under Opacus, and train fast:

- ``forward`` returns logits only (MONAI returns ``(logits, hidden_states)``), the head is a plain
  ``nn.Linear`` (no ``Tanh``), and parameters the forward never reaches (each block's
  ``norm_cross_attn``) are frozen, since Opacus wants a per-sample gradient for every trainable one.
- The class token moves from the ``ViT`` itself into a small :class:`ClassToken` module. Opacus
  falls back to functorch for any module that owns a parameter directly, and for ``ViT`` that
  meant re-running the whole network per sample (a DP step about 2.5x a plain step on 2 CPU
  threads, against about 1.3x with the move). Now only ``ClassToken`` and the patch embedding
  (which owns the position embeddings) use functorch; the blocks use Opacus' own samplers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.vit import ViT
from torch import nn

from models.checks import (
    check_common_args,
    check_positive_int,
    check_positive_ints,
    freeze_unused_parameters,
)

__all__ = ["ClassToken", "ViTClassifier", "build_transformer", "default_patch_size"]

_PREFERRED_PATCH = {2: (4, 4), 3: (4, 8, 8)}


class ClassToken(nn.Module):
    """Prepend a learned class token: ``(B, N, hidden)`` -> ``(B, N + 1, hidden)``.

    Parameters
    ----------
    token : nn.Parameter
        The token, of shape ``(1, 1, hidden)``.
    """

    def __init__(self, token: nn.Parameter):
        super().__init__()
        self.token = token

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``x`` with the class token in front of its tokens."""
        return torch.cat((self.token.expand(x.shape[0], -1, -1), x), dim=1)


class ViTClassifier(ViT):
    """MONAI ``ViT`` classifier whose forward returns logits ``(B, num_classes)`` only.

    Parameters
    ----------
    in_channels : int
        Input channels.
    img_size : Sequence[int]
        ``(H, W)`` or ``(D, H, W)``.
    patch_size : Sequence[int]
        Patch length per side, dividing ``img_size``.
    hidden_size, mlp_dim, num_layers, num_heads : int
        Token width, MLP width, number of blocks, attention heads.
    num_classes : int
        Number of logits.
    dropout_rate : float
        Dropout in [0, 1).
    spatial_dims : int
        2 or 3.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        img_size: Sequence[int],
        patch_size: Sequence[int],
        hidden_size: int,
        mlp_dim: int,
        num_layers: int,
        num_heads: int,
        num_classes: int,
        dropout_rate: float,
        spatial_dims: int,
    ):
        super().__init__(
            in_channels=in_channels,
            img_size=img_size,
            patch_size=patch_size,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            classification=True,
            num_classes=num_classes,
            dropout_rate=dropout_rate,
            spatial_dims=spatial_dims,
            post_activation=None,  # a plain Linear head: MONAI's default "Tanh" squashes logits
        )
        token = self.cls_token
        del self.cls_token
        self.class_token = ClassToken(token)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits ``(B, num_classes)`` read from the class token."""
        tokens = self.class_token(self.patch_embedding(x))
        for block in self.blocks:
            tokens = block(tokens)
        logits: torch.Tensor = self.classification_head(self.norm(tokens)[:, 0])
        return logits


def default_patch_size(image_size: Sequence[int]) -> tuple[int, ...]:
    """Pick a patch size that divides ``image_size``: 4 per side in 2D, (4, 8, 8) in 3D.

    Where the preferred size does not divide a side, the divisor of that side closest to it is
    used (28 -> 7 instead of 8).

    Parameters
    ----------
    image_size : Sequence[int]
        ``(H, W)`` or ``(D, H, W)``.

    Returns
    -------
    tuple[int, ...]
        One patch length per side.
    """
    patch = []
    for side, preferred in zip(image_size, _PREFERRED_PATCH[len(image_size)], strict=True):
        divisors = [d for d in range(1, side + 1) if side % d == 0]
        patch.append(min(divisors, key=lambda d: (abs(d - preferred), -d)))
    return tuple(patch)


def _check_patch_size(
    patch_size: int | Sequence[int], image_size: tuple[int, ...]
) -> tuple[int, ...]:
    if isinstance(patch_size, int):
        check_positive_int("patch_size", patch_size)
        patch_size = (patch_size,) * len(image_size)
    check_positive_ints("patch_size", patch_size, length=len(image_size))
    patch = tuple(patch_size)
    if any(side % p for side, p in zip(image_size, patch, strict=True)):
        hint = ", ".join(
            f"{side}: {[d for d in range(1, side + 1) if side % d == 0]}" for side in image_size
        )
        raise ValueError(
            f"patch_size {patch} must divide image_size {image_size} side by side; "
            f"choose from the divisors of each side ({hint})"
        )
    return patch


def build_transformer(
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: Sequence[int],
    patch_size: int | Sequence[int] | None = None,
    hidden_size: int = 96,
    mlp_dim: int = 192,
    num_layers: int = 3,
    num_heads: int = 4,
    dropout_rate: float = 0.0,
) -> nn.Module:
    """Build a small ViT classifier (about 250k parameters for 64x64 images by default).

    Parameters
    ----------
    spatial_dims : int
        2 for ``(B, C, H, W)`` input, 3 for ``(B, C, D, H, W)``.
    in_channels : int
        Input channels.
    num_classes : int
        Number of logits, at least 2.
    image_size : Sequence[int]
        ``(H, W)`` or ``(D, H, W)``; the ViT is built for exactly this size.
    patch_size : int or Sequence[int] or None
        Patch length per side; must divide ``image_size``. ``None`` picks
        :func:`default_patch_size`.
    hidden_size : int
        Token width; must be divisible by ``num_heads``.
    mlp_dim : int
        Width of each block's MLP.
    num_layers : int
        Number of transformer blocks.
    num_heads : int
        Attention heads per block.
    dropout_rate : float
        Dropout in [0, 1).

    Returns
    -------
    nn.Module
        A :class:`ViTClassifier` with unused parameters frozen.
    """
    size = check_common_args(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=image_size,
    )
    patch = default_patch_size(size) if patch_size is None else _check_patch_size(patch_size, size)
    for name, value in (
        ("hidden_size", hidden_size),
        ("mlp_dim", mlp_dim),
        ("num_layers", num_layers),
        ("num_heads", num_heads),
    ):
        check_positive_int(name, value)
    if hidden_size % num_heads:
        raise ValueError(
            f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads}); "
            f"for example hidden_size={num_heads * max(1, hidden_size // num_heads)}"
        )
    if not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {dropout_rate!r}")
    model = ViTClassifier(
        in_channels=in_channels,
        img_size=size,
        patch_size=patch,
        hidden_size=hidden_size,
        mlp_dim=mlp_dim,
        num_layers=num_layers,
        num_heads=num_heads,
        num_classes=num_classes,
        dropout_rate=dropout_rate,
        spatial_dims=spatial_dims,
    )
    freeze_unused_parameters(model, (1, in_channels, *size))
    return model
