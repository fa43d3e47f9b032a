"""Site identifiers: validation, ordering and a canonical byte encoding.

A round's sites are all ``int`` (Flower node ids) or all ``str`` (site names); mixing kinds is
refused so that ids sort naturally and travel in homogeneous record lists.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from .errors import ConfigurationError

__all__ = ["NodeId", "encode_fields", "encode_id", "validate_ids"]

NodeId = int | str


def encode_id(node_id: NodeId) -> bytes:
    """Return the canonical bytes of ``node_id`` (distinct for ``1`` and ``"1"``)."""
    if isinstance(node_id, str):
        return b"s:" + node_id.encode("utf-8")
    return b"i:" + str(node_id).encode("ascii")


def encode_fields(*fields: bytes) -> bytes:
    """Concatenate byte fields with 4-byte length prefixes, so no two lists encode alike."""
    return b"".join(len(field).to_bytes(4, "big") + field for field in fields)


def validate_ids(ids: Iterable[object], *, what: str) -> tuple[NodeId, ...]:
    """Check that ``ids`` are distinct ints or distinct non-empty strings of one kind.

    Parameters
    ----------
    ids
        The identifiers, in any order.
    what
        What the ids are, for the error message (for example ``"participants"``).

    Returns
    -------
    tuple
        The ids, in the order given.

    Raises
    ------
    ConfigurationError
        If an id is not an int or str (bools are refused), is empty, or repeats, or the kinds mix.
    """
    result: list[NodeId] = []
    for node_id in ids:
        if isinstance(node_id, bool) or not isinstance(node_id, int | str):
            raise ConfigurationError(
                f"{what} must be ints or strings, got {node_id!r} of type {type(node_id).__name__}."
            )
        if isinstance(node_id, str) and not node_id:
            raise ConfigurationError(f"{what} contain an empty string; give every site a name.")
        result.append(node_id)
    if len({type(node_id) for node_id in result}) > 1:
        raise ConfigurationError(f"{what} mix ints and strings; use one kind of id for a round.")
    if len(set(result)) != len(result):
        raise ConfigurationError(f"{what} contain duplicates: {_duplicates(result)}.")
    return tuple(result)


def _duplicates(ids: Sequence[NodeId]) -> list[NodeId]:
    return [node_id for node_id, count in Counter(ids).items() if count > 1]
