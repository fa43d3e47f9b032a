"""The SecAgg+ neighbour graph: a Harary ring over a seeded random order of the sites.

Each site exchanges keys, shares and pairwise masks only with its neighbours, so the work per
site grows with the degree ``k`` (about ``log n`` in Bell et al.), not with ``n``. The order of
the ring comes from SHA-256 of the seed and the site ids, so every party derives the same graph
from the setup message on any platform. The coordinator picks the seed: the graph is random
against curious sites, not against the coordinator.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

from .errors import ConfigurationError
from .ids import NodeId, encode_id

__all__ = ["COMPLETE_GRAPH_UP_TO", "default_degree", "neighbour_graph"]

COMPLETE_GRAPH_UP_TO = 10


def default_degree(num_participants: int) -> int:
    """Return the default number of neighbours per site.

    Up to ``COMPLETE_GRAPH_UP_TO`` sites every site neighbours every other; beyond, the
    smallest even degree of at least ``3 log2 n`` (a heuristic; Bell et al. derive the exact
    degree from the tolerated fractions of corrupt and dropped sites).
    """
    if num_participants <= COMPLETE_GRAPH_UP_TO:
        return num_participants - 1
    degree = 2 * math.ceil(1.5 * math.log2(num_participants))
    return min(degree, num_participants - 1)


def neighbour_graph(
    participants: Sequence[NodeId], *, degree: int, seed: int
) -> dict[NodeId, frozenset[NodeId]]:
    """Return every site's neighbours (never itself) in a ``degree``-regular graph.

    Parameters
    ----------
    participants
        Distinct site ids.
    degree
        Neighbours per site: an even number below ``n - 1``, or ``n - 1`` or more for the
        complete graph.
    seed
        The coordinator's seed, a non-negative integer below ``2^63``.
    """
    n = len(participants)
    if degree >= n - 1:
        everyone = frozenset(participants)
        return {node: everyone - {node} for node in participants}
    if degree < 2 or degree % 2:
        raise ConfigurationError(
            f"degree must be even and at least 2 when below n - 1 = {n - 1}, got {degree}: a "
            "Harary ring links degree/2 sites on each side."
        )
    seed_bytes = seed.to_bytes(8, "big")
    ring = sorted(
        participants, key=lambda node: hashlib.sha256(seed_bytes + encode_id(node)).digest()
    )
    half = degree // 2
    return {
        node: frozenset(ring[(i + step) % n] for step in range(-half, half + 1) if step)
        for i, node in enumerate(ring)
    }
