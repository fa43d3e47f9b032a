"""Dividing samples over sites (iid, label skew, size skew) and marking validation samples."""

from __future__ import annotations

import logging

import numpy as np

from fedrad.core.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SCHEMES = ("iid", "dirichlet", "size")
MIN_SITE_SAMPLES = 10
"""Every site gets at least this many samples, whatever the scheme."""


def partition(
    labels: np.ndarray, *, sites: int, scheme: str, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Return, per site, the sorted indices into ``labels`` of the samples it gets.

    ``iid``: a uniform random shuffle cut into sizes that differ by at most one.
    ``dirichlet``: label skew; each class is cut over the sites in proportions drawn from
    Dirichlet(alpha), then sites below :data:`MIN_SITE_SAMPLES` take random samples from the
    largest site until they reach it. ``size``: size skew; site sizes are
    ``MIN_SITE_SAMPLES`` plus a Dirichlet(alpha) share of the rest, samples shuffled uniformly
    (labels stay iid). Smaller alpha means more skew.
    """
    n = int(labels.shape[0])
    if scheme not in SCHEMES:
        raise ConfigError(f"split must be one of {', '.join(SCHEMES)}, got '{scheme}'.")
    if sites < 1:
        raise ConfigError(f"sites must be at least 1, got {sites}.")
    if not alpha > 0:
        raise ConfigError(f"alpha must be positive (smaller is more skewed), got {alpha}.")
    if n < sites * MIN_SITE_SAMPLES:
        raise DataError(
            f"{n} samples cannot give {sites} site(s) at least {MIN_SITE_SAMPLES} samples "
            f"each: lower --sites to {max(1, n // MIN_SITE_SAMPLES)} or below, or use a larger "
            "archive."
        )
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), sites)
    elif scheme == "size":
        sizes = MIN_SITE_SAMPLES + _apportion(
            rng.dirichlet(np.full(sites, alpha)), n - sites * MIN_SITE_SAMPLES
        )
        parts = np.split(rng.permutation(n), np.cumsum(sizes)[:-1])
    else:
        parts = _dirichlet_parts(labels, sites, alpha, rng)
    return [np.sort(part) for part in parts]


def _apportion(proportions: np.ndarray, total: int) -> np.ndarray:
    """Integer counts summing to ``total``, by largest remainder."""
    exact = proportions / proportions.sum() * total
    counts: np.ndarray = np.floor(exact).astype(np.int64)
    counts[np.argsort(counts - exact, kind="stable")[: total - int(counts.sum())]] += 1
    return counts


def _dirichlet_parts(
    labels: np.ndarray, sites: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    owner = np.empty(labels.shape[0], dtype=np.int64)
    for value in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == value))
        counts = _apportion(rng.dirichlet(np.full(sites, alpha)), members.size)
        for site, part in enumerate(np.split(members, np.cumsum(counts)[:-1])):
            owner[part] = site
    moved = 0
    while (counts := np.bincount(owner, minlength=sites)).min() < MIN_SITE_SAMPLES:
        small, large = int(counts.argmin()), int(counts.argmax())
        need = min(MIN_SITE_SAMPLES - counts[small], counts[large] - MIN_SITE_SAMPLES)
        owner[rng.choice(np.flatnonzero(owner == large), need, replace=False)] = small
        moved += need
    if moved:
        logger.info(
            "Moved %d sample(s) so that every site has at least %d", moved, MIN_SITE_SAMPLES
        )
    return [np.flatnonzero(owner == site) for site in range(sites)]


def assign_val(
    labels: np.ndarray, *, val_fraction: float, rng: np.random.Generator
) -> tuple[str, ...]:
    """Mark about ``val_fraction`` of each class ``val``, the rest ``train``.

    Stratified by label; a site of two or more samples always gets at least one of each
    split, because the federation needs both from every site.
    """
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val-fraction must be between 0 and 1 (exclusive), got {val_fraction}.")
    is_val = np.zeros(labels.shape[0], dtype=bool)
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        is_val[rng.choice(members, round(val_fraction * members.size), replace=False)] = True
    if labels.shape[0] >= 2 and not is_val.any():
        is_val[rng.integers(labels.shape[0])] = True
    if labels.shape[0] >= 2 and is_val.all():
        is_val[rng.integers(labels.shape[0])] = False
    return tuple("val" if v else "train" for v in is_val)
