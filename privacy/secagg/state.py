"""Plain-value forms of a round, for Flower records and a site's state between messages.

Flower carries only records of ints, floats, strings, bytes and lists of those, and in
deployment every message starts a fresh ClientApp process, so a site's :class:`ClientSession`
must survive in ``context.state`` between the four stages. This module turns the round setup,
the stage messages and a session into such plain values and back, checking every field on
the way in: what arrives from the coordinator is untrusted, and a malformed value raises
:class:`~.errors.ProtocolError` (a refusal, never a crash).

A session's bytes hold its private keys and the shares it holds for its neighbours: they must
stay on the site (Flower's ``context.state`` never leaves the node).

Framework-free: plain dicts in, plain dicts out; the Flower adapters wrap them in records.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from . import keys
from .client import ClientSession
from .errors import ConfigurationError, ProtocolError
from .ids import NodeId, validate_ids
from .messages import (
    KeyAdvertisement,
    KeyBroadcast,
    MaskedInput,
    Message,
    ShareDelivery,
    ShareKeys,
    ShareKind,
    UnmaskRequest,
    UnmaskResponse,
)
from .round_setup import RoundSetup

__all__ = [
    "KEYS_ACTION",
    "LOSS_ARRAY",
    "MASK_ACTION",
    "RECORD",
    "SHARES_ACTION",
    "UNMASK_ACTION",
    "LOSS_RANGE",
    "MESSAGE_FIELD",
    "REPLY_MESSAGES",
    "FieldValue",
    "check_reply_fields",
    "invitation_from_fields",
    "invitation_to_fields",
    "message_from_fields",
    "message_to_fields",
    "session_from_bytes",
    "session_to_bytes",
    "setup_from_bytes",
    "setup_to_bytes",
]

FieldValue = int | float | str | bytes | bool | list[int] | list[str] | list[bytes]
"""A value a Flower ConfigRecord can hold (the kinds used here)."""

M = TypeVar("M", bound=Message)

RECORD = "secagg"
"""The one ConfigRecord a secure-aggregation message carries, in both directions."""

# Flower routes ``train.<action>`` to ``@app.train("<action>")``; an action must be a Python
# identifier, hence the underscores.
KEYS_ACTION = "secagg_keys"
SHARES_ACTION = "secagg_shares"
MASK_ACTION = "secagg_mask"
UNMASK_ACTION = "secagg_unmask"

MESSAGE_FIELD = "message"
"""The field naming the kind of stage message a record holds."""

LOSS_ARRAY = "fedrad:mean-training-loss"
"""The extra entry of a site's masked vector: its mean training loss, scaled (see LOSS_RANGE).

It cannot clash with a model array: PyTorch state-dict keys never hold a colon.
"""

LOSS_RANGE = 64.0
"""Largest mean training loss a site can report under secure aggregation.

