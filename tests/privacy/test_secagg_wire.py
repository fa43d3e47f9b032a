"""The wire codec: stage messages and the round setup through Flower records, and refusals."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.common.serde import config_record_from_proto, config_record_to_proto
from secagg_transcript import make_setup, run_round

from privacy.secagg import (
    KeyAdvertisement,
    KeyBroadcast,
    MaskedInput,
    ProtocolError,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from privacy.secagg.wire import (
    invitation_from_fields,
    invitation_to_fields,
    message_from_fields,
    message_to_fields,
    setup_from_bytes,
    setup_to_bytes,
)


def _through_proto(fields):
    proto = config_record_to_proto(ConfigRecord(fields))
    return dict(config_record_from_proto(type(proto).FromString(proto.SerializeToString())))


@pytest.fixture(scope="module")
def transcript():
    return run_round()


@pytest.mark.parametrize(
    "kind",
    [
        KeyAdvertisement,
        KeyBroadcast,
        ShareKeys,
        ShareDelivery,
        MaskedInput,
        UnmaskRequest,
        UnmaskResponse,
    ],
)
def test_every_stage_message_survives_a_flower_record(transcript, kind):
    for message in transcript.messages[kind]:
        decoded = message_from_fields(kind, _through_proto(message_to_fields(message)))

        if kind is MaskedInput:
            assert decoded.masked.dtype == message.masked.dtype
            np.testing.assert_array_equal(decoded.masked, message.masked)
            assert (decoded.round_id, decoded.sender) == (message.round_id, message.sender)
        else:
            assert decoded == message


def _advert_fields(transcript):
    return message_to_fields(transcript.messages[KeyAdvertisement][0])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda f: f.pop("mask-key"),
        lambda f: f.update({"extra": 1}),
        lambda f: f.update({"message": "share-keys"}),
        lambda f: f.update({"sender": True}),
        lambda f: f.update({"sender": [1]}),
        lambda f: f.update({"encryption-key": "not bytes"}),
        lambda f: f.update({"round-id": 3}),
    ],
)
def test_malformed_message_fields_are_refused(transcript, mutate):
    fields = _advert_fields(transcript)
    mutate(fields)

    with pytest.raises(ProtocolError):
        message_from_fields(KeyAdvertisement, fields)


@pytest.mark.parametrize(
    ("dtype", "data"), [("uint64", b"\x00" * 9), ("float64", b"\x00" * 8), ("int8", b"")]
)
def test_malformed_masked_vector_is_refused(transcript, dtype, data):
    fields = message_to_fields(transcript.messages[MaskedInput][0])
    fields.update({"masked": data, "masked-dtype": dtype})

    with pytest.raises(ProtocolError):
        message_from_fields(MaskedInput, fields)


def test_setup_and_invitation_round_trip():
    setup = make_setup()

    fields = _through_proto(invitation_to_fields(setup, 4))

    assert setup_from_bytes(setup_to_bytes(setup)) == setup
    assert invitation_from_fields(fields) == (setup, 4)


@pytest.mark.parametrize(
    "data", [b"not json", b'{"format": "fedrad-secagg-setup/1"}', b'{"format": "x"}']
)
def test_malformed_setup_is_refused(data):
    with pytest.raises(ProtocolError):
        setup_from_bytes(data)
