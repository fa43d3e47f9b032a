"""The wire codec of a round: plain values a Flower ConfigRecord can hold, and back.

Flower carries only records of ints, floats, strings, bytes and lists of those. This module
turns the round setup and the stage messages into such plain values and back, checking every
field on the way in: what arrives is untrusted, and a malformed value raises
:class:`~.errors.ProtocolError` (a refusal, never a crash). It also names the Flower train
actions of the four stages and the loss entry of a site's masked vector, which both sides
must agree on.

Framework-free: plain dicts in, plain dicts out; the Flower adapters wrap them in records
(under ``fedrad.core.keys.SECAGG``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from .errors import ConfigurationError, ProtocolError
from .ids import NodeId, validate_ids
from .messages import (
    KeyAdvertisement,
    KeyBroadcast,
    MaskedInput,
    Message,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from .round_setup import RoundSetup

__all__ = [
    "KEYS_ACTION",
    "LOSS_ARRAY",
    "MASK_ACTION",
    "SHARES_ACTION",
    "UNMASK_ACTION",
    "LOSS_RANGE",
    "MESSAGE_FIELD",
    "FieldValue",
    "invitation_from_fields",
    "invitation_to_fields",
    "load_json_object",
    "message_from_fields",
    "message_kind",
    "message_to_fields",
    "setup_from_bytes",
    "setup_to_bytes",
]

FieldValue = int | float | str | bytes | bool | list[int] | list[str] | list[bytes]
"""A value a Flower ConfigRecord can hold (the kinds used here)."""

M = TypeVar("M", bound=Message)

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

_SETUP_FORMAT = "fedrad-secagg-setup/2"
_MAX_JSON_BYTES = 64 << 20

# Field kinds of the stage messages. Each decoder checks the type of an untrusted value.
_STR, _STRS, _ID, _IDS = "str", "strs", "id", "ids"
_BYTES, _BYTES_LIST, _WORDS = "bytes", "bytes-list", "words"
_SPECS: dict[type, tuple[str, dict[str, str]]] = {
    KeyAdvertisement: (
        "key-advertisement",
        {
            "round_id": _STR,
            "sender": _ID,
            "encryption_key": _BYTES,
            "mask_key": _BYTES,
            "signer": _STR,
            "signature": _BYTES,
        },
    ),
    KeyBroadcast: (
        "key-broadcast",
        {
            "round_id": _STR,
            "receiver": _ID,
            "peers": _IDS,
            "encryption_keys": _BYTES_LIST,
            "mask_keys": _BYTES_LIST,
            "signers": _STRS,
            "signatures": _BYTES_LIST,
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


def _key(name: str) -> str:
    return name.replace("_", "-")


def _dtype_key(name: str) -> str:
    return f"{_key(name)}-dtype"


def message_kind(kind: type[Message]) -> str:
    """Return the name the ``message`` field gives a stage message class on the wire.

    Raises
    ------
    ProtocolError
        If ``kind`` is not a stage message.
    """
    if kind not in _SPECS:
        raise ProtocolError(f"{kind.__name__} is not a stage message.")
    return _SPECS[kind][0]


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
    raw = load_json_object(data, _SETUP_FORMAT, "round setup")
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


def load_json_object(data: bytes, expected_format: str, what: str) -> dict[str, Any]:
    """Return the JSON object in ``data``, without its ``format`` field, checking that format.

    Raises
    ------
    ProtocolError
        If ``data`` is too large, not JSON, not an object or of another format; ``what``
        names it in the message.
    """
    if not isinstance(data, bytes) or len(data) > _MAX_JSON_BYTES:
        raise ProtocolError(f"A {what} must be at most {_MAX_JSON_BYTES} bytes of JSON.")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProtocolError(f"A {what} is not valid JSON: {error}") from error
    if not isinstance(raw, dict) or raw.pop("format", None) != expected_format:
        raise ProtocolError(f"A {what} must be a JSON object of format {expected_format!r}.")
    return raw


def _id(value: object) -> NodeId:
    (node_id,) = validate_ids([value], what="id")
    return node_id


def _decode_str(where: str, value: object, _dtype: object) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{where} must be a string, got {type(value).__name__}.")
    return value


def _decode_strs(where: str, value: object, _dtype: object) -> tuple[str, ...]:
    if not isinstance(value, list) or any(not isinstance(item, str) for item in value):
        raise ProtocolError(f"{where} must be a list of strings.")
    return tuple(value)


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
    _STRS: _decode_strs,
    _ID: _decode_id,
    _IDS: _decode_ids,
    _BYTES: _decode_bytes,
    _BYTES_LIST: _decode_bytes_list,
    _WORDS: _decode_words,
}
