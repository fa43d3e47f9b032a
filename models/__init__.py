"""fedrad's networks, identical on server and client.

``build_model(name, spatial_dims=..., in_channels=..., num_classes=..., image_size=...)`` returns
a model that maps ``(B, C, H, W)`` (2D) or ``(B, C, D, H, W)`` (3D) to logits ``(B, num_classes)``
and trains under Opacus: no BatchNorm, no in-place ops, no parameter without a gradient.
Importing this package, or reading a :class:`ModelSpec`, imports neither torch nor MONAI: a
family's module is imported when a model of it is built.
"""

from models.registry import DP_GRAD_SAMPLE_MODES, MODELS, build_model
from models.spec import ModelSpec

__all__ = ["DP_GRAD_SAMPLE_MODES", "MODELS", "ModelSpec", "build_model"]
