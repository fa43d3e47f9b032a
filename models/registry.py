"""The model registry: one name per family and one ``build_model`` that checks before building."""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from models.checks import unknown_name_message

if TYPE_CHECKING:
    from torch import nn

__all__ = ["DP_GRAD_SAMPLE_MODES", "MODELS", "build_model", "check_model_name", "check_options"]


class _Builders(Mapping[str, "Callable[..., nn.Module]"]):
    """Model name -> builder, each builder's module (MONAI, Opacus) imported on first lookup.

    A name check (``name in MODELS``, the names themselves) imports nothing, so parsing a
    config or a :class:`~models.ModelSpec` without options does not pay for MONAI.
    """

    def __init__(self, builders: Mapping[str, tuple[str, str]]) -> None:
        self._where = dict(builders)

    def __getitem__(self, name: str) -> Callable[..., nn.Module]:
        module, function = self._where[name]
        builder: Callable[..., nn.Module] = getattr(importlib.import_module(module), function)
        return builder

    def __contains__(self, name: object) -> bool:
        return name in self._where  # Mapping's default would look the builder up

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


MODELS: Mapping[str, Callable[..., nn.Module]] = _Builders(
    {
        "cnn": ("models.cnn", "build_cnn"),
        "cnn-lstm": ("models.cnn_lstm", "build_cnn_lstm"),
        "transformer": ("models.transformer", "build_transformer"),
    }
)

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
    if not options:
        return  # nothing to check: the builder's module stays unimported until a build
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