The entry holds ``mean_loss * clipping_range / LOSS_RANGE``, within the clipping range, so the
securely averaged entry times ``LOSS_RANGE / clipping_range`` times the total weight is the
sum of the sites' loss sums, with an error of at most ``total_weight * LOSS_RANGE /
(2^bits - 1)``. A site whose mean loss exceeds it (a diverged model) refuses the round.
"""

_SESSION_FORMAT = "fedrad-secagg-session/1"
_SETUP_FORMAT = "fedrad-secagg-setup/2"
_MAX_JSON_BYTES = 64 << 20

# Field kinds of the stage messages. Each decoder checks the type of an untrusted value.
_STR, _ID, _IDS, _BYTES, _BYTES_LIST, _WORDS = "str", "id", "ids", "bytes", "bytes-list", "words"
_SPECS: dict[type, tuple[str, dict[str, str]]] = {
    KeyAdvertisement: (
        "key-advertisement",
        {"round_id": _STR, "sender": _ID, "encryption_key": _BYTES, "mask_key": _BYTES},
    ),
    KeyBroadcast: (
        "key-broadcast",
        {
            "round_id": _STR,
            "receiver": _ID,
            "peers": _IDS,
            "encryption_keys": _BYTES_LIST,
            "mask_keys": _BYTES_LIST,
        },
    ),
    ShareKeys: (
        "share-keys",
        {"round_id": _STR, "sender": _ID, "receivers": _IDS, "sealed_shares": _BYTES_LIST},
    ),
    ShareDelivery: (
        "share-delivery",
        {"round_id": _STR, "receiver": _ID, "senders": _IDS, "sealed_shares": _BYTES_LIST},
    ),
    MaskedInput: ("masked-input", {"round_id": _STR, "sender": _ID, "masked": _WORDS}),
    UnmaskRequest: (
        "unmask-request",
        {"round_id": _STR, "receiver": _ID, "survivors": _IDS, "dropped": _IDS},
    ),
    UnmaskResponse: (
        "unmask-response",
        {
            "round_id": _STR,
            "sender": _ID,
            "self_mask_owners": _IDS,
            "self_mask_shares": _BYTES_LIST,
            "mask_key_owners": _IDS,
            "mask_key_shares": _BYTES_LIST,
        },
    ),
}
_WORD_DTYPES: dict[str, np.dtype[Any]] = {"uint32": np.dtype("<u4"), "uint64": np.dtype("<u8")}

REPLY_MESSAGES: tuple[type, ...] = (KeyAdvertisement, ShareKeys, MaskedInput, UnmaskResponse)
"""The messages a site sends: the only contents its secure-aggregation replies may carry."""


def _key(name: str) -> str:
    return name.replace("_", "-")


def _dtype_key(name: str) -> str:
    return f"{_key(name)}-dtype"


def message_to_fields(message: Message) -> dict[str, FieldValue]:
    """Return a stage message as kebab-case fields a Flower ConfigRecord can hold.

    Tuples become lists; a numpy vector becomes its little-endian bytes plus a ``-dtype``
    field.
    """
    kind, spec = _SPECS[type(message)]
    fields: dict[str, FieldValue] = {MESSAGE_FIELD: kind}
    for name, field_kind in spec.items():
        value = getattr(message, name)
        if field_kind == _WORDS:
            dtype_name = np.dtype(value.dtype).name
            if dtype_name not in _WORD_DTYPES:
                raise ProtocolError(f"{type(message).__name__}.{name} has dtype {dtype_name}.")
            fields[_key(name)] = np.ascontiguousarray(value, _WORD_DTYPES[dtype_name]).tobytes()
            fields[_dtype_key(name)] = dtype_name
        elif isinstance(value, tuple):
            fields[_key(name)] = list(value)
        else:
            fields[_key(name)] = value
    return fields


def message_from_fields(kind: type[M], fields: Mapping[str, Any]) -> M:
    """Rebuild a stage message of class ``kind`` from untrusted fields.

    Raises
    ------
    ProtocolError
        If a field is missing, unknown or of the wrong type, or the fields name another kind.
    """
    if kind not in _SPECS:
        raise ProtocolError(f"{kind.__name__} is not a stage message.")
    name, spec = _SPECS[kind]
    expected = {MESSAGE_FIELD} | {_key(n) for n in spec}
    expected |= {_dtype_key(n) for n, k in spec.items() if k == _WORDS}
    if set(fields) != expected:
        missing, extra = sorted(expected - set(fields)), sorted(set(fields) - expected)
        raise ProtocolError(
            f"A {name} message must hold exactly the fields {sorted(expected)}; missing "
            f"{missing}, unexpected {extra}."
        )
    if fields[MESSAGE_FIELD] != name:
        raise ProtocolError(f"Expected a {name} message, got {fields[MESSAGE_FIELD]!r}.")
    values: dict[str, Any] = {
        n: _DECODERS[k](f"{name}.{_key(n)}", fields[_key(n)], fields.get(_dtype_key(n)))
        for n, k in spec.items()
    }
    return kind(**values)


def check_reply_fields(fields: Mapping[str, Any]) -> None:
    """Check that ``fields`` are exactly one message a site may send (its allow-list).

    Raises
    ------
    ProtocolError
        If the fields are not a well-formed key advertisement, share-keys, masked-input or
        unmask-response message.
    """
    kinds = {_SPECS[kind][0]: kind for kind in REPLY_MESSAGES}
    name = fields.get(MESSAGE_FIELD)
    kind = kinds.get(name) if isinstance(name, str) else None
    if kind is None:
        raise ProtocolError(
            f"A secure-aggregation reply must be one of {sorted(kinds)}, got "
            f"{fields.get(MESSAGE_FIELD)!r}."
        )
    message_from_fields(kind, fields)


def invitation_to_fields(setup: RoundSetup, participant: NodeId) -> dict[str, FieldValue]:
    """Return the first request of a round: the setup and the receiver's participant id."""
    return {
        MESSAGE_FIELD: "round-setup",
        "setup": setup_to_bytes(setup),
        "participant": participant,
    }


