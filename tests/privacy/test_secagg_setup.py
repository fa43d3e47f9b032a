import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.secagg import (
    ClientSession,
    ConfigurationError,
    RoundSetup,
    default_degree,
    neighbour_graph,
    simulated_consortium,
)

pytestmark = pytest.mark.timeout(120)

VALID = dict(
    round_id="r",
    participants=(1, 2, 3, 4, 5),
    threshold=3,
    degree=4,
    graph_seed=7,
    clipping_range=1.0,
    quantisation_bits=16,
    max_weight=1000,
    modulus_bits=64,
    array_names=("w",),
    array_shapes=((10,),),
)


def test_a_valid_setup_is_accepted():
    setup = RoundSetup(**VALID)

    assert setup.vector_length == 10
    assert setup.neighbours[1] == {2, 3, 4, 5}


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"threshold": 1}, "threshold must be at least 2"),
        ({"threshold": 5}, "exceeds the 4 neighbours"),
        ({"participants": tuple(range(12)), "degree": 4, "threshold": 2}, "at most half"),
        ({"participants": tuple(range(12)), "degree": 5, "threshold": 4}, "odd"),
        ({"participants": (1, 2, 2, 3, 4)}, "duplicates"),
        ({"participants": (1, 2, "3", 4, 5)}, "mix ints and strings"),
        ({"participants": (True, 2, 3, 4, 5)}, "ints or strings"),
        ({"participants": (1, 2), "threshold": 2}, "3 to"),
        ({"clipping_range": 0.0}, "positive finite"),
        ({"clipping_range": math.nan}, "positive finite"),
        ({"quantisation_bits": 33}, "quantisation_bits"),
        ({"modulus_bits": 65}, "modulus_bits"),
        ({"max_weight": 0}, "max_weight"),
        ({"graph_seed": -1}, "graph_seed"),
        ({"array_names": (), "array_shapes": ()}, "at least one array"),
        ({"array_names": ("w", "w"), "array_shapes": ((1,), (2,))}, "distinct"),
        ({"array_shapes": ((-1, 2),)}, "invalid shape"),
        ({"array_shapes": ((0,),)}, "1 to"),
        ({"round_id": ""}, "round_id"),
    ],
)
def test_unusable_setups_are_refused_with_a_reason(change, match):
    with pytest.raises(ConfigurationError, match=match):
        RoundSetup(**{**VALID, **change})


@pytest.mark.parametrize(
    ("site", "kwargs", "match"),
    [
        (9, {}, "not among the participants"),
        (1, {"min_threshold": 4}, "below this site's minimum"),
        (1, {"max_vector_length": 5}, "exceeds this site's limit"),
    ],
)
def test_a_client_refuses_a_setup_against_its_own_limits(site, kwargs, match):
    identities, roster = simulated_consortium({*VALID["participants"], site})
    client = ClientSession(site, identity=identities[site], roster=roster, **kwargs)

    with pytest.raises(ConfigurationError, match=match):
        client.advertise_keys(RoundSetup(**VALID))

    assert client.failed


@settings(max_examples=40, deadline=None)
@given(n=st.integers(4, 40), half=st.integers(1, 19), seed=st.integers(0, 2**63 - 1))
def test_the_sparse_graph_is_regular_symmetric_and_loop_free(n, half, seed):
    degree = min(2 * half, n - 2 if n % 2 == 0 else n - 3)
    if degree < 2:
        return
    participants = [f"site-{i}" for i in range(n)]

    graph = neighbour_graph(participants, degree=degree, seed=seed)

    assert all(len(peers) == degree for peers in graph.values())
    assert all(node not in peers for node, peers in graph.items())
    assert all(node in graph[peer] for node, peers in graph.items() for peer in peers)
    assert graph == neighbour_graph(list(reversed(participants)), degree=degree, seed=seed)


def test_different_seeds_give_different_graphs():
    graphs = {
        tuple(
            sorted(
                (n, tuple(sorted(p)))
                for n, p in neighbour_graph(range(30), degree=4, seed=s).items()
            )
        )
        for s in range(5)
    }

    assert len(graphs) == 5


@pytest.mark.parametrize(
    ("n", "expected"), [(3, 2), (10, 9), (11, 10), (16, 12), (17, 14), (100, 20)]
)
def test_default_degree_is_complete_for_small_rounds_and_logarithmic_beyond(n, expected):
    assert default_degree(n) == expected


def test_the_default_setup_gives_every_site_at_least_threshold_neighbours():
    setup = RoundSetup.create(
        round_id="r",
        participants=list(range(40)),
        threshold=9,
        array_shapes={"w": (3,)},
        clipping_range=1.0,
    )

    degrees = np.array([len(p) for p in setup.neighbours.values()])

    assert setup.degree == default_degree(40) < 39
    assert (degrees == setup.degree).all()
