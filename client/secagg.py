"""The site's side of secure aggregation (SecAgg+): four Flower train actions around a session.

A round reaches a site as four messages, ``train.secagg_keys``, ``train.secagg_shares``,
``train.secagg_mask`` and ``train.secagg_unmask``. The first carries the global model, the
training config and the round setup. When the setup names evaluation counts, the site first
evaluates the model it was sent on its validation split (the sums of ``fedrad.core.evalsums``);
when it names arrays, the site then trains exactly as for plain FedAvg. It keeps its update,
its counts and its :class:`~privacy.secagg.ClientSession` in ``context.state`` (in deployment
every message runs in a fresh ClientApp process) and answers with its public keys. A setup
with counts and no arrays is an evaluation-only round. The next three
carry the protocol's messages; the session is loaded, advanced and saved again each time, and
forgotten after the unmask step or any failure.

The site masks its update *delta* (trained minus global weights), not its weights: a delta is
small (a few learning-rate steps), so a small clipping range holds it and the quantisation
error, proportional to the range, stays small; weights would need a range as large as the
largest weight. One extra entry carries the mean training loss (see
:data:`~privacy.secagg.wire.LOSS_ARRAY`; zero under DP, where the loss is withheld). The weight
is the site's number of training examples, as in plain FedAvg (1 under client-level DP).

The training function (``client.app``) decides what is masked: values beyond the clipping range
are clipped, never refused, and counted in the site's log; under client-level DP the site adds
its discrete Gaussian noise share on the integers, sized by the threshold of the round setup
it has verified (at least its own ``secagg-min-threshold``), never by a config value.

Every reply holds exactly one ConfigRecord, ``secagg``, with one site-to-coordinator message.
A refused or failed request, whatever the exception, becomes an error reply with a stable
code and its fixed sentence (:mod:`client.errors`; :data:`ERROR_CODE_REFUSED` when the site
refuses a request that could reveal an input), never a crash and never the exception's text:
the reason travels in the clear, the detail stays in the site's log.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from client.errors import log_refusal
from client.reply import check_reply
from client.sent_reply import record_refusal, record_reply
from client.site_identity import load_site_identity
from fedrad.core import keys
from fedrad.core.config import NodeConfig
from fedrad.core.errors import ERROR_REVEALING, ERROR_SECAGG
from privacy.secagg import (
    ClientSession,
    KeyBroadcast,
    ProtocolError,
    RoundSetup,
    ShareDelivery,
    UnmaskRequest,
)
from privacy.secagg.wire import (
    KEYS_ACTION,
    LOSS_ARRAY,
    MASK_ACTION,
    SHARES_ACTION,
    UNMASK_ACTION,
    FieldValue,
    invitation_from_fields,
    message_from_fields,
    message_to_fields,
)

__all__ = [
    "ERROR_CODE_REFUSED",
    "ERROR_CODE_SECAGG",
    "SecureInput",
    "check_setup_matches",
    "register",
]

log = logging.getLogger(__name__)

ERROR_CODE_SECAGG = ERROR_SECAGG
"""Error code of a secure-aggregation request the site could not serve (bad setup, bad data)."""

ERROR_CODE_REFUSED = ERROR_REVEALING
"""Error code of a request the site refused because answering could reveal an input."""

# context.state records: site-local, they never leave the node.
SESSION_STATE = "secagg-session"
UPDATE_STATE = "secagg-update"
COUNTS_STATE = "secagg-counts"
_SESSION = "session"
_WEIGHT = "weight"

_NOISE = "fedrad:noise"  # the site's integer noise share, kept beside its update

TrainFn = Callable[[Message, Context, RoundSetup], "SecureInput"]
EvaluateFn = Callable[[Message, Context], dict[str, np.ndarray]]
SiteFn = Callable[[Context], int]
Step = Callable[[Message, Context], RecordDict]


def register(
    app: ClientApp, train_fn: TrainFn, evaluate_fn: EvaluateFn, min_threshold_fn: SiteFn
) -> None:
    """Add the four secure-aggregation handlers to ``app``.

    Parameters
    ----------
    app
        The site's ClientApp.
    train_fn
        Local training for the verified round setup: takes the key-stage message (``arrays``,
        ``config``) and the setup, and returns the :class:`SecureInput` to mask (under
        client-level DP with its noise share, sized by the setup's verified threshold); its
        errors become error replies.
    evaluate_fn
        Local evaluation of the message's model on the validation split, as the named integer
        counts of ``fedrad.core.evalsums``; its errors become error replies.
    min_threshold_fn
        The site's smallest accepted threshold (node config ``secagg-min-threshold``).
    """
    step = functools.partial(
        _advertise_keys, train_fn=train_fn, evaluate_fn=evaluate_fn, site_fn=min_threshold_fn
    )
    app.train(KEYS_ACTION)(_handler(step))
    app.train(SHARES_ACTION)(_handler(_share_keys))
    app.train(MASK_ACTION)(_handler(_mask_input))
    app.train(UNMASK_ACTION)(_handler(_unmask))


def _handler(step: Step) -> Callable[[Message, Context], Message]:
    """Run one step; turn every exception into an error reply and forget the round.

    ``Exception``, not ``BaseException``: an interrupt still stops the node. The reply names
    a code and its fixed sentence only (:mod:`client.errors`); the detail stays in the log.
    Every reply is written to the site's sent log first (:mod:`client.sent_reply`).
    """

    def handle(msg: Message, context: Context) -> Message:
        try:
            content = step(msg, context)
            check_reply(content)  # a secagg record holds no subgroup cells
            reply = Message(content, reply_to=msg)
            record_reply(reply, request=msg, context=context)  # the sent log, before it leaves
        except Exception as exc:  # the edge: fail closed, no half-finished session survives
            return _error_reply(msg, context, exc)
        return reply

    handle.__name__ = getattr(step, "__name__", getattr(step, "func", step).__name__)
    return handle


def _error_reply(msg: Message, context: Context, exc: Exception) -> Message:
    _forget(context)
    code, sentence = log_refusal(
        exc, message_type=msg.metadata.message_type, node_config=context.node_config
    )
    refused = Message(Error(code=code, reason=sentence), reply_to=msg)
    return record_refusal(refused, request=msg, context=context)


@dataclass(frozen=True)
class SecureInput:
    """What a site masks in a training round: its update, its weight and its integer noise.

    ``update`` holds the round's arrays (the model delta and :data:`LOSS_ARRAY`) within the
    clipping range; ``noise`` is the site's client-level DP share on the integers, or None.
    """

    update: dict[str, np.ndarray]
    weight: int
    noise: np.ndarray | None = None


def check_setup_matches(setup: RoundSetup, global_arrays: dict[str, np.ndarray]) -> None:
    """Refuse a setup that does not describe the model the message carries."""
    expected = {**{k: v.shape for k, v in global_arrays.items()}, LOSS_ARRAY: (1,)}
    if dict(zip(setup.array_names, setup.array_shapes, strict=True)) != expected:
        raise ProtocolError("The round setup does not describe the model it was sent with.")


def _advertise_keys(
    msg: Message, context: Context, *, train_fn: TrainFn, evaluate_fn: EvaluateFn, site_fn: SiteFn
) -> RecordDict:
    """Stage 1: check the setup, evaluate and train, keep the input and session, send keys."""
    setup, participant = invitation_from_fields(_fields(msg))
    identity, roster = load_site_identity(
        NodeConfig.from_user_config(context.node_config),
        sites_dir=str(context.run_config.get("sites-dir", "")),
    )
    session = ClientSession(
        participant, identity=identity, roster=roster, min_threshold=site_fn(context)
    )
    advert = session.advertise_keys(setup)  # verifies the threshold against the site's minimum
    global_arrays = _arrays(msg.content, "the global model")
    counts = evaluate_fn(msg, context) if setup.count_names else {}
    secure = SecureInput(update={}, weight=1)
    if setup.array_names:
        check_setup_matches(setup, global_arrays)
        secure = train_fn(msg, context, setup)
    setup.encode(secure.update, weight=secure.weight, counts=counts, noise=secure.noise)
    context.state[COUNTS_STATE] = ArrayRecord(
        {name: Array(np.ascontiguousarray(value)) for name, value in counts.items()}
    )
    state = {name: Array(np.ascontiguousarray(value)) for name, value in secure.update.items()}
    if secure.noise is not None:
        state[_NOISE] = Array(np.ascontiguousarray(secure.noise))
    context.state[UPDATE_STATE] = ArrayRecord(state)
    _save(context, session, secure.weight)
    return _reply(message_to_fields(advert))


def _share_keys(msg: Message, context: Context) -> RecordDict:
    """Stage 2: secret-share the session's secrets among the live neighbours."""
    session, weight = _load(context)
    shares = session.share_keys(message_from_fields(KeyBroadcast, _fields(msg)))
    _save(context, session, weight)
    return _reply(message_to_fields(shares))


def _mask_input(msg: Message, context: Context) -> RecordDict:
    """Stage 3: store the neighbours' shares and send the masked update."""
    session, weight = _load(context)
    update = context.state.get(UPDATE_STATE)
    if not isinstance(update, ArrayRecord):
        raise ProtocolError("This site holds no update for the round.")
    counts = context.state.get(COUNTS_STATE)
    delivery = message_from_fields(ShareDelivery, _fields(msg))
    arrays = {name: array.numpy() for name, array in update.items()}
    noise = arrays.pop(_NOISE, None)
    masked = session.mask_input(
        delivery,
        arrays,
        weight=weight,
        counts={name: a.numpy() for name, a in counts.items()}
        if isinstance(counts, ArrayRecord)
        else None,
        noise=noise,
    )
    _save(context, session, weight)
    for name in (UPDATE_STATE, COUNTS_STATE):  # keep secrets no longer than needed
        if name in context.state:
            del context.state[name]
    return _reply(message_to_fields(masked))


def _unmask(msg: Message, context: Context) -> RecordDict:
    """Stage 4: release the shares the request may have; the round is then over here."""
    session, _ = _load(context)
    response = session.unmask(message_from_fields(UnmaskRequest, _fields(msg)))
    _forget(context)
    return _reply(message_to_fields(response))


def _fields(msg: Message) -> dict[str, object]:
    record = msg.content.get(keys.SECAGG)
    if not isinstance(record, ConfigRecord):
        raise ProtocolError(
            f"A secure-aggregation message must carry a ConfigRecord '{keys.SECAGG}'."
        )
    return dict(record)


def _arrays(content: RecordDict, what: str) -> dict[str, np.ndarray]:
    record = content.get(keys.ARRAYS)
    if not isinstance(record, ArrayRecord):
        raise ProtocolError(f"No ArrayRecord '{keys.ARRAYS}' with {what}.")
    return {name: array.numpy() for name, array in record.items()}


def _reply(fields: dict[str, FieldValue]) -> RecordDict:
    return RecordDict({keys.SECAGG: ConfigRecord(fields)})  # type: ignore[arg-type]


def _save(context: Context, session: ClientSession, weight: int) -> None:
    context.state[SESSION_STATE] = ConfigRecord({_SESSION: session.snapshot(), _WEIGHT: weight})


def _load(context: Context) -> tuple[ClientSession, int]:
    record = context.state.get(SESSION_STATE)
    if not isinstance(record, ConfigRecord):
        raise ProtocolError(
            "This site has no secure-aggregation round in progress; a round starts with "
            f"the {KEYS_ACTION} message."
        )
    return ClientSession.restore(record[_SESSION]), int(record[_WEIGHT])  # type: ignore[arg-type]


def _forget(context: Context) -> None:
    for name in (SESSION_STATE, UPDATE_STATE, COUNTS_STATE):
        if name in context.state:
            del context.state[name]