def invitation_from_fields(fields: Mapping[str, Any]) -> tuple[RoundSetup, NodeId]:
    """Rebuild what :func:`invitation_to_fields` made, checking it.

    Raises
    ------
    ProtocolError, ConfigurationError
        If the fields are malformed or the setup is invalid.
    """
    if set(fields) != {MESSAGE_FIELD, "setup", "participant"} or (
        fields[MESSAGE_FIELD] != "round-setup"
    ):
        raise ProtocolError(f"A round-setup request has fields {sorted(fields)}.")
    participant = _decode_id("round-setup.participant", fields["participant"], None)
    return setup_from_bytes(_decode_bytes("round-setup.setup", fields["setup"], None)), participant


def setup_to_bytes(setup: RoundSetup) -> bytes:
    """Return the setup as UTF-8 JSON."""
    fields = {f.name: getattr(setup, f.name) for f in dataclasses.fields(setup)}
    return json.dumps({"format": _SETUP_FORMAT, **fields}).encode("utf-8")


def setup_from_bytes(data: bytes) -> RoundSetup:
    """Rebuild a setup from :func:`setup_to_bytes`; it validates itself on construction.

    Raises
    ------
    ProtocolError
        If the bytes are not a setup of this format.
    ConfigurationError
        If the setup's parameters are invalid.
    """
    raw = _load_json(data, _SETUP_FORMAT, "round setup")
    names = {f.name for f in dataclasses.fields(RoundSetup)}
    if set(raw) != names:
        raise ProtocolError(f"A round setup must hold exactly {sorted(names)}.")
    for name in ("participants", "array_names", "array_shapes", "count_names", "count_sizes"):
        if not isinstance(raw[name], list):
            raise ProtocolError(f"The round setup's {name} must be a list.")
    if any(not isinstance(shape, list) for shape in raw["array_shapes"]):
        raise ProtocolError("The round setup's array shapes must be lists.")
    try:
        return RoundSetup(**raw)
    except TypeError as error:  # a field of an unusable type
        raise ProtocolError(f"Malformed round setup: {error}") from error


# ClientSession's attributes, read and set here so that the session class keeps no
# persistence code. A new attribute must be added to both functions: to_bytes checks the set.
_SESSION_ATTRIBUTES = frozenset(
    {
        "site_id",
        "_min_threshold",
        "_max_vector_length",
        "_stage",
        "_setup",
        "_encryption_key",
        "_mask_key",
        "_peer_mask_keys",
        "_peer_encryption_keys",
        "_self_mask_seed",
        "_held",
        "_masking_peers",
        "_released",
        "_answered",
    }
)


def session_to_bytes(session: ClientSession) -> bytes:
    """Return everything ``session`` holds, its private keys included, as UTF-8 JSON.

    Raises
    ------
    TypeError
        If ClientSession has attributes this module does not know (update both together).
    """
    attributes = vars(session)
    if set(attributes) != _SESSION_ATTRIBUTES:
        raise TypeError(
            "ClientSession's attributes changed: "
            f"{sorted(set(attributes) ^ _SESSION_ATTRIBUTES)}; update privacy/secagg/state.py."
        )
    setup = attributes["_setup"]
    answered = attributes["_answered"]
    state = {
        "format": _SESSION_FORMAT,
        "site-id": session.site_id,
        "min-threshold": attributes["_min_threshold"],
        "max-vector-length": attributes["_max_vector_length"],
        "stage": attributes["_stage"].name,
        "setup": None if setup is None else setup_to_bytes(setup).decode("utf-8"),
        "encryption-key": _b64(keys.private_bytes(attributes["_encryption_key"])),
        "mask-key": _b64(keys.private_bytes(attributes["_mask_key"])),
        "peer-mask-keys": [[p, _b64(k)] for p, k in attributes["_peer_mask_keys"].items()],
        "peer-encryption-keys": [
            [p, _b64(k)] for p, k in attributes["_peer_encryption_keys"].items()
        ],
        "self-mask-seed": _b64(attributes["_self_mask_seed"]),
        "held": [[o, _b64(s), _b64(k)] for o, (s, k) in attributes["_held"].items()],
        "masking-peers": sorted(attributes["_masking_peers"]),
        "released": [[o, kind.value] for o, kind in attributes["_released"].items()],
        "answered": None if answered is None else [sorted(answered[0]), sorted(answered[1])],
    }
    return json.dumps(state).encode("utf-8")


