"""Exact, unweighted counts (evaluation sums) through SecAgg+, beside or without arrays."""

import numpy as np
import pytest

from privacy.secagg import InMemoryRound, RoundAborted, RoundSetup, Stage
from privacy.secagg.errors import ConfigurationError, InputError, InputRangeError
from privacy.secagg.wire import setup_from_bytes, setup_to_bytes

pytestmark = pytest.mark.timeout(120)

SITES = (1, 2, 3, 4, 5)
COUNTS = {"n": 1, "confusion": 4, "hist": 20}


def _setup(*, arrays=True, max_count=1 << 32):
    return RoundSetup.create(
        round_id="eval",
        participants=list(SITES),
        threshold=3,
        array_shapes={"w": (6,)} if arrays else {},
        clipping_range=1.0,
        count_sizes=COUNTS,
        max_count=max_count,
    )


def _counts(seed):
    rng = np.random.default_rng(seed)
    return {
        site: {name: rng.integers(0, 10_000, size) for name, size in COUNTS.items()}
        for site in SITES
    }


def _inputs(arrays=True):
    rng = np.random.default_rng(7)
    return {s: ({"w": rng.uniform(-1, 1, 6)} if arrays else {}, int(s)) for s in SITES}


@pytest.mark.parametrize("arrays", [True, False])
@pytest.mark.parametrize("stage", list(Stage))
def test_counts_sum_exactly_over_the_survivors_when_two_sites_drop(arrays, stage):
    counts = _counts(1)
    drop = {2: stage, 5: stage}
    result = InMemoryRound(
        _setup(arrays=arrays), _inputs(arrays), drop_at=drop, counts=counts
    ).run()
    contributors = [s for s in SITES if s not in drop or stage is Stage.UNMASK]
    assert list(result.contributors) == contributors
    for name in COUNTS:
        expected = np.sum([counts[s][name] for s in contributors], axis=0)
        np.testing.assert_array_equal(result.counts[name], expected)
    assert result.total_weight == sum(contributors)
    if arrays:
        weights = np.array(contributors, dtype=float)
        mean = np.tensordot(weights, [_inputs()[s][0]["w"] for s in contributors], 1)
        np.testing.assert_allclose(
            result.arrays["w"], mean / weights.sum(), atol=result.error_bound
        )
    else:
        assert result.arrays == {}


def test_three_dropped_sites_abort_a_counts_round():
    drop = {1: Stage.SHARE_KEYS, 2: Stage.MASKED_INPUT, 3: Stage.UNMASK}
    with pytest.raises(RoundAborted):
        InMemoryRound(_setup(), _inputs(), drop_at=drop, counts=_counts(2)).run()


def test_a_count_out_of_range_or_of_the_wrong_shape_fails_loudly():
    counts = _counts(3)
    counts[1]["n"] = np.array([-1])
    with pytest.raises(InputRangeError, match="outside"):
        InMemoryRound(_setup(), _inputs(), counts=counts).run()
    counts = _counts(3)
    counts[1]["hist"] = np.zeros(3, dtype=np.int64)
    with pytest.raises(InputError, match="must hold 20 integers"):
        InMemoryRound(_setup(), _inputs(), counts=counts).run()
    counts = _counts(3)
    counts[1]["n"] = np.array([0.5])
    with pytest.raises(InputError, match="integers"):
        InMemoryRound(_setup(), _inputs(), counts=counts).run()


def _create(**overrides):
    arguments = {
        "round_id": "r",
        "participants": list(SITES),
        "threshold": 3,
        "array_shapes": {},
        "clipping_range": 1.0,
        **overrides,
    }
    return RoundSetup.create(**arguments)


def test_setup_with_counts_round_trips_and_checks_overflow_and_names():
    setup = _setup(arrays=False)
    assert setup_from_bytes(setup_to_bytes(setup)) == setup
    assert setup.vector_length == sum(COUNTS.values())
    with pytest.raises(ConfigurationError, match="too small"):
        _create(count_sizes=COUNTS, max_count=1 << 62)
    with pytest.raises(ConfigurationError, match="distinct"):
        _create(array_shapes={"n": (1,)}, count_sizes={"n": 1})
    with pytest.raises(ConfigurationError, match="at least one array or one count"):
        _create()
