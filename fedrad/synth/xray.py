"""Chest-X-ray-like 2D phantoms with an optional round opacity (the finding)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedrad.synth.shapes import blur, image_grid, smooth_field, soft_ellipse
from fedrad.synth.sites import SiteProfile

AIR, BODY, LUNG = 0.06, 0.66, 0.26
"""Display intensities (0..1) outside the body, of soft tissue and of aerated lung."""
MAX_STORED = 4095  # BitsStored 12
LESION_RADIUS = (0.08, 0.22)
"""Range of lesion radii in grid units (the image spans 2): about 2 to 6 pixels at 64 px."""
LESION_CONTRAST = (0.3, 1.5)
"""Log-uniform range of lesion contrast, as a fraction of the lung-to-tissue difference."""


@dataclass(frozen=True)
class Thorax:
    """Per-image anatomy, each field an ``(n, 1, 1)`` array in grid units."""

    centre: tuple[np.ndarray, np.ndarray]
    body_axes: tuple[np.ndarray, np.ndarray]
    lung_centres: tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
    lung_axes: tuple[np.ndarray, np.ndarray]


def draw_thorax(rng: np.random.Generator, n: int) -> Thorax:
    """Draw body and lung ellipses of ``n`` patients (sizes and positions vary a little)."""

    def col(low: float, high: float) -> np.ndarray:
        return rng.uniform(low, high, (n, 1, 1))

    cx, cy = col(-0.04, 0.04), col(0.0, 0.08)
    half_gap, lung_cy = col(0.38, 0.44), cy + col(-0.14, -0.04)
    return Thorax(
        centre=(cx, cy),
        body_axes=(col(0.86, 0.98), col(1.05, 1.2)),  # the torso runs off the top and bottom
        lung_centres=((cx - half_gap, lung_cy), (cx + half_gap, lung_cy)),
        lung_axes=(col(0.26, 0.32), col(0.55, 0.68)),
    )


def _anatomy(rng: np.random.Generator, thorax: Thorax, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(image, lungs)``: the lesion-free display image and the 0..1 lung mask."""
    u, v = image_grid(size)
    n = thorax.centre[0].shape[0]
    body = soft_ellipse(u, v, thorax.centre, thorax.body_axes, edge=0.03)
    lungs = np.maximum(
        *(soft_ellipse(u, v, c, thorax.lung_axes, edge=0.06) for c in thorax.lung_centres)
    )
    # The heart shadow sits on the patient's left, which is the image's right.
    heart_centre = (thorax.centre[0] + 0.12, thorax.lung_centres[0][1] + 0.4)
    heart = soft_ellipse(u, v, heart_centre, (0.3, 0.24), edge=0.08)
    lungs = lungs * (1.0 - 0.75 * heart)
    # Ribs: smooth stripes that bend down laterally.
    period, bend = rng.uniform(0.15, 0.2, (n, 1, 1)), rng.uniform(0.15, 0.35, (n, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    ribs = (0.5 + 0.5 * np.cos(2 * np.pi * (v - bend * u**2) / period + phase)) ** 3
    texture = smooth_field(rng, n, (size, size), 7)
    image = AIR + (BODY - AIR) * body - (BODY - LUNG) * lungs
    image += (0.04 * ribs * lungs + 0.02 * texture) * body
    return image, lungs


def _lesions(
    rng: np.random.Generator, thorax: Thorax, size: int, contrast: np.ndarray
) -> np.ndarray:
    """Return round/elliptic opacities inside a lung, scaled by ``contrast`` (``(n,)``)."""
    u, v = image_grid(size)
    n = contrast.shape[0]
    side = rng.integers(0, 2, (n, 1, 1))
    lung_x = np.where(side == 0, thorax.lung_centres[0][0], thorax.lung_centres[1][0])
    lung_y = thorax.lung_centres[0][1]
    theta = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    reach = 0.65 * np.sqrt(rng.random((n, 1, 1)))
    centre = (
        lung_x + reach * thorax.lung_axes[0] * np.cos(theta),
        lung_y + reach * thorax.lung_axes[1] * np.sin(theta),
    )
    radius = rng.uniform(*LESION_RADIUS, (n, 1, 1))
    axes = (radius, radius * rng.uniform(0.7, 1.0, (n, 1, 1)))
    shape = soft_ellipse(u, v, centre, axes, edge=0.15, angle=rng.uniform(0, np.pi, (n, 1, 1)))
    return np.asarray(contrast[:, None, None] * shape)


def draw_contrast(rng: np.random.Generator, n: int) -> np.ndarray:
    """Draw finding contrasts, log-uniform from faint to obvious, in display units."""
    low, high = np.log(LESION_CONTRAST)
    return (BODY - LUNG) * np.exp(rng.uniform(low, high, n))


def render_xrays(rng: np.random.Generator, site: SiteProfile, contrast: np.ndarray) -> np.ndarray:
    """Render one chest X-ray per entry of ``contrast`` (0 = no finding) as 12-bit ``uint16``.

    The random stream consumed does not depend on ``contrast``, so changing only
    the contrast of some images leaves every other pixel as it was.
    """
    n, size = contrast.shape[0], site.size
    thorax = draw_thorax(rng, n)
    image, lungs = _anatomy(rng, thorax, size)
    image += _lesions(rng, thorax, size, contrast) * lungs
    image = blur(image, (site.blur, site.blur))
    image = site.gain * np.clip(image, 0.0, 1.0) ** site.gamma + site.offset
    image += rng.normal(0.0, site.noise, image.shape)
    return np.asarray(np.clip(np.rint(image * MAX_STORED), 0, MAX_STORED), dtype="<u2")