def session_from_bytes(data: bytes) -> ClientSession:
    """Rebuild the session :func:`session_to_bytes` saved, at the stage it had reached.

    Raises
    ------
    ProtocolError
        If the bytes are not a saved session of this format.
    """
    raw = _load_json(data, _SESSION_FORMAT, "saved session")
    try:
        session = ClientSession(
            raw["site-id"],
            min_threshold=raw["min-threshold"],
            max_vector_length=raw["max-vector-length"],
        )
        stage_type = type(vars(session)["_stage"])
        setup = raw["setup"]
        restored = {
            "_stage": stage_type[raw["stage"]],
            "_setup": None if setup is None else setup_from_bytes(setup.encode("utf-8")),
            "_encryption_key": keys.load_private_key(_unb64(raw["encryption-key"])),
            "_mask_key": keys.load_private_key(_unb64(raw["mask-key"])),
            "_peer_mask_keys": {_id(p): _unb64(k) for p, k in raw["peer-mask-keys"]},
            "_peer_encryption_keys": {_id(p): _unb64(k) for p, k in raw["peer-encryption-keys"]},
            "_self_mask_seed": _unb64(raw["self-mask-seed"]),
            "_held": {_id(o): (_unb64(s), _unb64(k)) for o, s, k in raw["held"]},
            "_masking_peers": frozenset(validate_ids(raw["masking-peers"], what="peers")),
            "_released": {_id(o): ShareKind(kind) for o, kind in raw["released"]},
            "_answered": None
            if raw["answered"] is None
            else tuple(frozenset(validate_ids(ids, what="ids")) for ids in raw["answered"]),
        }
    except (KeyError, TypeError, ValueError, ConfigurationError) as error:
        raise ProtocolError(f"Malformed saved session: {error!r}") from error
    vars(session).update(restored)
    return session


def _load_json(data: bytes, expected_format: str, what: str) -> dict[str, Any]:
    if not isinstance(data, bytes) or len(data) > _MAX_JSON_BYTES:
        raise ProtocolError(f"A {what} must be at most {_MAX_JSON_BYTES} bytes of JSON.")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProtocolError(f"A {what} is not valid JSON: {error}") from error
    if not isinstance(raw, dict) or raw.pop("format", None) != expected_format:
        raise ProtocolError(f"A {what} must be a JSON object of format {expected_format!r}.")
    return raw


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _id(value: object) -> NodeId:
    (node_id,) = validate_ids([value], what="id")
    return node_id


def _decode_str(where: str, value: object, _dtype: object) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{where} must be a string, got {type(value).__name__}.")
    return value


def _decode_id(where: str, value: object, _dtype: object) -> NodeId:
    try:
        return _id(value)
    except ConfigurationError as error:
        raise ProtocolError(f"{where}: {error}") from error


def _decode_ids(where: str, value: object, _dtype: object) -> tuple[NodeId, ...]:
    if not isinstance(value, list):
        raise ProtocolError(f"{where} must be a list of ids, got {type(value).__name__}.")
    try:
        return validate_ids(value, what=where)
    except ConfigurationError as error:
        raise ProtocolError(str(error)) from error


def _decode_bytes(where: str, value: object, _dtype: object) -> bytes:
    if not isinstance(value, bytes):
        raise ProtocolError(f"{where} must be bytes, got {type(value).__name__}.")
    return value


def _decode_bytes_list(where: str, value: object, _dtype: object) -> tuple[bytes, ...]:
    if not isinstance(value, list) or any(not isinstance(item, bytes) for item in value):
        raise ProtocolError(f"{where} must be a list of bytes.")
    return tuple(value)


def _decode_words(where: str, value: object, dtype_name: object) -> np.ndarray:
    data = _decode_bytes(where, value, None)
    dtype = _WORD_DTYPES.get(dtype_name)  # type: ignore[call-overload]
    if dtype is None:
        raise ProtocolError(f"{where}-dtype must be one of {sorted(_WORD_DTYPES)}.")
    if len(data) % dtype.itemsize:
        raise ProtocolError(f"{where} holds {len(data)} bytes, not whole {dtype_name} words.")
    return np.frombuffer(data, dtype=dtype).astype(dtype.newbyteorder("="))


_DECODERS: dict[str, Callable[[str, object, object], object]] = {
    _STR: _decode_str,
    _ID: _decode_id,
    _IDS: _decode_ids,
    _BYTES: _decode_bytes,
    _BYTES_LIST: _decode_bytes_list,
    _WORDS: _decode_words,
}
