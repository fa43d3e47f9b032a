"""Integer noise from a cryptographically secure source, and its accounting.

Floating-point Gaussian noise leaks: the set of doubles a sampler can return around a value
depends on that value, so an observer of a noised float can sometimes tell the input apart
(Mironov, "On significance of the least significant bits for differential privacy", CCS
2012). fedrad's distributed noise and its noised evaluation counts are integers, and so is the
noise: the **discrete Gaussian** ``N_Z(0, sigma^2)``, ``P(x) ~ exp(-x^2 / (2 sigma^2))`` on
the integers, sampled with Canonne, Kamath and Steinke's rejection sampler ("The Discrete
Gaussian for Differential Privacy", NeurIPS 2020, Algorithm 3), vectorised. Every uniform it
uses comes from the operating system's CSPRNG (``os.urandom``): no seed exists that the
coordinator could know or guess. The acceptance test uses double-precision ``exp``; its error
(below 1e-15 per probability) moves the output distribution by less than that, and the output
is an integer, so no floating-point gap reaches a released value.

Accounting. A sum of ``n`` independent ``N_Z(0, sigma^2)^d`` vectors (``n`` sites' shares),
released after adding an integer vector of L2 norm at most ``l2`` and L1 norm at most ``l1``,
satisfies ``rho``-zero-concentrated DP, ``rho = eps^2 / 2`` with

    eps = min( sqrt(l2^2 / (n sigma^2) + tau d / 2),  l1 / (sqrt(n) sigma) + tau d ),
    tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1))

(Kairouz, Liu and Steinke, "The Distributed Discrete Gaussian Mechanism for Federated
Learning with Secure Aggregation", ICML 2021, Theorem 1; for ``n = 1`` it is CKS 2020's bound
``eps = l2 / sigma``). ``rho``-zCDP is an RDP curve ``alpha * rho`` at every order, the curve
of a Gaussian mechanism of noise multiplier ``1 / eps``: :func:`effective_noise_multiplier`
returns that multiplier, so one release enters a site's Opacus ledger as the history entry
``(1 / eps, 1.0, 1)`` and composes with DP-SGD exactly as RDP composition allows.
"""

from __future__ import annotations

import math
import os

import numpy as np

__all__ = [
    "discrete_gaussian",
    "effective_noise_multiplier",
    "secure_uniform",
    "sigma_for",
]

_BATCH_SLACK = 1.6  # about 1 / acceptance rate of the sampler for sigma >= 1


def secure_uniform(size: int) -> np.ndarray:
    """Return ``size`` doubles uniform on ``(0, 1]`` from ``os.urandom`` (53 random bits each)."""
    if size < 0:
        raise ValueError(f"size must be non-negative, got {size}.")
    words = np.frombuffer(os.urandom(8 * size), dtype=np.uint64)
    return ((words >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53


def discrete_gaussian(sigma: float, size: int) -> np.ndarray:
    """Draw ``size`` independent samples of ``N_Z(0, sigma^2)`` (int64) from OS randomness.

    CKS 2020, Algorithm 3: with ``t = floor(sigma) + 1``, propose a discrete Laplace ``Y``
    (``P(y) ~ exp(-|y| / t)``, the difference of two geometric variables) and accept it with
    probability ``exp(-(|Y| - sigma^2 / t)^2 / (2 sigma^2))``.

    Raises
    ------
    ValueError
        If ``sigma`` is not a positive finite number.
    """
    if not (math.isfinite(sigma) and sigma > 0):
        raise ValueError(f"sigma must be a positive finite number, got {sigma!r}.")
    t = math.floor(sigma) + 1
    out = np.empty(size, dtype=np.int64)
    filled = 0
    while filled < size:
        batch = int((size - filled) * _BATCH_SLACK) + 64
        u = secure_uniform(3 * batch).reshape(3, batch)
        # Geometric on {0, 1, ...} with P(k) ~ exp(-k / t): floor(-t ln U) for U in (0, 1].
        g1 = np.floor(-t * np.log(u[0]))
        g2 = np.floor(-t * np.log(u[1]))
        y = g1 - g2
        accept = u[2] <= np.exp(-np.square(np.abs(y) - sigma * sigma / t) / (2 * sigma * sigma))
        taken = y[accept][: size - filled]
        out[filled : filled + taken.size] = taken.astype(np.int64)
        filled += taken.size
    return out


_TAU_TERMS = 10_000  # exact terms of tau; the rest is bounded above (the terms decrease)


def _tau(sigma: float, num_shares: int) -> float:
    c = 2.0 * math.pi**2 * sigma**2
    exact = min(num_shares - 1, _TAU_TERMS)
    head = math.fsum(math.exp(-c * k / (k + 1)) for k in range(1, exact + 1))
    rest = num_shares - 1 - exact  # each later term is at most the last exact one
    tail = rest * math.exp(-c * exact / (exact + 1)) if rest > 0 else 0.0
    return 10.0 * (head + tail)


def effective_noise_multiplier(
    *, sigma: float, num_shares: int, l2: float, l1: float, dim: int
) -> float:
    """The Gaussian noise multiplier whose RDP curve bounds a sum of discrete Gaussians.

    Parameters
    ----------
    sigma
        Std parameter of each share, ``N_Z(0, sigma^2)`` per coordinate.
    num_shares
        ``n``: how many independent shares the released sum carries at least.
    l2, l1
        L2 and L1 sensitivity of the summed integer vector (one site's or one record's
        largest change).
    dim
        ``d``: coordinates of the vector.

    Returns
    -------
    float
        ``1 / eps`` of Kairouz, Liu and Steinke 2021, Theorem 1 (see the module docstring).
    """
    if num_shares < 1 or dim < 1 or not (sigma > 0 and l2 > 0 and l1 > 0):
        raise ValueError("sigma, num_shares, l2, l1 and dim must all be positive.")
    tau = _tau(sigma, num_shares)
    eps = min(
        math.sqrt(l2**2 / (num_shares * sigma**2) + tau * dim / 2),
        l1 / (math.sqrt(num_shares) * sigma) + tau * dim,
    )
    return 1.0 / eps


def sigma_for(noise_multiplier: float, *, num_shares: int, l2: float, l1: float, dim: int) -> float:
    """The smallest share std (to 1e-9 relative) whose sum is at least ``noise_multiplier``.

    Starts at the continuous value ``noise_multiplier * l2 / sqrt(num_shares)`` and raises it
    until :func:`effective_noise_multiplier` reaches the target (the ``tau`` term matters only
    for a share std near 1).
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise multiplier must be positive, got {noise_multiplier!r}.")
    sigma = noise_multiplier * l2 / math.sqrt(num_shares)
    for _ in range(200):
        got = effective_noise_multiplier(sigma=sigma, num_shares=num_shares, l2=l2, l1=l1, dim=dim)
        if got >= noise_multiplier:
            return sigma
        sigma *= max(1.0 + 1e-9, noise_multiplier / got)
    raise ValueError(
        f"No share std reaches noise multiplier {noise_multiplier:g} for {dim} values: the "
        "quantisation grid is too coarse; raise quantisation-bits."
    )
