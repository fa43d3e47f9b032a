"""The messages of one SecAgg+ round, as plain frozen dataclasses.

Every field is bytes, an int, a float, a string, a tuple of those or a numpy array, so an
adapter can carry a message over Flower records field by field. Mappings travel as parallel
tuples (``peers`` with ``encryption_keys``, ...). Lists arriving from records are turned into
tuples on construction.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any

import numpy as np

from .errors import ProtocolError
from .ids import NodeId

__all__ = [
    "KeyAdvertisement",
    "KeyBroadcast",
    "MaskedInput",
    "Message",
    "ShareDelivery",
    "ShareKeys",
    "ShareKind",
    "Stage",
    "UnmaskRequest",
    "UnmaskResponse",
    "payload_nbytes",
]


class Stage(enum.Enum):
    """The client-to-server messages of a round, in order; ``drop_at`` names one of them.

    A site dropped at a stage vanishes before sending that stage's message.
    """

    ADVERTISE_KEYS = "advertise-keys"
    SHARE_KEYS = "share-keys"
    MASKED_INPUT = "masked-input"
    UNMASK = "unmask"


class ShareKind(enum.Enum):
    """Which secret a released share belongs to."""

    SELF_MASK = "self-mask"  # the seed b of a survivor's self mask
    MASK_KEY = "mask-key"  # the pairwise-mask private key s of a dropped site


def _tuples(message: Any, *names: str) -> None:
    for name in names:
        value = getattr(message, name)
        if isinstance(value, list | tuple):
            object.__setattr__(message, name, tuple(value))
        else:
            raise ProtocolError(f"{type(message).__name__}.{name} must be a list or tuple.")


def _parallel(message: Any, *names: str) -> None:
    _tuples(message, *names)
    lengths = {len(getattr(message, name)) for name in names}
    if len(lengths) != 1:
        raise ProtocolError(f"{type(message).__name__}: {', '.join(names)} differ in length.")


@dataclasses.dataclass(frozen=True)
class KeyAdvertisement:
    """Client to server: the site's two X25519 public keys (32 raw bytes each), signed.

    ``signer`` is the site's name in the consortium's roster; ``signature`` its identity key's
    signature of :func:`~.identity.advertisement_bytes` (the round setup's digest, round,
    sender and both keys), which every peer checks against its own roster.
    """

    round_id: str
    sender: NodeId
    encryption_key: bytes  # c: encrypts the shares sent to this site
    mask_key: bytes  # s: agrees the pairwise masks
    signer: str
    signature: bytes


@dataclasses.dataclass(frozen=True)
class KeyBroadcast:
    """Server to client: the signed public keys of the receiver's neighbours still in the round.

    Each peer's advertisement travels unchanged: its keys, roster name and signature.
    """

    round_id: str
    receiver: NodeId
    peers: tuple[NodeId, ...]
    encryption_keys: tuple[bytes, ...]
    mask_keys: tuple[bytes, ...]
    signers: tuple[str, ...]
    signatures: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _parallel(self, "peers", "encryption_keys", "mask_keys", "signers", "signatures")


@dataclasses.dataclass(frozen=True)
class ShareKeys:
    """Client to server: for each neighbour, its shares of the sender's secrets, encrypted."""

    round_id: str
    sender: NodeId
    receivers: tuple[NodeId, ...]
    sealed_shares: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _parallel(self, "receivers", "sealed_shares")


@dataclasses.dataclass(frozen=True)
class ShareDelivery:
    """Server to client: the encrypted shares the receiver's neighbours sent it."""

    round_id: str
    receiver: NodeId
    senders: tuple[NodeId, ...]
    sealed_shares: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _parallel(self, "senders", "sealed_shares")


@dataclasses.dataclass(frozen=True, eq=False)
class MaskedInput:
    """Client to server: the masked, quantised, weighted update (residues of the modulus)."""

    round_id: str
    sender: NodeId
    masked: np.ndarray


@dataclasses.dataclass(frozen=True)
class UnmaskRequest:
    """Server to client: which of its neighbours survived (sent a masked input) or dropped.

    ``survivors`` includes the receiver itself.
    """

    round_id: str
    receiver: NodeId
    survivors: tuple[NodeId, ...]
    dropped: tuple[NodeId, ...]

    def __post_init__(self) -> None:
        _tuples(self, "survivors", "dropped")


@dataclasses.dataclass(frozen=True)
class UnmaskResponse:
    """Client to server: self-mask shares of survivors and mask-key shares of dropped sites."""

    round_id: str
    sender: NodeId
    self_mask_owners: tuple[NodeId, ...]
    self_mask_shares: tuple[bytes, ...]
    mask_key_owners: tuple[NodeId, ...]
    mask_key_shares: tuple[bytes, ...]

    def __post_init__(self) -> None:
        _parallel(self, "self_mask_owners", "self_mask_shares")
        _parallel(self, "mask_key_owners", "mask_key_shares")


Message = (
    KeyAdvertisement
    | KeyBroadcast
    | ShareKeys
    | ShareDelivery
    | MaskedInput
    | UnmaskRequest
    | UnmaskResponse
)


def payload_nbytes(message: object) -> int:
    """Return the bytes a message carries: raw bytes and array data, 8 per number, UTF-8 text.

    Record framing and field names are not counted.
    """
    if dataclasses.is_dataclass(message) and not isinstance(message, type):
        return sum(payload_nbytes(getattr(message, f.name)) for f in dataclasses.fields(message))
    if isinstance(message, bytes):
        return len(message)
    if isinstance(message, str):
        return len(message.encode("utf-8"))
    if isinstance(message, np.ndarray):
        return int(message.nbytes)
    if isinstance(message, tuple | list):
        return sum(payload_nbytes(item) for item in message)
    if isinstance(message, int | float):
        return 8
    raise TypeError(f"Cannot size a field of type {type(message).__name__}.")
