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
:data:`~privacy.secagg.wire.LOSS_ARRAY`). The weight is the site's number of training
examples, as in plain FedAvg.

Every reply holds exactly one ConfigRecord, ``secagg``, with one site-to-coordinator message.
A refused or failed request becomes an error reply (code :data:`ERROR_CODE_REFUSED` when the
site refuses a request that could reveal an input, :data:`ERROR_CODE_SECAGG` otherwise), never
a crash. Errors about the site's own update are reported without their values: the reason
travels in the clear.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from client.reply import check_reply
from client.site_identity import load_site_identity
from fedrad.core import keys
from fedrad.core.config import NodeConfig
from fedrad.core.errors import FedradError
from privacy.secagg import (
    ClientSession,
    InputError,
    InputRangeError,
    KeyBroadcast,
    ProtocolError,
    RequestRefused,
    RoundSetup,
    SecAggError,
    ShareDelivery,
    UnmaskRequest,
)
from privacy.secagg.wire import (
    KEYS_ACTION,
    LOSS_ARRAY,
    LOSS_RANGE,
    MASK_ACTION,
    SHARES_ACTION,
    UNMASK_ACTION,
    FieldValue,
    invitation_from_fields,
    message_from_fields,
    message_to_fields,
)

__all__ = ["ERROR_CODE_REFUSED", "ERROR_CODE_SECAGG", "register"]

log = logging.getLogger(__name__)

ERROR_CODE_SECAGG = 101
"""Error code of a secure-aggregation request the site could not serve (bad setup, bad data)."""

ERROR_CODE_REFUSED = 102
"""Error code of a request the site refused because answering could reveal an input."""

# context.state records: site-local, they never leave the node.
SESSION_STATE = "secagg-session"
UPDATE_STATE = "secagg-update"
COUNTS_STATE = "secagg-counts"
_SESSION = "session"
_WEIGHT = "weight"

TrainFn = Callable[[Message, Context], RecordDict]
EvaluateFn = Callable[[Message, Context], dict[str, np.ndarray]]
Step = Callable[[Message, Context], RecordDict]


def register(app: ClientApp, train_fn: TrainFn, evaluate_fn: EvaluateFn) -> None:
    """Add the four secure-aggregation handlers to ``app``.

    Parameters
    ----------
    app
        The site's ClientApp.
    train_fn
        Plain local training: takes a train message (``arrays``, ``config``) and returns the
        reply content of plain FedAvg (``arrays`` with the trained weights, ``metrics`` with
        ``num-examples`` and ``loss-sum``); its errors become error replies.
    evaluate_fn
        Local evaluation of the message's model on the validation split, as the named integer
        counts of ``fedrad.core.evalsums``; its errors become error replies.
    """
    step = functools.partial(_advertise_keys, train_fn=train_fn, evaluate_fn=evaluate_fn)
    app.train(KEYS_ACTION)(_handler(step))
    app.train(SHARES_ACTION)(_handler(_share_keys))
    app.train(MASK_ACTION)(_handler(_mask_input))
    app.train(UNMASK_ACTION)(_handler(_unmask))


def _handler(step: Step) -> Callable[[Message, Context], Message]:
    """Run one step; turn every refusal or failure into an error reply and forget the round."""

    def handle(msg: Message, context: Context) -> Message:
        try:
            content = step(msg, context)
            check_reply(content)  # a secagg record holds no subgroup cells
        except RequestRefused as exc:
            return _error_reply(msg, context, ERROR_CODE_REFUSED, exc)
        except (SecAggError, FedradError) as exc:
            return _error_reply(msg, context, ERROR_CODE_SECAGG, exc)
        except Exception:
            _forget(context)  # fail closed: no half-finished session survives
            raise
        return Message(content, reply_to=msg)

    handle.__name__ = getattr(step, "__name__", getattr(step, "func", step).__name__)
    return handle


def _error_reply(msg: Message, context: Context, code: int, exc: Exception) -> Message:
    _forget(context)
    log.warning("refusing %s: %s: %s", msg.metadata.message_type, type(exc).__name__, exc)
    if isinstance(exc, InputError):  # about the site's own update: keep its values here
        reason = (
            f"{type(exc).__name__}: this site's update does not fit the round (a value outside "
            "the clipping range, or a weight outside [1, max-weight]); details in the site's log"
        )
    else:
        reason = f"{type(exc).__name__}: {exc}"
    return Message(Error(code=code, reason=reason), reply_to=msg)


def _trained_update(
    msg: Message,
    context: Context,
    setup: RoundSetup,
    global_arrays: dict[str, np.ndarray],
    train_fn: TrainFn,
) -> tuple[dict[str, np.ndarray], int]:
    """Train on the message; return the update to mask (with the loss entry) and the weight."""
    expected = {**{k: v.shape for k, v in global_arrays.items()}, LOSS_ARRAY: (1,)}
    if dict(zip(setup.array_names, setup.array_shapes, strict=True)) != expected:
        raise ProtocolError("The round setup does not describe the model it was sent with.")
    trained = train_fn(msg, context)
    trained_arrays = _arrays(trained, "the trained model")
    metrics = trained[keys.METRICS]
    weight = int(metrics[keys.NUM_EXAMPLES])  # type: ignore[arg-type]
    mean_loss = float(metrics[keys.LOSS_SUM]) / max(weight, 1)  # type: ignore[arg-type]
    if not 0.0 <= mean_loss <= LOSS_RANGE:
        raise InputRangeError(
            f"The mean training loss {mean_loss} lies outside [0, {LOSS_RANGE}]: the model "
            "diverged at this site; lower the learning rate."
        )
    if set(trained_arrays) != set(global_arrays):
        raise InputError("The trained model's arrays differ from the global model's.")
    update = {
        name: trained_arrays[name].astype(np.float64) - array.astype(np.float64)
        for name, array in global_arrays.items()
    }
    update[LOSS_ARRAY] = np.array([mean_loss * setup.clipping_range / LOSS_RANGE])
    return update, weight


def _advertise_keys(
    msg: Message, context: Context, *, train_fn: TrainFn, evaluate_fn: EvaluateFn
) -> RecordDict:
    """Stage 1: check the setup, evaluate and train, keep the input and session, send keys."""
    setup, participant = invitation_from_fields(_fields(msg))
    identity, roster = load_site_identity(
        NodeConfig.from_user_config(context.node_config),
        sites_dir=str(context.run_config.get("sites-dir", "")),
    )
    session = ClientSession(participant, identity=identity, roster=roster)
    advert = session.advertise_keys(setup)
    global_arrays = _arrays(msg.content, "the global model")
    counts = evaluate_fn(msg, context) if setup.count_names else {}
    update: dict[str, np.ndarray] = {}
    weight = 1
    if setup.array_names:
        update, weight = _trained_update(msg, context, setup, global_arrays, train_fn)
    setup.encode(update, weight=weight, counts=counts)  # refuse now, before keys are shared
    context.state[COUNTS_STATE] = ArrayRecord(
        {name: Array(np.ascontiguousarray(value)) for name, value in counts.items()}
    )
    context.state[UPDATE_STATE] = ArrayRecord(
        {name: Array(np.ascontiguousarray(value)) for name, value in update.items()}
    )
    _save(context, session, weight)
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
    masked = session.mask_input(
        delivery,
        {name: array.numpy() for name, array in update.items()},
        weight=weight,
        counts={name: a.numpy() for name, a in counts.items()}
        if isinstance(counts, ArrayRecord)
        else None,
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
