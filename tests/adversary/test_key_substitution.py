"""The coordinator as adversary against SecAgg+ round keys: substitution, strangers, Sybils.

Each attack first runs against a deliberately weakened site (``Unverifying``: a test-only
session that skips the peer checks, as every site did before round keys were signed), to show
that it works, then against a real site, which must refuse before it shares anything, with a
message that names the cause.

The key-substitution attack: the coordinator puts keys of its own in place of the peers' keys
in one site's broadcast, plays those peers itself (impostors with zero updates) and runs the
rest of the round with that site alone: the aggregate is then that site's update, exactly
(within the quantisation bound).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from privacy.secagg import (
    ClientSession,
    InMemoryRound,
    PeerAuthenticationError,
    Roster,
    RoundSetup,
    ServerSession,
    SiteIdentity,
    simulated_consortium,
)

pytestmark = pytest.mark.timeout(60)

SHAPES = {"w": (3, 4), "b": (5,)}
TARGET = 1
PEERS = (2, 3)
WEIGHT = 37


class Unverifying(ClientSession):
    """A weakened site for the demonstrations only: it checks no peer's signature or roster."""

    def _check_round_size(self, setup: RoundSetup) -> None:
        pass

    def _authenticate(self, setup: RoundSetup, broadcast: object) -> None:
        pass


def _setup(participants=(TARGET, *PEERS), threshold=2, graph_seed=5) -> RoundSetup:
    return RoundSetup.create(
        round_id="r-attack",
        participants=list(participants),
        threshold=threshold,
        array_shapes=SHAPES,
        clipping_range=1.0,
        graph_seed=graph_seed,
    )


def _update(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.uniform(-1, 1, shape) for name, shape in SHAPES.items()}


def _impostors(setup: RoundSetup, target_identity: SiteIdentity, *, signs_as: str):
    """The coordinator's own sessions playing the target's peers, with keys it made."""
    own = {p: SiteIdentity.generate(signs_as.format(p)) for p in PEERS}
    roster = Roster(
        {target_identity.name: target_identity.public_key}
        | {i.name: i.public_key for i in own.values()}
    )
    return {p: Unverifying(p, identity=own[p], roster=roster) for p in PEERS}


def _attack(target: ClientSession, setup: RoundSetup, *, signs_as: str = "site-{}"):
    """Run the substitution attack on ``target``; return what the coordinator reconstructs."""
    impostors = _impostors(setup, TARGET_IDENTITY[0], signs_as=signs_as)
    side = ServerSession(setup)  # the round the coordinator runs with the target alone
    adverts = [target.advertise_keys(setup), *(i.advertise_keys(setup) for i in impostors.values())]
    broadcasts = side.collect_keys(adverts)  # the target's broadcast: the impostors' keys
    shares = [target.share_keys(broadcasts[TARGET])]  # a real site refuses here
    shares += [impostors[p].share_keys(broadcasts[p]) for p in PEERS]
    deliveries = side.collect_shares(shares)
    masked = [target.mask_input(deliveries[TARGET], _update(TARGET), weight=WEIGHT)]
    zeros = {name: np.zeros(shape) for name, shape in SHAPES.items()}
    masked += [impostors[p].mask_input(deliveries[p], zeros, weight=1) for p in PEERS]
    requests = side.collect_masked_inputs(masked)
    responses = [target.unmask(requests[TARGET])]
    responses += [impostors[p].unmask(requests[p]) for p in PEERS]
    result = side.aggregate(responses)
    scale = result.total_weight / (result.total_weight - len(PEERS))  # the impostors' weight
    return {
        name: array * scale for name, array in result.arrays.items()
    }, result.error_bound * scale


TARGET_IDENTITY: list[SiteIdentity] = []  # the target's identity key, as the roster lists it


def _target(kind: type[ClientSession], setup: RoundSetup) -> ClientSession:
    identities, roster = simulated_consortium(setup.participants)
    TARGET_IDENTITY[:] = [identities[TARGET]]  # public: the coordinator knows every roster key
    return kind(TARGET, identity=identities[TARGET], roster=roster)


def test_key_substitution_recovers_a_weakened_sites_update_exactly():
    setup = _setup()

    recovered, bound = _attack(_target(Unverifying, setup), setup)

    for name, array in _update(TARGET).items():
        assert np.max(np.abs(recovered[name] - array)) <= bound + 1e-12


@pytest.mark.parametrize(
    ("signs_as", "cause"),
    [
        ("site-{}", "bad signature from peer 2"),  # claims the real peer's roster name
        ("coordinator-{}", "peer 2 signs with a key not in this site's roster"),
    ],
)
def test_a_real_site_refuses_substituted_keys_before_sharing(signs_as, cause):
    setup = _setup()
    target = _target(ClientSession, setup)

    with pytest.raises(PeerAuthenticationError, match=cause):
        _attack(target, setup, signs_as=signs_as)

    assert target.failed and target.released == {}


def _honest_round(participants=(TARGET, *PEERS), **kwargs):
    setup = _setup(participants, **kwargs)
    inputs = {p: (_update(p), 10) for p in setup.participants}
    return InMemoryRound(setup, inputs)


