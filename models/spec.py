"""``ModelSpec``: what a run directory stores next to a model file so the model can be rebuilt."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from models.checks import check_common_args
from models.registry import build_model, check_options

if TYPE_CHECKING:
    from torch import nn

__all__ = ["ModelSpec"]

_FIELDS = ("name", "spatial_dims", "in_channels", "num_classes", "image_size", "options")


def _to_json(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_to_json(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _to_json(item) for key, item in value.items()}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return tuple(_from_json(item) for item in value)
    if isinstance(value, Mapping):
        return {key: _from_json(item) for key, item in value.items()}
    return value


@dataclass(frozen=True)
class ModelSpec:
    """Everything :func:`models.build_model` needs to rebuild a model; checked on construction.

    Parameters
    ----------
    name : str
        A key of :data:`models.MODELS`.
    spatial_dims : int
        2 or 3.
    in_channels : int
        Input channels.
    num_classes : int
        Number of logits, at least 2.
    image_size : tuple[int, ...]
        ``(H, W)`` or ``(D, H, W)``.
    options : dict[str, Any]
        Family-specific options; sequences are stored as tuples.
    """

    name: str
    spatial_dims: int
    in_channels: int
    num_classes: int
    image_size: tuple[int, ...]
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        size = check_common_args(
            spatial_dims=self.spatial_dims,
            in_channels=self.in_channels,
            num_classes=self.num_classes,
            image_size=self.image_size,
        )
        if not isinstance(self.options, Mapping):
            raise ValueError(f"options must be a dict of option to value, got {self.options!r}")
        check_options(self.name, self.options)
        object.__setattr__(self, "image_size", size)
        object.__setattr__(self, "options", _from_json(dict(self.options)))

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-friendly dict (tuples become lists)."""
        return {key: _to_json(getattr(self, key)) for key in _FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelSpec:
        """Rebuild a spec from :meth:`to_dict` output, for example after a JSON round trip.

        Parameters
        ----------
        data : Mapping[str, Any]
            A dict with exactly the keys of :meth:`to_dict`; ``options`` may be left out.

        Returns
        -------
        ModelSpec
            The spec, with lists turned back into tuples.
        """
        missing = [key for key in _FIELDS if key not in data and key != "options"]
        extra = [key for key in data if key not in _FIELDS]
        if missing or extra:
            raise ValueError(
                f"a model spec needs the keys {', '.join(_FIELDS)}; "
                f"missing: {missing or 'none'}, unexpected: {extra or 'none'}"
            )
        return cls(
            name=data["name"],
            spatial_dims=data["spatial_dims"],
            in_channels=data["in_channels"],
            num_classes=data["num_classes"],
            image_size=_from_json(data["image_size"]),
            options=data.get("options", {}),
        )

    def build(self) -> nn.Module:
        """Build the model this spec describes with :func:`models.build_model`."""
        return build_model(
            self.name,
            spatial_dims=self.spatial_dims,
            in_channels=self.in_channels,
            num_classes=self.num_classes,
            image_size=self.image_size,
            **self.options,
        )
