"""Fixed-point encoding of weighted updates, with loud range and overflow checks.

A value ``x`` in ``[-r, r]`` becomes the integer ``q = round((x + r) * L / (2r))`` in ``[0, L]``,
with ``L = 2^bits - 1`` levels. A site with integer weight ``w`` sends ``w * q`` for every value
and ``w`` itself as one extra word, so the masked sum gives both ``sum(w_i * q_i)`` and
``sum(w_i)``: a weighted FedAvg in one pass. Nothing is clipped: a value outside ``[-r, r]``
raises, as does a modulus too small for the largest possible sum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .errors import InputError, InputRangeError, ModulusOverflowError, ShareReconstructionError

__all__ = [
    "check_modulus",
    "decode_sum",
    "encode_update",
    "quantisation_bound",
    "quantisation_levels",
    "required_modulus_bits",
]

_FLOAT_SLACK = 8 * float(np.finfo(np.float64).eps)


def quantisation_levels(bits: int) -> int:
    """Return the largest quantised value, ``2^bits - 1``."""
    return (1 << bits) - 1


def quantisation_bound(*, clipping_range: float, bits: int) -> float:
    """Return the largest absolute error of the secure aggregate against the exact weighted mean.

    Each value is rounded to the nearest point of a grid of step ``2 r / (2^bits - 1)``, so it
    moves by at most ``r / (2^bits - 1)``; a weighted mean of such values moves by no more,
    whatever the number of sites or their weights. Float64 evaluation adds at most eight machine
    epsilons of ``r``, included in the result.

    Parameters
    ----------
    clipping_range
        ``r``: values must lie in ``[-r, r]``.
    bits
        Quantisation bits per value.
    """
    return clipping_range / quantisation_levels(bits) + _FLOAT_SLACK * clipping_range


def required_modulus_bits(*, num_clients: int, bits: int, max_weight: int) -> int:
    """Return the fewest modulus bits that hold the sum of ``num_clients`` weighted inputs.

    The largest word of the sum is ``num_clients * max_weight * (2^bits - 1)`` (the weight
    word, ``num_clients * max_weight``, is never larger); it must stay below the modulus.
    """
    return (num_clients * max_weight * quantisation_levels(bits)).bit_length()


def check_modulus(*, num_clients: int, bits: int, max_weight: int, modulus_bits: int) -> None:
    """Raise :class:`ModulusOverflowError` if the sum could wrap around ``2^modulus_bits``."""
    needed = required_modulus_bits(num_clients=num_clients, bits=bits, max_weight=max_weight)
    if needed > modulus_bits:
        raise ModulusOverflowError(
            f"A modulus of 2^{modulus_bits} is too small: {num_clients} sites x max weight "
            f"{max_weight} x {quantisation_levels(bits)} levels needs {needed} bits. Raise "
            f"modulus-bits to at least {needed}, or lower quantisation-bits or max-weight."
        )


def encode_update(
    arrays: Mapping[str, np.ndarray],
    *,
    weight: int,
    names: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    clipping_range: float,
    bits: int,
    max_weight: int,
) -> np.ndarray:
    """Quantise ``arrays`` and return ``weight * q`` for every value followed by ``weight``.

    Raises
    ------
    InputError
        If the names, shapes or dtypes differ from the round's.
    InputRangeError
        If a value is not finite or lies outside ``[-clipping_range, clipping_range]``, or the
        weight is not an integer in ``[1, max_weight]``.
    """
    if isinstance(weight, bool) or not isinstance(weight, int | np.integer):
        raise InputRangeError(f"The weight must be an integer, got {weight!r}.")
    if not 1 <= weight <= max_weight:
        raise InputRangeError(
            f"The weight {weight} lies outside [1, {max_weight}]; raise max-weight for the round "
            "or cap the site's weight."
        )
    if set(arrays) != set(names):
        raise InputError(
            f"The update has arrays {sorted(arrays)}, the round expects {sorted(names)}."
        )
    levels = quantisation_levels(bits)
    parts = [
        _quantise(name, arrays[name], shape, clipping_range, levels)
        for name, shape in zip(names, shapes, strict=True)
    ]
    encoded = np.concatenate([*parts, np.ones(1, dtype=np.uint64)])
    return encoded * np.uint64(weight)


def decode_sum(
    total: np.ndarray,
    *,
    names: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    clipping_range: float,
    bits: int,
) -> tuple[dict[str, np.ndarray], int]:
    """Turn the unmasked sum of encoded updates into the weighted mean and the total weight.

    Raises
    ------
    ShareReconstructionError
        If the total weight is zero or a word exceeds ``total_weight * (2^bits - 1)``: a mask
        was not removed, so some reconstructed secret was wrong.
    """
    total_weight = int(total[-1])
    levels = quantisation_levels(bits)
    sums = total[:-1]
    if total_weight < 1 or (sums.size and int(sums.max()) > total_weight * levels):
        raise ShareReconstructionError(
            "The unmasked sum is out of range: some mask was not removed correctly."
        )
    mean = sums.astype(np.float64) / total_weight * (2.0 * clipping_range / levels) - clipping_range
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in zip(names, shapes, strict=True):
        size = int(np.prod(shape, dtype=np.int64))
        arrays[name] = mean[offset : offset + size].reshape(shape)
        offset += size
    return arrays, total_weight


def _quantise(
    name: str, array: np.ndarray, shape: tuple[int, ...], clipping_range: float, levels: int
) -> np.ndarray:
    values = np.asarray(array)
    if values.shape != tuple(shape):
        raise InputError(f"Array {name!r} has shape {values.shape}, the round expects {shape}.")
    if not (np.issubdtype(values.dtype, np.floating) or np.issubdtype(values.dtype, np.integer)):
        raise InputError(f"Array {name!r} has dtype {values.dtype}; send real numbers.")
    values = values.astype(np.float64).ravel()
    bad = ~np.isfinite(values) | (np.abs(values) > clipping_range)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        value = float(values[index])
        raise InputRangeError(
            f"Array {name!r} holds {value!r} at flat index {index} ({int(bad.sum())} "
            f"values in all) outside the clipping range [-{clipping_range}, {clipping_range}]. "
            "Secure aggregation never clips silently: raise clipping-range, or clip or scale the "
            "update before masking."
        )
    scaled = np.rint((values + clipping_range) * (levels / (2.0 * clipping_range)))
    return np.clip(scaled, 0, levels).astype(np.uint64)  # only float rounding can reach the ends
