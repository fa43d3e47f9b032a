"""Fixed-point encoding of weighted updates, with loud range and overflow checks.

A value ``x`` in ``[-r, r]`` becomes the integer ``q = round((x + r) * L / (2r))`` in ``[0, L]``,
with ``L = 2^bits - 1`` levels. A site with integer weight ``w`` sends ``w * q`` for every value
and ``w`` itself as one extra word, so the masked sum gives both ``sum(w_i * q_i)`` and
``sum(w_i)``: a weighted FedAvg in one pass. Nothing is clipped: a value outside ``[-r, r]``
raises, as does a modulus too small for the largest possible sum.

A round may also sum *counts*: non-negative integers (evaluation sums such as confusion counts)
that travel exactly, unweighted, between the weighted values and the weight word::

    [w * q_1, ..., w * q_m, c_1, ..., c_k, w]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .errors import InputError, InputRangeError, ModulusOverflowError, ShareReconstructionError

__all__ = [
    "check_count_modulus",
    "check_modulus",
    "decode_counts",
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


def check_count_modulus(*, num_clients: int, max_count: int, modulus_bits: int) -> None:
    """Raise :class:`ModulusOverflowError` if a sum of counts could wrap around."""
    needed = (num_clients * max_count).bit_length()
    if needed > modulus_bits:
        raise ModulusOverflowError(
            f"A modulus of 2^{modulus_bits} is too small: {num_clients} sites x max count "
            f"{max_count} needs {needed} bits. Raise modulus-bits or lower max-count."
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
    counts: Mapping[str, np.ndarray] | None = None,
    count_names: Sequence[str] = (),
    count_sizes: Sequence[int] = (),
    max_count: int = 0,
    noise: np.ndarray | None = None,
) -> np.ndarray:
    """Quantise ``arrays``; return ``weight * q`` for every value, the counts, then ``weight``.

    With ``noise`` (one integer per value, weight 1: client-level DP adds its noise share on
    the integers, see ``privacy.distributed``) the words are ``q + noise``, which may leave
    ``[0, L]``; they travel as residues modulo ``2^64`` (two's complement) and the round's
    sum is read as signed (:func:`decode_sum` with ``signed=True``).

    Raises
    ------
    InputError
        If the names, shapes or dtypes differ from the round's.
    InputRangeError
        If a value is not finite or lies outside ``[-clipping_range, clipping_range]``, the
        weight is not an integer in ``[1, max_weight]``, or a count is not an integer in
        ``[0, max_count]``.
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
    weighted = np.concatenate([*parts, np.zeros(0, dtype=np.uint64)]) * np.uint64(weight)
    if noise is not None:
        noise = np.asarray(noise)
        if (
            weight != 1
            or noise.shape != weighted.shape
            or not np.issubdtype(noise.dtype, np.integer)
        ):
            raise InputError(
                f"Integer noise needs weight 1 and one integer per value ({weighted.size}); got "
                f"weight {weight} and {noise.size} values of {noise.dtype}."
            )
        weighted = (weighted.astype(np.int64) + noise.astype(np.int64)).astype(np.uint64)
    exact = _counts(counts or {}, count_names, count_sizes, max_count)
    return np.concatenate([weighted, exact, np.array([weight], dtype=np.uint64)])


def _counts(
    counts: Mapping[str, np.ndarray],
    names: Sequence[str],
    sizes: Sequence[int],
    max_count: int,
) -> np.ndarray:
    if set(counts) != set(names):
        raise InputError(f"The counts are {sorted(counts)}, the round expects {sorted(names)}.")
    parts = []
    for name, size in zip(names, sizes, strict=True):
        values = np.asarray(counts[name])
        if values.size != size or not (
            np.issubdtype(values.dtype, np.integer) or np.issubdtype(values.dtype, np.bool_)
        ):
            raise InputError(
                f"Count {name!r} must hold {size} integers, got {values.size} of {values.dtype}."
            )
        flat = values.astype(np.int64).ravel()
        if flat.size and (int(flat.min()) < 0 or int(flat.max()) > max_count):
            raise InputRangeError(
                f"Count {name!r} holds a value outside [0, {max_count}]; counts are "
                "non-negative and bounded by the round's max-count."
            )
        parts.append(flat.astype(np.uint64))
    return np.concatenate([*parts, np.zeros(0, dtype=np.uint64)])


def decode_sum(
    total: np.ndarray,
    *,
    names: Sequence[str],
    shapes: Sequence[tuple[int, ...]],
    clipping_range: float,
    bits: int,
    signed: bool = False,
    modulus_bits: int = 64,
) -> tuple[dict[str, np.ndarray], int]:
    """Turn the unmasked sum of encoded updates into the weighted mean and the total weight.

    With ``signed`` (inputs that carry integer noise) each word modulo ``2^modulus_bits`` is
    read as a signed integer, and the mean is clipped to ``[-r, r]`` afterwards: clipping the
    noised sum is post-processing and costs no privacy.

    Raises
    ------
    ShareReconstructionError
        If the total weight is zero or a word exceeds ``total_weight * (2^bits - 1)`` (signed:
        lies beyond a quarter of the modulus): a mask was not removed, so some reconstructed
        secret was wrong.
    """
    total_weight = int(total[-1])
    levels = quantisation_levels(bits)
    sums = total[: sum(int(np.prod(shape, dtype=np.int64)) for shape in shapes)]
    if signed:
        modulus = float(1 << modulus_bits)
        if modulus_bits == 64:
            signed_words = sums.view(np.int64)  # two's complement: w - 2^64 for w >= 2^63
        else:
            words = sums.astype(np.int64)
            signed_words = np.where(
                words >= 1 << (modulus_bits - 1), words - (1 << modulus_bits), words
            )
        values = signed_words.astype(np.float64)
        if total_weight < 1 or (values.size and float(np.abs(values).max()) >= modulus / 4):
            raise ShareReconstructionError(
                "The unmasked sum is out of range: some mask was not removed correctly."
            )
        mean = values / total_weight * (2.0 * clipping_range / levels) - clipping_range
        mean = np.clip(mean, -clipping_range, clipping_range)
        return _split(mean, names, shapes), total_weight
    if total_weight < 1 or (sums.size and int(sums.max()) > total_weight * levels):
        raise ShareReconstructionError(
            "The unmasked sum is out of range: some mask was not removed correctly."
        )
    mean = sums.astype(np.float64) / total_weight * (2.0 * clipping_range / levels) - clipping_range
    return _split(mean, names, shapes), total_weight


def _split(
    mean: np.ndarray, names: Sequence[str], shapes: Sequence[tuple[int, ...]]
) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in zip(names, shapes, strict=True):
        size = int(np.prod(shape, dtype=np.int64))
        arrays[name] = mean[offset : offset + size].reshape(shape)
        offset += size
    return arrays


def decode_counts(
    total: np.ndarray, *, value_length: int, names: Sequence[str], sizes: Sequence[int]
) -> dict[str, np.ndarray]:
    """Return the summed counts of an unmasked sum, by name (int64, flat)."""
    counts: dict[str, np.ndarray] = {}
    offset = value_length
    for name, size in zip(names, sizes, strict=True):
        counts[name] = total[offset : offset + size].astype(np.int64)
        offset += size
    if offset != total.size - 1:
        raise ShareReconstructionError("The unmasked sum has the wrong length for its counts.")
    return counts


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
