import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from privacy.secagg import (
    InMemoryRound,
    MaskedInput,
    RoundAborted,
    RoundSetup,
    Stage,
    payload_nbytes,
    quantisation_bound,
    run_round_in_memory,
)

pytestmark = pytest.mark.timeout(120)

SHAPES = {"conv": (4, 3, 5), "bias": (7,)}
CONTRIBUTING_DROPS = (Stage.UNMASK,)  # a site lost only at unmask is already in the sum


def _inputs(sites, seed=0, clipping_range=1.0):
    rng = np.random.default_rng(seed)
    return {
        site: (
            {
                name: rng.uniform(-clipping_range, clipping_range, shape)
                for name, shape in SHAPES.items()
            },
            int(rng.integers(1, 500)),
        )
        for site in sites
    }


def _weighted_mean(inputs, sites):
    weights = np.array([inputs[s][1] for s in sites], dtype=np.float64)
    return {
        name: np.tensordot(weights, np.stack([inputs[s][0][name] for s in sites]), axes=1)
        / weights.sum()
        for name in SHAPES
    }


def _setup(sites, threshold, *, round_id="r", degree=None):
    return RoundSetup.create(
        round_id=round_id,
        participants=list(sites),
        threshold=threshold,
        array_shapes=SHAPES,
        clipping_range=1.0,
        degree=degree,
    )


def _assert_close(result, expected):
    for name, array in expected.items():
        assert result.arrays[name].shape == array.shape
        assert np.abs(result.arrays[name] - array).max() <= result.error_bound


