"""What a site's secure-aggregation reply may carry: exactly one message a site sends.

A site's replies carry only its own protocol messages (keys, sealed shares, its masked input,
the shares it releases); anything else in the record, a smuggled field included, is refused
before it leaves the site. The client's reply check (``client/reply.py``) calls this for the
secure-aggregation record.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import ProtocolError
from .messages import KeyAdvertisement, MaskedInput, Message, ShareKeys, UnmaskResponse
from .wire import MESSAGE_FIELD, message_from_fields, message_kind

__all__ = ["REPLY_MESSAGES", "check_reply_fields"]

REPLY_MESSAGES: tuple[type[Message], ...] = (
    KeyAdvertisement,
    ShareKeys,
    MaskedInput,
    UnmaskResponse,
)
"""The messages a site sends: the only contents its secure-aggregation replies may carry."""


def check_reply_fields(fields: Mapping[str, Any]) -> None:
    """Check that ``fields`` are exactly one message a site may send (its allow-list).

    Raises
    ------
    ProtocolError
        If the fields are not a well-formed key advertisement, share-keys, masked-input or
        unmask-response message.
    """
    kinds = {message_kind(kind): kind for kind in REPLY_MESSAGES}
    name = fields.get(MESSAGE_FIELD)
    kind = kinds.get(name) if isinstance(name, str) else None
    if kind is None:
        raise ProtocolError(
            f"A secure-aggregation reply must be one of {sorted(kinds)}, got "
            f"{fields.get(MESSAGE_FIELD)!r}."
        )
    message_from_fields(kind, fields)
