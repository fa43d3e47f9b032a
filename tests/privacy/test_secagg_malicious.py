"""A coordinator that sends malformed or malicious requests gets refusals, never both shares."""

import dataclasses

import numpy as np
import pytest

from privacy.secagg import (
    ConflictingUnmaskRequest,
    InMemoryRound,
    NotSurvivorError,
    OverlappingSetsError,
    ProtocolError,
    RoundAborted,
    RoundSetup,
    ShareDecryptionError,
    ShareKind,
    Stage,
    TooFewSurvivorsError,
    UnknownPeerError,
    UnmaskRequest,
)

pytestmark = pytest.mark.timeout(120)


def _round(n=5, threshold=3, *, drop_at=None, degree=None):
    setup = RoundSetup.create(
        round_id="r",
        participants=list(range(n)),
        threshold=threshold,
        array_shapes={"w": (8,)},
        clipping_range=1.0,
        degree=degree,
    )
    inputs = {site: ({"w": np.full(8, 0.05 * site)}, site + 1) for site in range(n)}
    return InMemoryRound(setup, inputs, drop_at=drop_at)


def _at_unmask(**kwargs):
    """A round whose masked inputs are in; site 4 dropped before masking."""
    round_ = _round(drop_at={4: Stage.MASKED_INPUT}, **kwargs)
    return round_, round_.mask_inputs(round_.share_keys(round_.advertise_keys()))


def _request(survivors, dropped, receiver=0, round_id="r"):
    return UnmaskRequest(
        round_id=round_id, receiver=receiver, survivors=tuple(survivors), dropped=tuple(dropped)
    )


@pytest.mark.parametrize(
    ("survivors", "dropped", "error"),
    [
        ((0, 1, 2, 3), (3, 4), OverlappingSetsError),
        ((0, 1, 2), (0,), OverlappingSetsError),
        ((0, 1, 2, 99), (4,), UnknownPeerError),
        ((0, 1, 2, 3), (4, 5), UnknownPeerError),
        ((1, 2, 3), (4,), NotSurvivorError),
        ((0, 1), (2, 3, 4), TooFewSurvivorsError),
        ((0, 2), (), TooFewSurvivorsError),
    ],
)
def test_an_unsafe_unmask_request_is_refused_and_releases_nothing(survivors, dropped, error):
    round_, _ = _at_unmask()
    client = round_.clients[0]

    with pytest.raises(error, match="Refusing to unmask"):
        client.unmask(_request(survivors, dropped))

    assert dict(client.released) == {}
    assert client.failed


def test_the_honest_request_is_answered_with_the_right_kinds_of_share():
    round_, requests = _at_unmask()

    response = round_.clients[0].unmask(requests[0])

    assert set(response.self_mask_owners) == {0, 1, 2, 3}
    assert response.mask_key_owners == (4,)
    assert dict(round_.clients[0].released) == {
        0: ShareKind.SELF_MASK,
        1: ShareKind.SELF_MASK,
        2: ShareKind.SELF_MASK,
        3: ShareKind.SELF_MASK,
        4: ShareKind.MASK_KEY,
    }


def test_a_later_request_for_the_other_share_of_a_peer_is_refused():
    round_, requests = _at_unmask()
    client = round_.clients[0]
    client.unmask(requests[0])  # 1 listed as survivor: its self-mask share is out

    with pytest.raises(ConflictingUnmaskRequest, match=r"other share of \[1\]"):
        client.unmask(_request((0, 2, 3), (1, 4)))

    assert client.released[1] is ShareKind.SELF_MASK


def test_a_second_request_with_other_sets_is_refused_even_without_a_direct_conflict():
    round_, requests = _at_unmask()
    client = round_.clients[0]
    client.unmask(requests[0])

    with pytest.raises(ConflictingUnmaskRequest, match="already answered"):
        client.unmask(_request((0, 1, 2), (4,)))


def test_a_retried_identical_request_gets_the_same_answer():
    round_, requests = _at_unmask()
    client = round_.clients[0]

    first = client.unmask(requests[0])
    second = client.unmask(requests[0])

    assert first == second