@st.composite
def rounds(draw):
    n = draw(st.integers(3, 6))
    threshold = draw(st.integers(n // 2 + 1, n - 1))
    bits = draw(st.sampled_from([4, 8, 16, 24]))
    clipping_range = draw(st.sampled_from([0.5, 1.0, 8.0]))
    values = st.floats(-clipping_range, clipping_range)
    inputs = {
        site: (
            {
                "a": draw(hnp.arrays(np.float64, (3, 4), elements=values)),
                "b": draw(hnp.arrays(np.float64, (5,), elements=values)),
            },
            draw(st.integers(1, 10_000)),
        )
        for site in range(n)
    }
    return inputs, threshold, bits, clipping_range


@settings(max_examples=25, deadline=None)
@given(rounds())
def test_secure_aggregate_equals_weighted_fedavg_within_the_bound(round_):
    inputs, threshold, bits, clipping_range = round_
    weights = np.array([w for _, w in inputs.values()], dtype=np.float64)

    result = run_round_in_memory(
        inputs,
        threshold=threshold,
        clipping_range=clipping_range,
        quantisation_bits=bits,
        max_weight=10_000,
    )

    bound = quantisation_bound(clipping_range=clipping_range, bits=bits)
    assert result.total_weight == int(weights.sum())
    assert result.error_bound == bound
    for name in ("a", "b"):
        expected = np.average(
            np.stack([x[name] for x, _ in inputs.values()]), axis=0, weights=weights
        )
        assert np.abs(result.arrays[name] - expected).max() <= bound


@pytest.mark.parametrize(
    ("first", "second"), list(itertools.combinations_with_replacement(list(Stage), 2))
)
def test_two_sites_dropping_at_any_stages_leave_the_exact_aggregate_of_the_survivors(first, second):
    inputs = _inputs(range(5), seed=1)
    drops = {1: first, 3: second}
    contributors = tuple(s for s in range(5) if drops.get(s, Stage.UNMASK) in CONTRIBUTING_DROPS)

    result = run_round_in_memory(inputs, threshold=3, clipping_range=1.0, drop_at=drops)

    assert result.contributors == contributors
    assert result.total_weight == sum(inputs[s][1] for s in contributors)
    _assert_close(result, _weighted_mean(inputs, contributors))


@pytest.mark.parametrize(
    "stages",
    [(stage,) * 3 for stage in Stage]
    + [
        (Stage.ADVERTISE_KEYS, Stage.MASKED_INPUT, Stage.UNMASK),
        (Stage.SHARE_KEYS, Stage.UNMASK, Stage.UNMASK),
    ],
)
def test_three_of_five_dropping_aborts_revealing_nothing_and_the_next_round_proceeds(stages):
    inputs = _inputs(range(5), seed=2)
    aborted = InMemoryRound(
        _setup(range(5), 3, round_id="round-1"),
        inputs,
        drop_at=dict(zip((0, 2, 4), stages, strict=True)),
    )

    with pytest.raises(RoundAborted, match="aborted"):
        aborted.run()
    released = [
        (owner, kind) for c in aborted.clients.values() for owner, kind in c.released.items()
    ]
    next_round = run_round_in_memory(inputs, threshold=3, clipping_range=1.0, round_id="round-2")

    # No secret had t shares released, so no mask can be removed from any single input.
    assert max((released.count(item) for item in set(released)), default=0) < 3
    _assert_close(next_round, _weighted_mean(inputs, range(5)))


def test_a_site_lost_before_key_setup_leaves_every_neighbour_list():
    round_ = InMemoryRound(
        _setup(range(5), 3), _inputs(range(5)), drop_at={2: Stage.ADVERTISE_KEYS}
    )

    broadcasts = round_.advertise_keys()
    requests = round_.mask_inputs(round_.share_keys(broadcasts))
    result = round_.unmask(requests)

    assert set(broadcasts) == {0, 1, 3, 4}
    assert all(2 not in b.peers for b in broadcasts.values())
    assert all(2 not in r.survivors + r.dropped for r in requests.values())
    assert result.dropped == (2,)


def test_a_sparse_graph_round_with_dropouts_is_exact():
    sites = [f"hospital-{i:02d}" for i in range(12)]
    inputs = _inputs(sites, seed=3)
    drops = {sites[0]: Stage.SHARE_KEYS, sites[5]: Stage.MASKED_INPUT, sites[7]: Stage.UNMASK}
    round_ = InMemoryRound(_setup(sites, 4, degree=6), inputs, drop_at=drops)

    broadcasts = round_.advertise_keys()
    result = round_.unmask(round_.mask_inputs(round_.share_keys(broadcasts)))

    contributors = tuple(s for s in sites if s not in (sites[0], sites[5]))
    assert all(len(b.peers) == 6 for b in broadcasts.values())
    assert result.contributors == contributors
    _assert_close(result, _weighted_mean(inputs, contributors))


def test_a_malformed_masked_input_drops_only_its_sender():
    inputs = _inputs(range(5), seed=4)
    round_ = InMemoryRound(_setup(range(5), 3), inputs)
    deliveries = round_.share_keys(round_.advertise_keys())
    masked = [
        round_.clients[s].mask_input(d, *[inputs[s][0]], weight=inputs[s][1])
        for s, d in deliveries.items()
    ]
    masked[4] = MaskedInput(round_id="r", sender=4, masked=masked[4].masked[:-1])

    requests = round_.server.collect_masked_inputs(masked)
    result = round_.unmask(requests)

    assert result.contributors == (0, 1, 2, 3)
    _assert_close(result, _weighted_mean(inputs, (0, 1, 2, 3)))


@pytest.mark.parametrize(("modulus_bits", "word_bytes"), [(64, 8), (32, 4)])
def test_the_masked_input_carries_one_word_per_value_and_one_for_the_weight(
    modulus_bits, word_bytes
):
    setup = RoundSetup.create(
        round_id="r",
        participants=[1, 2, 3],
        threshold=2,
        array_shapes=SHAPES,
        clipping_range=1.0,
        quantisation_bits=8,
        max_weight=100,
        modulus_bits=modulus_bits,
    )
    inputs = _inputs([1, 2, 3])
    round_ = InMemoryRound(setup, {s: (x, min(w, 100)) for s, (x, w) in inputs.items()})
    deliveries = round_.share_keys(round_.advertise_keys())

    masked = round_.clients[1].mask_input(deliveries[1], inputs[1][0], weight=5)

    assert masked.masked.shape == (setup.vector_length + 1,)
    assert payload_nbytes(masked.masked) == word_bytes * (setup.vector_length + 1)
