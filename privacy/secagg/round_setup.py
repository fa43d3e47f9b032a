"""The round parameters the coordinator sends first, validated on construction."""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Mapping
from functools import cached_property

import numpy as np

from .errors import ConfigurationError, InputError
from .graph import default_degree, neighbour_graph
from .ids import NodeId, validate_ids
from .quantise import check_count_modulus, check_modulus, encode_update

__all__ = ["MAX_PARTICIPANTS", "MAX_VECTOR_LENGTH", "RoundSetup"]

MAX_PARTICIPANTS = 10_000
MAX_VECTOR_LENGTH = 1 << 31


@dataclasses.dataclass(frozen=True)
class RoundSetup:
    """Server to every participant: the parameters of one secure-aggregation round.

    Attributes
    ----------
    round_id
        Names the round; every key and ciphertext is bound to it.
    participants
        The sites sampled for the round (all ints or all strings).
    threshold
        ``t``: shares needed to reconstruct a secret. At least 2, at most the degree, and more
        than half of a site's share holders (its neighbours and itself), so that no split of
        the holders can release both secrets of one site.
    degree
        Neighbours per site; ``n - 1`` or more means the complete graph, below that it must be
        even (see :func:`~privacy.secagg.graph.neighbour_graph`).
    graph_seed
        Seed of the neighbour graph, in ``[0, 2^63)``.
    clipping_range
        Values must lie in ``[-clipping_range, clipping_range]``; nothing is clipped.
    quantisation_bits
        Bits per quantised value (1 to 32).
    max_weight
        Largest integer weight a site may send.
    modulus_bits
        Sums are taken modulo ``2^modulus_bits`` (8 to 64); checked against overflow.
    array_names, array_shapes
        The named arrays of an update, in order (weighted, quantised values).
    count_names, count_sizes
        The named counts of an input, in order: non-negative integers summed exactly and
        unweighted (evaluation sums). A round may hold counts only (no arrays).
    max_count
        Largest value of one count at one site; checked against overflow.
    signed_values
        The sites add integer noise to their quantised values (client-level DP), so a word may
        leave ``[0, L]`` and the sum is read as signed; the modulus must then leave room for
        twice the largest sum and the noise (two more bits).
    """

    round_id: str
    participants: tuple[NodeId, ...]
    threshold: int
    degree: int
    graph_seed: int
    clipping_range: float
    quantisation_bits: int
    max_weight: int
    modulus_bits: int
    array_names: tuple[str, ...]
    array_shapes: tuple[tuple[int, ...], ...]
    count_names: tuple[str, ...] = ()
    count_sizes: tuple[int, ...] = ()
    max_count: int = 1 << 32
    signed_values: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "participants", validate_ids(self.participants, what="participants")
        )
        object.__setattr__(self, "array_names", tuple(self.array_names))
        object.__setattr__(self, "array_shapes", tuple(tuple(s) for s in self.array_shapes))
        object.__setattr__(self, "count_names", tuple(self.count_names))
        object.__setattr__(self, "count_sizes", tuple(self.count_sizes))
        self._check_round()
        self._check_graph()
        self._check_encoding()
        self._check_arrays()

    @classmethod
    def create(
        cls,
        *,
        round_id: str,
        participants: tuple[NodeId, ...] | list[NodeId],
        threshold: int,
        array_shapes: Mapping[str, tuple[int, ...]],
        clipping_range: float,
        quantisation_bits: int = 16,
        max_weight: int = 1 << 20,
        modulus_bits: int = 64,
        degree: int | None = None,
        graph_seed: int | None = None,
        count_sizes: Mapping[str, int] | None = None,
        max_count: int = 1 << 32,
        signed_values: bool = False,
    ) -> RoundSetup:
        """Build a setup with the default degree and a fresh random graph seed unless given."""
        return cls(
            round_id=round_id,
            participants=tuple(participants),
            threshold=threshold,
            degree=default_degree(len(participants)) if degree is None else degree,
            graph_seed=secrets.randbelow(1 << 63) if graph_seed is None else graph_seed,
            clipping_range=clipping_range,
            quantisation_bits=quantisation_bits,
            max_weight=max_weight,
            modulus_bits=modulus_bits,
            array_names=tuple(array_shapes),
            array_shapes=tuple(tuple(shape) for shape in array_shapes.values()),
            count_names=tuple(count_sizes or {}),
            count_sizes=tuple((count_sizes or {}).values()),
            max_count=max_count,
            signed_values=signed_values,
        )

    @property
    def value_length(self) -> int:
        """Weighted, quantised values in one input."""
        return sum(math.prod(shape) for shape in self.array_shapes)

    @property
    def vector_length(self) -> int:
        """Words in one input without the weight word: the values, then the counts."""
        return self.value_length + sum(self.count_sizes)

    def encode(
        self,
        arrays: Mapping[str, np.ndarray],
        *,
        weight: int,
        counts: Mapping[str, np.ndarray] | None = None,
        noise: np.ndarray | None = None,
    ) -> np.ndarray:
        """Encode one site's input for this round (see :func:`~.quantise.encode_update`).

        ``noise`` (integers, one per value) is allowed only in a round with ``signed_values``.

        Raises
        ------
        InputError, InputRangeError
            If the input does not fit the round; nothing is clipped.
        """
        if noise is not None and not self.signed_values:
            raise InputError("This round sums unsigned values: it cannot carry integer noise.")
        return encode_update(
            arrays,
            weight=weight,
            names=self.array_names,
            shapes=self.array_shapes,
            clipping_range=self.clipping_range,
            bits=self.quantisation_bits,
            max_weight=self.max_weight,
            counts=counts,
            count_names=self.count_names,
            count_sizes=self.count_sizes,
            max_count=self.max_count,
            noise=noise,
        )

    @cached_property
    def neighbours(self) -> dict[NodeId, frozenset[NodeId]]:
        """Every site's neighbours in the round's graph."""
        return neighbour_graph(self.participants, degree=self.degree, seed=self.graph_seed)

    def share_point(self, node: NodeId) -> int:
        """Return the Shamir evaluation point of ``node``: its position among participants + 1."""
        return self.participants.index(node) + 1

    def _check_round(self) -> None:
        if not isinstance(self.round_id, str) or not 0 < len(self.round_id) <= 256:
            raise ConfigurationError("round_id must be a non-empty string of at most 256 chars.")
        if not 3 <= len(self.participants) <= MAX_PARTICIPANTS:
            raise ConfigurationError(
                f"A round needs 3 to {MAX_PARTICIPANTS} participants, got "
                f"{len(self.participants)}: with two, each would learn the other's update."
            )

    def _check_graph(self) -> None:
        n = len(self.participants)
        _check_int("degree", self.degree, 2, None)
        _check_int("graph_seed", self.graph_seed, 0, (1 << 63) - 1)
        _check_int("threshold", self.threshold, 2, None)
        degree = min(self.degree, n - 1)
        if degree < n - 1 and degree % 2:
            raise ConfigurationError(
                f"degree {degree} is odd; use an even degree, or {n - 1} for the complete graph."
            )
        if self.threshold > degree:
            raise ConfigurationError(
                f"threshold {self.threshold} exceeds the {degree} neighbours of each site; lower "
                "the threshold or raise the degree."
            )
        if 2 * self.threshold <= degree + 1:
            raise ConfigurationError(
                f"threshold {self.threshold} is at most half of the {degree + 1} share holders "
                "of each site (its neighbours and itself): a coordinator could ask one half for "
                "a site's self-mask shares and the other half for its mask-key shares. Use a "
                f"threshold of at least {(degree + 1) // 2 + 1}."
            )

    def _check_encoding(self) -> None:
        range_ = self.clipping_range
        if isinstance(range_, bool) or not isinstance(range_, int | float):
            raise ConfigurationError(f"clipping_range must be a number, got {range_!r}.")
        if not (math.isfinite(range_) and range_ > 0):
            raise ConfigurationError(
                f"clipping_range must be a positive finite number, got {range_}."
            )
        _check_int("quantisation_bits", self.quantisation_bits, 1, 32)
        _check_int("max_weight", self.max_weight, 1, None)
        _check_int("modulus_bits", self.modulus_bits, 8, 64)
        if not isinstance(self.signed_values, bool):
            raise ConfigurationError(
                f"signed_values must be true or false, got {self.signed_values!r}."
            )
        check_modulus(
            num_clients=len(self.participants),
            bits=self.quantisation_bits,
            max_weight=self.max_weight,
            modulus_bits=self.modulus_bits - (2 if self.signed_values else 0),
        )
        _check_int("max_count", self.max_count, 1, None)
        if self.count_names:
            check_count_modulus(
                num_clients=len(self.participants),
                max_count=self.max_count,
                modulus_bits=self.modulus_bits,
            )

    def _check_arrays(self) -> None:
        names = self.array_names
        if len(names) != len(self.array_shapes) or len(self.count_names) != len(self.count_sizes):
            raise ConfigurationError("Give one shape per array name and one size per count name.")
        if not names and not self.count_names:
            raise ConfigurationError("A round needs at least one array or one count.")
        every = (*names, *self.count_names)
        if any(not isinstance(name, str) or not name for name in every):
            raise ConfigurationError("Array and count names must be non-empty strings.")
        if len(set(every)) != len(every):
            raise ConfigurationError("Array and count names must be distinct.")
        for name, size in zip(self.count_names, self.count_sizes, strict=True):
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ConfigurationError(f"Count {name!r} has an invalid size {size}.")
        for name, shape in zip(names, self.array_shapes, strict=True):
            if any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
                raise ConfigurationError(f"Array {name!r} has an invalid shape {shape}.")
        if not 1 <= self.vector_length <= MAX_VECTOR_LENGTH:
            raise ConfigurationError(
                f"An update must hold 1 to {MAX_VECTOR_LENGTH} values, got {self.vector_length}."
            )


def _check_int(name: str, value: object, low: int, high: int | None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be an integer, got {value!r}.")
    if value < low or (high is not None and value > high):
        upper = "" if high is None else f" and at most {high}"
        raise ConfigurationError(f"{name} must be at least {low}{upper}, got {value}.")
