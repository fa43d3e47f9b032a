"""An in-memory SecAgg+ round for the secure-aggregation tests: its messages and sessions.

The round can save and restore every site's session after a stage, as deployment does
between messages.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from privacy.secagg import ClientSession, RoundSetup, ServerSession, simulated_consortium

SHAPES = {"conv": (4, 3), "bias": (5,)}
SITES = (1, 2, 3, 4, 5)


def make_inputs(sites=SITES):
    rng = np.random.default_rng(7)
    return {
        s: ({n: rng.uniform(-1, 1, shape) for n, shape in SHAPES.items()}, int(rng.integers(1, 99)))
        for s in sites
    }


def make_setup(sites=SITES, threshold=3):
    return RoundSetup.create(
        round_id="r-1",
        participants=list(sites),
        threshold=threshold,
        array_shapes=SHAPES,
        clipping_range=1.0,
    )


def restored(sessions):
    return {s: ClientSession.restore(c.snapshot()) for s, c in sessions.items()}


@dataclasses.dataclass
class Transcript:
    """Every message of one in-memory round, and the sessions at its end."""

    messages: dict[type, list]
    result: object
    sessions: dict


def run_round(restore_after: str | None = None, compare: list | None = None) -> Transcript:
    """Run a round, saving and restoring every site's session after the named stage.

    ``compare`` collects (original, restored) outputs of the deterministic next step.
    """
    setup, inputs = make_setup(), make_inputs()
    identities, roster = simulated_consortium(SITES)
    server = ServerSession(setup)
    sessions = {s: ClientSession(s, identity=identities[s], roster=roster) for s in SITES}
    seen: dict[type, list] = {}

    def keep(messages):
        for m in messages:
            seen.setdefault(type(m), []).append(m)
        return messages

    adverts = keep([c.advertise_keys(setup) for c in sessions.values()])
    if restore_after == "keys":
        sessions = restored(sessions)
    broadcasts = keep(list(server.collect_keys(adverts).values()))
    shares = keep([sessions[b.receiver].share_keys(b) for b in broadcasts])
    deliveries = keep(list(server.collect_shares(shares).values()))
    if restore_after == "shares":
        originals, sessions = sessions, restored(sessions)
    masked = keep([mask(sessions[d.receiver], d, inputs) for d in deliveries])
    if restore_after == "shares":
        compare += [
            (mask(originals[d.receiver], d, inputs).masked, m.masked)
            for d, m in zip(deliveries, masked, strict=True)
        ]
    requests = keep(list(server.collect_masked_inputs(masked).values()))
    if restore_after == "mask":
        sessions = restored(sessions)
    responses = keep([sessions[r.receiver].unmask(r) for r in requests])
    return Transcript(seen, server.aggregate(responses), sessions)


def mask(session, delivery, inputs):
    arrays, weight = inputs[delivery.receiver]
    return session.mask_input(delivery, arrays, weight=weight)
