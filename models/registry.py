"""The model registry: one name per family and one ``build_model`` that checks before building."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from models.checks import unknown_name_message
from models.cnn import build_cnn
from models.cnn_lstm import build_cnn_lstm
from models.transformer import build_transformer

__all__ = ["DP_GRAD_SAMPLE_MODES", "MODELS", "build_model", "check_model_name", "check_options"]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "cnn": build_cnn,
    "cnn-lstm": build_cnn_lstm,
    "transformer": build_transformer,
}

DP_GRAD_SAMPLE_MODES: dict[str, str] = {
    "cnn": "functorch",
    "cnn-lstm": "hooks",
    "transformer": "hooks",
}
"""How Opacus computes each family's per-sample gradients under DP-SGD (``grad_sample_mode``).

The same gradients either way (a test compares them); only the speed differs. On CPU, for the
convolution-heavy ``cnn``, functorch's vectorised per-sample gradients take about 1.7x a plain
step where the hooks' unfold-based convolution sampler takes about 2.4-2.9x; for the other two
the hooks are faster (``bench/privacy_speed.py`` measures it).
"""

_COMMON_ARGS = frozenset({"spatial_dims", "in_channels", "num_classes", "image_size"})


def check_model_name(name: str) -> None:
    """Raise ``ValueError`` naming the closest known model if ``name`` is not in :data:`MODELS`.

    Parameters
    ----------
    name : str
        A model name such as ``"cnn"``.
    """
    if name not in MODELS:
        raise ValueError(unknown_name_message("model", str(name), MODELS))


def check_options(name: str, options: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` if ``options`` holds a key the model ``name`` does not take.

    Parameters
    ----------
    name : str
        A known model name.
    options : Mapping[str, Any]
        Model-specific keyword arguments, for example ``{"widths": (16, 32, 64)}``.
    """
    check_model_name(name)
    accepted = set(inspect.signature(MODELS[name]).parameters) - _COMMON_ARGS
    for key in options:
        if key not in accepted:
            message = unknown_name_message("option", key, accepted) if accepted else ""
            raise ValueError(f"model {name!r}: {message or f'takes no option {key!r}'}")


def build_model(
    name: str,
    *,
    spatial_dims: int,
    in_channels: int,
    num_classes: int,
    image_size: Sequence[int],
    **options: Any,
) -> nn.Module:
    """Build the model ``name``; it maps ``(B, C, *image_size)`` to logits ``(B, num_classes)``.

    Parameters
    ----------
    name : str
        One of :data:`MODELS`: ``"cnn"``, ``"cnn-lstm"`` or ``"transformer"``.
    spatial_dims : int
        2 for input ``(B, C, H, W)``, 3 for ``(B, C, D, H, W)`` with D slices.
    in_channels : int
        Input channels.
    num_classes : int
        Number of logits, at least 2 (binary tasks use 2 logits with cross-entropy).
    image_size : Sequence[int]
        ``(H, W)`` for 2D, ``(D, H, W)`` for 3D.
    **options : Any
        Family-specific options, for example ``widths`` for ``"cnn"``.

    Returns
    -------
    nn.Module
        A model in training mode whose forward returns one tensor of logits.

    Raises
    ------
    ValueError
        For an unknown name or option, or an invalid value.
    """
    check_options(name, options)
    return MODELS[name](
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=image_size,
        **options,
    )
