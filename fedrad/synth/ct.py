"""Chest-CT-like 3D phantoms in Hounsfield units with an optional spherical nodule."""

from __future__ import annotations

import numpy as np

from fedrad.synth.shapes import blur, image_grid, sigmoid, smooth_field, soft_ellipse
from fedrad.synth.sites import SiteProfile

HU_AIR, HU_FAT, HU_SOFT, HU_LUNG, HU_BONE = -1000.0, -100.0, 40.0, -820.0, 400.0
RESCALE_INTERCEPT = -1024  # HU = stored + intercept, RescaleSlope 1
MAX_STORED = 4095  # BitsStored 12, unsigned
VESSELS = 10


NODULE_RADIUS = (0.07, 0.16)
"""Range of nodule radii in grid units (the image spans 2): about 2 to 5 pixels at 64 px."""
NODULE_CONTRAST = (0.15, 1.2)
"""Log-uniform range of nodule contrast as a fraction of the lung-to-soft-tissue step."""


def draw_contrast(rng: np.random.Generator, n: int) -> np.ndarray:
    """Draw nodule contrasts over lung in HU: ground glass (-690 HU) to calcified (+210)."""
    low, high = np.log(NODULE_CONTRAST)
    return (HU_SOFT - HU_LUNG) * np.exp(rng.uniform(low, high, n))


def _column(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    """Draw one parameter per series, shaped ``(n, 1, 1, 1)`` to broadcast over volumes."""
    return rng.uniform(low, high, (n, 1, 1, 1))


def _vessels(
    rng: np.random.Generator, lung_centres: tuple[np.ndarray, ...], slices: int, size: int
) -> np.ndarray:
    """Return thin bright tubes running roughly along z: the distractors a nodule must beat.

    A Gaussian tube profile factorises into x and y parts, so all vessels of a
    batch are one ``einsum`` instead of an ``exp`` over every voxel per vessel.
    """
    n = lung_centres[0].shape[0]
    axis = image_grid(size)[0][0]  # pixel-centre coordinates along one image axis
    t = np.linspace(-0.5, 0.5, slices)[:, None]  # (D, 1)
    left, right, lung_y = (c.reshape(n, 1, 1, 1) for c in lung_centres)
    shape = (n, VESSELS, 1, 1)
    x0 = np.where(rng.random(shape) < 0.5, left, right) + rng.uniform(-0.15, 0.15, shape)
    y0 = lung_y + rng.uniform(-0.3, 0.3, shape)
    dx, dy = rng.normal(0, 0.15, (2, *shape))
    radius = rng.uniform(0.012, 0.03, shape)
    # Partial volume: a tube thinner than a pixel spreads to a pixel and dims, so
    # widen the profile to at least half a pixel and keep its cross-section integral.
    blurred = np.sqrt(radius**2 + (1.0 / size) ** 2)
    peak = rng.uniform(400.0, 800.0, shape) * (radius / blurred) ** 2
    radius = blurred
    across_x = np.exp(-(((axis - x0 - dx * t) / radius) ** 2))  # (n, K, D, W)
    across_y = peak * np.exp(-(((axis - y0 - dy * t) / radius) ** 2))  # (n, K, D, H)
    return np.asarray(np.einsum("nkdh,nkdw->ndhw", across_y, across_x))


def _nodules(
    rng: np.random.Generator,
    lungs: tuple[np.ndarray, ...],
    site: SiteProfile,
    slices: int,
    contrast: np.ndarray,
) -> np.ndarray:
    """Return soft spheres (physically round: z radius follows SliceThickness) in a lung."""
    left_x, right_x, lung_y, axis_x, axis_y = lungs
    n, size = contrast.shape[0], site.size
    u, v = image_grid(size)
    z = np.arange(slices)[:, None, None]
    lung_x = np.where(rng.random((n, 1, 1, 1)) < 0.5, left_x, right_x)
    theta = _column(rng, n, 0, 2 * np.pi)
    reach = 0.6 * np.sqrt(rng.random((n, 1, 1, 1)))
    cx = lung_x + reach * axis_x * np.cos(theta)
    cy = lung_y + reach * axis_y * np.sin(theta)
    cz = _column(rng, n, 0.3, 0.7) * (slices - 1)
    radius = _column(rng, n, *NODULE_RADIUS)
    radius_z = radius * (site.size * site.pixel_spacing / 2) / site.slice_thickness
    rho = np.sqrt(((u - cx) ** 2 + (v - cy) ** 2) / radius**2 + ((z - cz) / radius_z) ** 2)
    return np.asarray(contrast[:, None, None, None] * sigmoid((1.0 - rho) / 0.15))


def render_ct(
    rng: np.random.Generator, site: SiteProfile, contrast: np.ndarray, slices: int
) -> np.ndarray:
    """Render one CT series per entry of ``contrast`` (HU, 0 = no nodule).

    Returns stored values ``(n, slices, size, size)`` as ``uint16`` with
    HU = stored - 1024. The random stream does not depend on ``contrast``.
    """
    n, size = contrast.shape[0], site.size
    u, v = image_grid(size)
    taper = 0.85 + 0.25 * np.linspace(0.0, 1.0, slices)[:, None, None]  # wider lung bases
    cx, cy = _column(rng, n, -0.03, 0.03), _column(rng, n, -0.03, 0.03)
    bx, by = _column(rng, n, 0.80, 0.90), _column(rng, n, 0.62, 0.72)
    body = soft_ellipse(u, v, (cx, cy), (bx, by), edge=0.02)
    inner = soft_ellipse(u, v, (cx, cy), (0.9 * bx, 0.87 * by), edge=0.03)
    half_gap, lung_y = _column(rng, n, 0.34, 0.40), cy + _column(rng, n, -0.08, -0.02)
    base_x, base_y = _column(rng, n, 0.24, 0.29), _column(rng, n, 0.40, 0.48)
    axis_x, axis_y = base_x * taper, base_y * taper
    lung_params = (cx - half_gap, cx + half_gap, lung_y, base_x, base_y)
    lungs = np.maximum(
        soft_ellipse(u, v, (cx - half_gap, lung_y), (axis_x, axis_y), 0.05),
        soft_ellipse(u, v, (cx + half_gap, lung_y), (axis_x, axis_y), 0.05),
    )
    spine = soft_ellipse(u, v, (cx, cy + 0.72 * by), (0.1, 0.1), edge=0.08)
    hu = (
        HU_AIR
        + (HU_FAT - HU_AIR) * body
        + (HU_SOFT - HU_FAT) * inner
        + (HU_BONE - HU_SOFT) * spine * (1 - lungs)
        + (HU_LUNG - HU_SOFT) * lungs
    )
    texture = smooth_field(rng, n, (slices, size, size), 6)
    hu += (25.0 * texture + _vessels(rng, lung_params[:3], slices, size)) * lungs
    hu += _nodules(rng, lung_params, site, slices, contrast) * lungs
    hu = blur(hu, (0.4, site.blur, site.blur))
    hu = site.gain * hu + site.offset + rng.normal(0.0, site.noise, hu.shape)
    return np.clip(np.rint(hu - RESCALE_INTERCEPT), 0, MAX_STORED).astype("<u2")