@pytest.mark.parametrize(
    ("change", "cause"),
    [
        # the peers' signed keys swapped between them in the target's broadcast
        (
            lambda b: _swap(b, "encryption_keys", "mask_keys", "signers", "signatures"),
            "bad signature from peer 2 \\(signing as 'site-3'\\)",
        ),
        # only the keys swapped, each peer's signature left in its place
        (lambda b: _swap(b, "encryption_keys", "mask_keys"), "bad signature from peer 2"),
        # one signature bit flipped
        (
            lambda b: dataclasses.replace(b, signatures=(_flip(b.signatures[0]), b.signatures[1])),
            "bad signature from peer 2",
        ),
    ],
)
def test_a_real_site_refuses_a_tampered_broadcast(change, cause):
    round_ = _honest_round()
    broadcasts = round_.advertise_keys()

    with pytest.raises(PeerAuthenticationError, match=cause):
        round_.clients[TARGET].share_keys(change(broadcasts[TARGET]))


def test_a_weakened_site_shares_with_swapped_keys():
    round_ = _honest_round()
    round_.clients[TARGET] = _weakened(round_, TARGET)
    broadcasts = round_.advertise_keys()

    shares = round_.clients[TARGET].share_keys(_swap(broadcasts[TARGET], "encryption_keys"))

    assert shares.receivers == PEERS  # its secrets went out under keys the peers do not hold


def test_a_site_shown_another_setup_than_its_peers_refuses():
    round_ = _honest_round()
    other = _setup(graph_seed=6)  # same participants, another graph seed: another digest
    identities, roster = round_.identities, round_.roster
    target = ClientSession(TARGET, identity=identities[TARGET], roster=roster)
    target.advertise_keys(other)
    broadcasts = round_.advertise_keys()

    with pytest.raises(PeerAuthenticationError, match="bad signature from peer 2.*another round"):
        target.share_keys(broadcasts[TARGET])


def _swap(broadcast, *names):
    changes = {name: tuple(reversed(getattr(broadcast, name))) for name in names}
    return dataclasses.replace(broadcast, **changes)


def _flip(signature: bytes) -> bytes:
    return signature[:-1] + bytes([signature[-1] ^ 1])


def _weakened(round_: InMemoryRound, node) -> Unverifying:
    return Unverifying(node, identity=round_.identities[node], roster=round_.roster)


# ------------------------------------------------------------------ Sybils and roster size


def _sybil_round(kind: type[ClientSession]):
    """Five participants; the roster holds three sites; 4 and 5 are the coordinator's own."""
    setup = _setup((1, 2, 3, 4, 5), threshold=3)
    identities, roster = simulated_consortium((1, 2, 3))
    sybils = {p: SiteIdentity.generate(f"site-{p}") for p in (4, 5)}
    sybil_roster = Roster({i.name: i.public_key for i in (*identities.values(), *sybils.values())})
    clients = {p: kind(p, identity=identities[p], roster=roster) for p in (1, 2, 3)}
    clients |= {p: Unverifying(p, identity=sybils[p], roster=sybil_roster) for p in (4, 5)}
    server = ServerSession(setup)
    return setup, clients, server


def test_a_weakened_site_shares_its_secrets_with_sybils():
    setup, clients, server = _sybil_round(Unverifying)
    broadcasts = server.collect_keys([c.advertise_keys(setup) for c in clients.values()])

    shares = clients[1].share_keys(broadcasts[1])

    assert {4, 5} <= set(shares.receivers)  # 2 of the 3 shares needed: the coordinator's own


def test_a_real_site_refuses_more_participants_than_its_roster_has_sites():
    setup, clients, _ = _sybil_round(ClientSession)

    with pytest.raises(PeerAuthenticationError, match="roster mismatch: the round lists 5"):
        clients[1].advertise_keys(setup)


def test_a_real_site_refuses_one_site_counted_twice():
    # The roster has four sites, one offline; the coordinator invites site 2 twice instead.
    setup = _setup((1, 2, 3, 4), threshold=3)
    identities, roster = simulated_consortium((1, 2, 3, 4))
    identities[4] = identities[2]
    round_ = InMemoryRound(
        setup, {p: (_update(p), 10) for p in (1, 2, 3, 4)}, identities=identities, roster=roster
    )
    broadcasts = round_.advertise_keys()

    with pytest.raises(PeerAuthenticationError, match="roster mismatch: peer 4 signs as 'site-2'"):
        round_.clients[1].share_keys(broadcasts[1])


def test_a_real_site_refuses_a_peer_claiming_its_own_identity():
    setup = _setup((1, 2, 3, 4), threshold=3)
    identities, roster = simulated_consortium((1, 2, 3, 4))
    identities[4] = identities[1]  # one key provisioned on two nodes
    round_ = InMemoryRound(
        setup, {p: (_update(p), 10) for p in (1, 2, 3, 4)}, identities=identities, roster=roster
    )
    broadcasts = round_.advertise_keys()

    with pytest.raises(PeerAuthenticationError, match="the identity of this site"):
        round_.clients[1].share_keys(broadcasts[1])


def test_an_honest_round_with_signed_keys_still_sums_exactly():
    round_ = _honest_round()

    result = round_.run()

    expected = {n: sum(_update(p)[n] for p in (1, 2, 3)) / 3 for n in SHAPES}
    for name, array in expected.items():
        assert np.max(np.abs(result.arrays[name] - array)) <= result.error_bound + 1e-12
