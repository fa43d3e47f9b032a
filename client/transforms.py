"""Preprocessing with MONAI transforms: channel layout, modality-aware intensity, resizing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from monai.transforms import Compose, Resize, ScaleIntensityRange, ScaleIntensityRangePercentiles

from fedrad.errors import ConfigError

CT_WINDOW = (-1000.0, 400.0)
"""Hounsfield window mapped to [0, 1] for CT: lung to soft tissue and contrast."""


@dataclass(frozen=True)
class TransformConfig:
    """What shapes a preprocessed sample; part of any cache key."""

    kind: str = "2d"
    image_size: int = 64
    slices: int = 16
    in_channels: int = 1

    def __post_init__(self) -> None:
        if self.kind not in ("2d", "3d"):
            raise ConfigError(f"kind must be '2d' or '3d', got '{self.kind}'.")
        if self.image_size < 8 or self.slices < 1 or self.in_channels not in (1, 3):
            raise ConfigError(
                "image-size must be at least 8, slices at least 1 and in-channels 1 or 3; "
                f"got {self.image_size}, {self.slices}, {self.in_channels}."
            )

    @property
    def spatial_size(self) -> tuple[int, ...]:
        """Output spatial shape: ``(H, W)`` or ``(D, H, W)``."""
        s = self.image_size
        return (s, s) if self.kind == "2d" else (self.slices, s, s)


def _channels_first(values: np.ndarray, config: TransformConfig) -> np.ndarray:
    """Return ``(C, *spatial)`` with ``config.in_channels`` channels."""
    if config.kind == "2d":
        if values.ndim == 3 and values.shape[-1] in (3, 4):
            values = np.moveaxis(values[..., :3], -1, 0)
        elif values.ndim == 2:
            values = values[None]
        else:
            raise ValueError(f"expected a 2D image, got shape {values.shape}")
    else:
        if values.ndim != 3:
            raise ValueError(f"expected a 3D volume (D, H, W), got shape {values.shape}")
        values = values[None]
    channels = values.shape[0]
    if channels == config.in_channels:
        return values
    if config.in_channels == 1:
        return values.mean(axis=0, keepdims=True)
    return np.repeat(values[:1], config.in_channels, axis=0)


def _intensity(modality: str) -> ScaleIntensityRange | ScaleIntensityRangePercentiles:
    if modality == "CT":
        low, high = CT_WINDOW
        return ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
    return ScaleIntensityRangePercentiles(
        lower=1, upper=99, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
    )


def preprocess(values: np.ndarray, *, modality: str, config: TransformConfig) -> torch.Tensor:
    """Turn decoded modality values into a float32 tensor ``(C, *config.spatial_size)``."""
    image = _channels_first(np.asarray(values, dtype=np.float32), config)
    mode = "bilinear" if config.kind == "2d" else "trilinear"
    pipeline = Compose(
        [
            _intensity(modality.upper()),
            Resize(spatial_size=config.spatial_size, mode=mode, anti_aliasing=True),
        ]
    )
    out = pipeline(image)
    return torch.as_tensor(np.asarray(out), dtype=torch.float32).contiguous()
