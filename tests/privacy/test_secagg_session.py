"""A site's session saved mid-round and restored (ClientSession.snapshot / restore)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from secagg_transcript import SHAPES, SITES, make_inputs, run_round

from privacy.secagg import ClientSession, ConflictingUnmaskRequest, ProtocolError, UnmaskRequest


def _fedavg(inputs, sites):
    weights = np.array([inputs[s][1] for s in sites], dtype=np.float64)
    return {
        n: np.tensordot(weights, np.stack([inputs[s][0][n] for s in sites]), axes=1) / weights.sum()
        for n in SHAPES
    }


@pytest.mark.parametrize("restore_after", [None, "keys", "shares", "mask"])
def test_a_session_saved_mid_round_gives_the_same_outcome(restore_after):
    compare: list = []

    transcript = run_round(restore_after, compare)

    expected = _fedavg(make_inputs(), SITES)
    for name, array in expected.items():
        assert np.abs(transcript.result.arrays[name] - array).max() <= transcript.result.error_bound
    for original, restored in compare:  # masking is deterministic given the saved state
        np.testing.assert_array_equal(original, restored)


def test_a_restored_session_keeps_its_refusals():
    transcript = run_round()
    site, session = next(iter(transcript.sessions.items()))
    request = next(r for r in transcript.messages[UnmaskRequest] if r.receiver == site)
    other = next(s for s in request.survivors if s != site)
    restored = ClientSession.restore(session.snapshot())

    conflicting = dataclasses.replace(
        request, survivors=tuple(s for s in request.survivors if s != other), dropped=(other,)
    )
    with pytest.raises(ConflictingUnmaskRequest):
        restored.unmask(conflicting)
    assert restored.failed
    failed = ClientSession.restore(restored.snapshot())
    with pytest.raises(ProtocolError):
        failed.unmask(request)


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"[]", b'{"format": "other"}', b'{"format": "fedrad-secagg-session/1"}'],
)
def test_malformed_saved_session_is_refused(data):
    with pytest.raises(ProtocolError):
        ClientSession.restore(data)
