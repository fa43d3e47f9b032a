"""Argument checks shared by every model family, and the unused-parameter check Opacus needs.

Every check raises ``ValueError`` with a message that says what is wrong and how to fix it.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "check_common_args",
    "check_positive_int",
    "check_positive_ints",
    "freeze_unused_parameters",
    "unknown_name_message",
]

_AXES = {2: "(H, W)", 3: "(D, H, W)"}


def unknown_name_message(kind: str, name: str, known: Iterable[str]) -> str:
    """Return "unknown KIND 'NAME'; did you mean ...? Known KINDs: ..." for an unknown name.

    Parameters
    ----------
    kind : str
        What the name names, for example ``"model"`` or ``"option"``.
    name : str
        The name that was asked for.
    known : Iterable[str]
        The names that exist.
    """
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" did you mean '{close[0]}'?" if close else ""
    return f"unknown {kind} {name!r};{hint} Known {kind}s: {', '.join(known)}"


def check_positive_int(name: str, value: int) -> None:
    """Check that ``value`` is a positive int (not a bool).

    Parameters
    ----------
    name : str
        The argument's name, for the error message.
    value : int
        The value to check.
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_positive_ints(name: str, values: Sequence[int], *, length: int | None = None) -> None:
    """Check that ``values`` is a sequence of positive ints, of ``length`` entries if given.

    Parameters
    ----------
    name : str
        The argument's name, for the error message.
    values : Sequence[int]
        The values to check.
    length : int or None
        The required number of entries; ``None`` accepts any non-zero number.
    """
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise ValueError(f"{name} must be a tuple of positive ints, got {values!r}")
    if length is not None and len(values) != length:
        raise ValueError(f"{name} must have {length} entries, got {len(values)}: {tuple(values)!r}")
    if not values:
        raise ValueError(f"{name} must not be empty; pass at least one positive int")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must hold positive ints only, got {tuple(values)!r}")


def check_common_args(
    *, spatial_dims: int, in_channels: int, num_classes: int, image_size: Sequence[int]
) -> tuple[int, ...]:
    """Check the arguments every model takes and return ``image_size`` as a tuple.

    Parameters
    ----------
    spatial_dims : int
        2 for images ``(B, C, H, W)``, 3 for volumes ``(B, C, D, H, W)``.
    in_channels : int
        Number of input channels, at least 1.
    num_classes : int
        Number of logits, at least 2 (binary tasks use 2 logits with cross-entropy).
    image_size : Sequence[int]
        ``(H, W)`` for 2D or ``(D, H, W)`` for 3D, all positive.

    Returns
    -------
    tuple[int, ...]
        ``image_size`` as a tuple of ints.
    """
    if isinstance(spatial_dims, bool) or spatial_dims not in _AXES:
        raise ValueError(
            f"spatial_dims must be 2 (images, input (B, C, H, W)) or 3 (volumes, input "
            f"(B, C, D, H, W)), got {spatial_dims!r}"
        )
    if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
        raise ValueError(
            f"in_channels must be a positive int (1 for grey-scale CT, MR or X-ray), "
            f"got {in_channels!r}"
        )
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f"num_classes must be an int of at least 2 (a binary task uses 2 logits with "
            f"cross-entropy), got {num_classes!r}"
        )
    if isinstance(image_size, str | bytes) or not isinstance(image_size, Sequence):
        raise ValueError(
            f"image_size must be a tuple {_AXES[spatial_dims]} for spatial_dims={spatial_dims}, "
            f"got {image_size!r}"
        )
    if len(image_size) != spatial_dims:
        raise ValueError(
            f"image_size must have {spatial_dims} entries {_AXES[spatial_dims]} for "
            f"spatial_dims={spatial_dims}, got {tuple(image_size)!r}; pass "
            f"{'(depth, height, width)' if spatial_dims == 3 else '(height, width)'}"
        )
    check_positive_ints("image_size", image_size)
    return tuple(image_size)


def freeze_unused_parameters(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """Freeze the parameters that get no gradient from a forward/backward pass.

    Opacus expects a per-sample gradient for every trainable parameter, so a parameter the
    forward never reaches (MONAI ViT's ``norm_cross_attn``) must have ``requires_grad=False``.
    The probe uses zeros in eval mode: it draws no random numbers and leaves no gradients.

    Parameters
    ----------
    model : nn.Module
        The model, with a forward that returns one tensor.
    input_shape : Sequence[int]
        Shape of one probe batch, for example ``(1, C, H, W)``.

    Returns
    -------
    list[str]
        Names of the parameters that were frozen.
    """
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    import torch  # here, not at the top: a name or option check needs no torch

    model(torch.zeros(*input_shape)).sum().backward()
    frozen = []
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and parameter.grad is None:
            parameter.requires_grad_(False)
            frozen.append(name)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return frozen