def test_a_refusing_client_answers_no_later_request():
    round_, requests = _at_unmask()
    client = round_.clients[0]
    with pytest.raises(OverlappingSetsError):
        client.unmask(_request((0, 1, 2, 3), (3, 4)))

    with pytest.raises(ProtocolError, match="stage failed"):
        client.unmask(requests[0])


def test_a_participant_that_is_not_a_neighbour_is_refused():
    round_ = _round(n=12, threshold=3, degree=4)
    requests = round_.mask_inputs(round_.share_keys(round_.advertise_keys()))
    neighbours = round_.setup.neighbours[0]
    stranger = next(s for s in range(1, 12) if s not in neighbours)

    with pytest.raises(UnknownPeerError, match=str(stranger)):
        round_.clients[0].unmask(_request((*requests[0].survivors, stranger), ()))


def test_a_neighbour_that_never_shared_keys_is_refused():
    round_ = _round(drop_at={4: Stage.SHARE_KEYS})
    requests = round_.mask_inputs(round_.share_keys(round_.advertise_keys()))

    with pytest.raises(UnknownPeerError, match=r"\[4\]"):
        round_.clients[0].unmask(_request(requests[0].survivors, (4,)))


@pytest.mark.parametrize("change", [{"round_id": "other"}, {"receiver": 1}])
def test_a_request_for_another_round_or_site_is_refused(change):
    round_, requests = _at_unmask()

    with pytest.raises(ProtocolError, match="reached site 0"):
        round_.clients[0].unmask(dataclasses.replace(requests[0], **change))


def test_a_tampered_share_fails_authentication():
    round_ = _round()
    deliveries = round_.share_keys(round_.advertise_keys())
    sealed = list(deliveries[0].sealed_shares)
    sealed[1] = sealed[1][:-1] + bytes([sealed[1][-1] ^ 1])
    tampered = dataclasses.replace(deliveries[0], sealed_shares=tuple(sealed))

    with pytest.raises(ShareDecryptionError, match="failed authentication"):
        round_.clients[0].mask_input(tampered, {"w": np.zeros(8)}, weight=1)


def test_a_share_redirected_to_another_sender_slot_fails_authentication():
    round_ = _round()
    deliveries = round_.share_keys(round_.advertise_keys())
    sealed = deliveries[0].sealed_shares
    swapped = dataclasses.replace(deliveries[0], sealed_shares=(sealed[1], sealed[0], *sealed[2:]))

    with pytest.raises(ShareDecryptionError):
        round_.clients[0].mask_input(swapped, {"w": np.zeros(8)}, weight=1)


def test_a_broadcast_listing_a_non_neighbour_is_refused():
    round_ = _round(n=12, threshold=3, degree=4)
    broadcasts = round_.advertise_keys()
    stranger = next(s for s in range(1, 12) if s not in round_.setup.neighbours[0])
    forged = dataclasses.replace(
        broadcasts[0],
        peers=(*broadcasts[0].peers, stranger),
        encryption_keys=(*broadcasts[0].encryption_keys, broadcasts[0].encryption_keys[0]),
        mask_keys=(*broadcasts[0].mask_keys, broadcasts[0].mask_keys[0]),
        signers=(*broadcasts[0].signers, broadcasts[0].signers[0]),
        signatures=(*broadcasts[0].signatures, broadcasts[0].signatures[0]),
    )

    with pytest.raises(ProtocolError, match="not live neighbours"):
        round_.clients[0].share_keys(forged)


def test_messages_out_of_order_are_refused():
    round_ = _round()

    with pytest.raises(ProtocolError, match="stage new"):
        round_.clients[0].unmask(_request((0, 1, 2), ()))


def test_a_corrupted_share_in_a_response_aborts_the_round():
    round_, requests = _at_unmask()
    responses = [round_.clients[s].unmask(r) for s, r in requests.items()]
    shares = list(responses[0].self_mask_shares)
    shares[1] = bytes(len(shares[1]))  # a zero share: off the polynomial
    responses[0] = dataclasses.replace(responses[0], self_mask_shares=tuple(shares))

    with pytest.raises(RoundAborted, match="disagrees"):
        round_.server.aggregate(responses)


def test_the_server_refuses_stages_out_of_order():
    round_ = _round()

    with pytest.raises(ProtocolError, match="stage keys"):
        round_.server.aggregate([])
