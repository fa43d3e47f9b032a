"""The reply allow-list: a site's secure-aggregation reply is exactly one message it sends."""

from __future__ import annotations

import pytest
from secagg_transcript import run_round

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
from privacy.secagg.allowlist import check_reply_fields
from privacy.secagg.wire import message_to_fields


@pytest.fixture(scope="module")
def transcript():
    return run_round()


def _advert_fields(transcript):
    return message_to_fields(transcript.messages[KeyAdvertisement][0])


@pytest.mark.parametrize("kind", [KeyAdvertisement, ShareKeys, MaskedInput, UnmaskResponse])
def test_reply_allow_list_takes_site_messages(transcript, kind):
    check_reply_fields(message_to_fields(transcript.messages[kind][0]))


@pytest.mark.parametrize("kind", [KeyBroadcast, ShareDelivery, UnmaskRequest])
def test_reply_allow_list_refuses_coordinator_messages(transcript, kind):
    with pytest.raises(ProtocolError):
        check_reply_fields(message_to_fields(transcript.messages[kind][0]))


def test_reply_allow_list_refuses_smuggled_fields(transcript):
    fields = _advert_fields(transcript)
    fields["patient-name"] = "DOE^JANE"

    with pytest.raises(ProtocolError):
        check_reply_fields(fields)
