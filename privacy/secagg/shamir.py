"""Shamir secret sharing over the prime field GF(2^521 - 1).

A secret of up to 64 bytes is the constant term of a random polynomial of degree
``threshold - 1``; the share at ``x`` is the polynomial's value there, as 66 big-endian bytes.
Any ``threshold`` shares give the secret back by Lagrange interpolation at zero; fewer are
consistent with every possible secret, so they reveal nothing about it.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from .errors import ConfigurationError, ShareReconstructionError

__all__ = [
    "PRIME",
    "SHARE_BYTES",
    "combine_shares",
    "interpolate",
    "split_secret",
]

PRIME = 2**521 - 1  # a Mersenne prime, well above any 64-byte secret
SHARE_BYTES = (PRIME.bit_length() + 7) // 8
_MAX_SECRET_BYTES = 64


def split_secret(secret: bytes, *, threshold: int, xs: Sequence[int]) -> dict[int, bytes]:
    """Share ``secret`` so that any ``threshold`` of the shares reconstruct it.

    Parameters
    ----------
    secret
        1 to 64 bytes.
    threshold
        How many shares reconstruct the secret (1 to ``len(xs)``).
    xs
        Distinct evaluation points in ``[1, PRIME)``, one per share holder.

    Returns
    -------
    dict
        The share (``SHARE_BYTES`` bytes) for every point in ``xs``.
    """
    _check_points(xs)
    if not 1 <= len(secret) <= _MAX_SECRET_BYTES:
        raise ConfigurationError(
            f"A secret must be 1 to {_MAX_SECRET_BYTES} bytes, got {len(secret)}."
        )
    if not 1 <= threshold <= len(xs):
        raise ConfigurationError(
            f"threshold must be between 1 and the number of shares ({len(xs)}), got {threshold}."
        )
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x).to_bytes(SHARE_BYTES, "big") for x in xs}


def combine_shares(shares: Mapping[int, bytes], *, threshold: int, secret_bytes: int) -> bytes:
    """Reconstruct a secret of ``secret_bytes`` bytes from at least ``threshold`` shares.

    The secret is interpolated from ``threshold`` shares; every further share must lie on the
    same polynomial, which detects corrupted shares.

    Raises
    ------
    ShareReconstructionError
        If there are fewer than ``threshold`` shares, a share is malformed, the shares disagree,
        or the result does not fit in ``secret_bytes`` bytes (the sign of a wrong reconstruction).
    """
    if threshold < 1 or len(shares) < threshold:
        raise ShareReconstructionError(
            f"{len(shares)} shares cannot reconstruct a secret shared with threshold {threshold}."
        )
    points = {x: _share_value(share) for x, share in shares.items()}
    try:
        _check_points(list(points))
    except ConfigurationError as error:
        raise ShareReconstructionError(str(error)) from error
    ordered = sorted(points)
    basis = {x: points[x] for x in ordered[:threshold]}
    for x in ordered[threshold:]:
        if interpolate(basis, x) != points[x]:
            raise ShareReconstructionError(f"The share at x={x} disagrees with the others.")
    value = interpolate(basis, 0)
    if value >= 1 << (8 * secret_bytes):
        raise ShareReconstructionError(
            f"The reconstructed value does not fit in {secret_bytes} bytes: the shares are wrong."
        )
    return value.to_bytes(secret_bytes, "big")


def interpolate(points: Mapping[int, int], x: int) -> int:
    """Evaluate at ``x`` the polynomial of least degree through ``points`` (Lagrange, mod PRIME)."""
    total = 0
    for xi, yi in points.items():
        numerator, denominator = 1, 1
        for xj in points:
            if xj != xi:
                numerator = numerator * (x - xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        total = (total + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    return total


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    value = 0
    for coefficient in reversed(coefficients):  # Horner's rule
        value = (value * x + coefficient) % PRIME
    return value


def _share_value(share: bytes) -> int:
    if len(share) != SHARE_BYTES:
        raise ShareReconstructionError(f"A share must be {SHARE_BYTES} bytes, got {len(share)}.")
    value = int.from_bytes(share, "big")
    if value >= PRIME:
        raise ShareReconstructionError("A share lies outside the field.")
    return value


def _check_points(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ConfigurationError(f"Share points must be distinct and in [1, 2^521 - 1): {xs}.")
