"""The model a run starts from: the network its run config names, and its initial weights.

Framework-free (PyTorch only): ``fedrad`` commands and benchmarks build the same network and
weights as the coordinator from a run config and a seed.
"""

from __future__ import annotations

import numpy as np
import torch

from fedrad.core.config import RunConfig
from models import ModelSpec

__all__ = ["initial_arrays", "model_spec"]


def model_spec(config: RunConfig) -> ModelSpec:
    """The network a run trains, from its run config."""
    size = config.image_size
    return ModelSpec(
        name=config.model,
        spatial_dims=2 if config.kind == "2d" else 3,
        in_channels=config.in_channels,
        num_classes=config.num_classes,
        image_size=(size, size) if config.kind == "2d" else (config.slices, size, size),
        options={},
    )


def initial_arrays(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """Deterministic initial weights for a seed."""
    torch.manual_seed(seed)
    model = spec.build()
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
