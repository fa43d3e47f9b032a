"""Vectorised building blocks of the phantoms: grids, soft ellipses, smooth random fields."""

from __future__ import annotations

from functools import lru_cache

import numpy as np


@lru_cache(maxsize=32)
def image_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return read-only ``(u, v)`` pixel-centre coordinates in [-1, 1], each ``(size, size)``.

    ``u`` grows to the right (columns), ``v`` downwards (rows).
    """
    axis = (np.arange(size) + 0.5) / size * 2 - 1
    v, u = np.meshgrid(axis, axis, indexing="ij")
    u.flags.writeable = False
    v.flags.writeable = False
    return u, v


def soft_ellipse(
    u: np.ndarray,
    v: np.ndarray,
    centre: tuple[np.ndarray | float, np.ndarray | float],
    axes: tuple[np.ndarray | float, np.ndarray | float],
    edge: float,
    angle: np.ndarray | None = None,
) -> np.ndarray:
    """Return a 0..1 mask of an ellipse with a smooth rim ``edge`` (in radius units) wide.

    All arguments broadcast, so a batch of ellipses is one call: pass ``(n, 1, 1)``
    parameters with ``(H, W)`` coordinates.
    """
    du, dv = u - centre[0], v - centre[1]
    if angle is not None:
        cos, sin = np.cos(angle), np.sin(angle)
        du, dv = du * cos + dv * sin, dv * cos - du * sin
    rho = np.sqrt((du / axes[0]) ** 2 + (dv / axes[1]) ** 2)
    return sigmoid((1.0 - rho) / edge)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Return the logistic function of ``x`` without overflow warnings."""
    return 0.5 + 0.5 * np.tanh(0.5 * x)


@lru_cache(maxsize=64)
def _basis(size: int, n_ctrl: int) -> np.ndarray:
    """Return a ``(size, n_ctrl)`` Gaussian interpolation basis with rows summing to one."""
    x = np.linspace(0.0, 1.0, size)[:, None]
    centres = np.linspace(0.0, 1.0, n_ctrl)[None, :]
    width = 1.0 / max(n_ctrl - 1, 1)
    weights = np.exp(-0.5 * ((x - centres) / width) ** 2)
    basis = weights / weights.sum(axis=1, keepdims=True)
    basis.flags.writeable = False
    return np.asarray(basis)


def smooth_field(
    rng: np.random.Generator, n: int, shape: tuple[int, ...], n_ctrl: int
) -> np.ndarray:
    """Return ``n`` smooth random fields of ``shape`` (2 or 3 axes), roughly unit variance.

    Random control values on an ``n_ctrl`` lattice are interpolated with a separable
    basis, so the cost is a few small matrix products instead of a filter per image.
    """
    ctrl_shape = tuple(min(n_ctrl, s) for s in shape)
    field = rng.standard_normal((n, *ctrl_shape))
    for axis, (size, k) in enumerate(zip(shape, ctrl_shape, strict=True)):
        field = np.moveaxis(
            np.tensordot(field, _basis(size, k), axes=([axis + 1], [1])), -1, axis + 1
        )
    spread = field.std(axis=tuple(range(1, field.ndim)), keepdims=True).clip(1e-6)
    return np.asarray(field / spread)


@lru_cache(maxsize=64)
def _blur_matrix(size: int, sigma: float) -> np.ndarray:
    """Return the ``(size, size)`` matrix of a Gaussian blur with edge-replicating borders."""
    radius = int(np.ceil(4 * sigma))
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma) ** 2)
    weights /= weights.sum()
    rows = np.repeat(np.arange(size), offsets.size)
    cols = np.clip(rows + np.tile(offsets, size), 0, size - 1)
    matrix = np.zeros((size, size))
    np.add.at(matrix, (rows, cols), np.tile(weights, size))
    matrix.flags.writeable = False
    return matrix


def blur(images: np.ndarray, sigmas: tuple[float, ...]) -> np.ndarray:
    """Blur the trailing axes of ``images`` with one Gaussian sigma (pixels) per axis.

    A separable blur as small matrix products: cheap for a batch of small images.
    """
    first = images.ndim - len(sigmas)
    for axis, sigma in enumerate(sigmas, start=first):
        if sigma > 0:
            matrix = _blur_matrix(images.shape[axis], float(sigma))
            images = np.moveaxis(np.moveaxis(images, axis, -1) @ matrix.T, -1, axis)
    return images
