"""Run a whole round in one process, with simulated dropouts: for tests and benchmarks.

Messages pass as Python objects; every site gets a fresh identity key and all hold the
roster of the participants (see :func:`simulated_consortium`). A site listed in ``drop_at``
vanishes before sending the message of the given stage. Client errors propagate (a
deployment would turn them into error replies, that is dropouts; simulate those with
``drop_at``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from .client import ClientSession
from .identity import Roster, SiteIdentity
from .ids import NodeId
from .messages import KeyBroadcast, ShareDelivery, Stage, UnmaskRequest
from .round_setup import RoundSetup
from .server import AggregateResult, ServerSession

__all__ = ["InMemoryRound", "run_round_in_memory", "simulated_consortium"]

Update = tuple[Mapping[str, np.ndarray], int]
_ORDER = list(Stage)


class InMemoryRound:
    """One round between a :class:`ServerSession` and fresh :class:`ClientSession` objects.

    Call the four steps in order, each with what the previous returned (tests may alter it on
    the way), or :meth:`run` for all of them.

    Parameters
    ----------
    setup
        The round parameters; every participant needs an entry in ``inputs``.
    inputs
        Every participant's update and integer weight.
    drop_at
        Sites that vanish before sending the message of the given stage.
    counts
        Every participant's named counts, when the setup has counts.
    identities, roster
        Every participant's identity and the roster all sites hold; by default a fresh
        identity ``site-<id>`` per participant and the roster of exactly those.
    """

    def __init__(
        self,
        setup: RoundSetup,
        inputs: Mapping[NodeId, Update],
        *,
        drop_at: Mapping[NodeId, Stage] | None = None,
        counts: Mapping[NodeId, Mapping[str, np.ndarray]] | None = None,
        identities: Mapping[NodeId, SiteIdentity] | None = None,
        roster: Roster | None = None,
    ) -> None:
        drops = dict(drop_at or {})
        if set(inputs) != set(setup.participants) or not set(drops) <= set(inputs):
            raise ValueError("inputs must cover exactly the participants, drop_at only them.")
        self.setup = setup
        self.inputs = dict(inputs)
        self.drop_at = drops
        self.counts = dict(counts or {})
        self.server = ServerSession(setup)
        if identities is None:
            identities, roster = simulated_consortium(setup.participants)
        if roster is None:
            raise ValueError("Give the roster with the identities.")
        self.identities = dict(identities)
        self.roster = roster
        self.clients = {
            node: ClientSession(node, identity=self.identities[node], roster=roster)
            for node in setup.participants
        }

    def advertise_keys(self) -> dict[NodeId, KeyBroadcast]:
        """Send the setup; return the server's key broadcasts."""
        adverts = [
            client.advertise_keys(self.setup)
            for node, client in self.clients.items()
            if self._sends(node, Stage.ADVERTISE_KEYS)
        ]
        return self.server.collect_keys(adverts)

    def share_keys(self, broadcasts: Mapping[NodeId, KeyBroadcast]) -> dict[NodeId, ShareDelivery]:
        """Deliver the broadcasts; return the server's share deliveries."""
        messages = [
            self.clients[node].share_keys(broadcast)
            for node, broadcast in broadcasts.items()
            if self._sends(node, Stage.SHARE_KEYS)
        ]
        return self.server.collect_shares(messages)

    def mask_inputs(
        self, deliveries: Mapping[NodeId, ShareDelivery]
    ) -> dict[NodeId, UnmaskRequest]:
        """Deliver the shares; return the server's unmask requests."""
        messages = []
        for node, delivery in deliveries.items():
            if self._sends(node, Stage.MASKED_INPUT):
                arrays, weight = self.inputs[node]
                messages.append(
                    self.clients[node].mask_input(
                        delivery, arrays, weight=weight, counts=self.counts.get(node)
                    )
                )
        return self.server.collect_masked_inputs(messages)

    def unmask(self, requests: Mapping[NodeId, UnmaskRequest]) -> AggregateResult:
        """Deliver the unmask requests; return the aggregate."""
        responses = [
            self.clients[node].unmask(request)
            for node, request in requests.items()
            if self._sends(node, Stage.UNMASK)
        ]
        return self.server.aggregate(responses)

    def run(self) -> AggregateResult:
        """Run every step."""
        return self.unmask(self.mask_inputs(self.share_keys(self.advertise_keys())))

    def _sends(self, node: NodeId, stage: Stage) -> bool:
        drop = self.drop_at.get(node)
        return drop is None or _ORDER.index(stage) < _ORDER.index(drop)


def simulated_consortium(
    participants: Iterable[NodeId],
) -> tuple[dict[NodeId, SiteIdentity], Roster]:
    """Return a fresh identity ``site-<id>`` for each participant and the roster of them all."""
    identities = {node: SiteIdentity.generate(f"site-{node}") for node in participants}
    roster = Roster({i.name: i.public_key for i in identities.values()})
    return identities, roster


def run_round_in_memory(
    inputs: Mapping[NodeId, Update],
    *,
    threshold: int,
    clipping_range: float,
    drop_at: Mapping[NodeId, Stage] | None = None,
    round_id: str = "round-0",
    quantisation_bits: int = 16,
    max_weight: int = 1 << 20,
    modulus_bits: int = 64,
    degree: int | None = None,
    graph_seed: int | None = None,
) -> AggregateResult:
    """Run one secure-aggregation round over ``inputs`` in memory and return the aggregate.

    Parameters
    ----------
    inputs
        Site id to ``(arrays, weight)``; every site's arrays share names and shapes.
    threshold, clipping_range, round_id, quantisation_bits, max_weight, modulus_bits, degree,
    graph_seed
        As in :meth:`RoundSetup.create`.
    drop_at
        Sites that vanish before sending the message of the given stage.

    Raises
    ------
    RoundAborted
        If too few sites remain to complete the round.
    """
    first_arrays = next(iter(inputs.values()))[0]
    setup = RoundSetup.create(
        round_id=round_id,
        participants=tuple(inputs),
        threshold=threshold,
        array_shapes={name: np.shape(array) for name, array in first_arrays.items()},
        clipping_range=clipping_range,
        quantisation_bits=quantisation_bits,
        max_weight=max_weight,
        modulus_bits=modulus_bits,
        degree=degree,
        graph_seed=graph_seed,
    )
    return InMemoryRound(setup, inputs, drop_at=drop_at).run()
