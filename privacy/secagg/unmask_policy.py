"""What a site refuses to unmask: the checks on the coordinator's unmask request.

An unmask request decides which of a site's held shares leave it: the self-mask share of each
survivor and the mask-key share of each dropped neighbour. Both shares of one site together
reveal its input, so a request that could lead there is refused with a specific
:class:`~.errors.RequestRefused`.
"""

from __future__ import annotations

from collections.abc import Mapping

from .errors import (
    ConfigurationError,
    ConflictingUnmaskRequest,
    NotSurvivorError,
    OverlappingSetsError,
    ProtocolError,
    TooFewSurvivorsError,
    UnknownPeerError,
)
from .ids import NodeId, validate_ids
from .messages import ShareKind, UnmaskRequest

__all__ = ["check_unmask_request"]


def check_unmask_request(
    request: UnmaskRequest,
    *,
    site_id: NodeId,
    threshold: int,
    masking_peers: frozenset[NodeId],
    released: Mapping[NodeId, ShareKind],
    answered: tuple[frozenset[NodeId], frozenset[NodeId]] | None,
) -> tuple[tuple[NodeId, ...], tuple[NodeId, ...]]:
    """Return the request's survivors and dropped nodes, or refuse it.

    Parameters
    ----------
    request
        The coordinator's unmask request to this site.
    site_id
        This site's id.
    threshold
        The round's threshold.
    masking_peers
        The neighbours whose shares this site holds for masking.
    released
        The owner and kind of every share this site has released so far.
    answered
        The survivor and dropped sets of the request already answered, if any.

    Raises
    ------
    ProtocolError
        If the listed ids are malformed.
    OverlappingSetsError, UnknownPeerError, NotSurvivorError, TooFewSurvivorsError,
    ConflictingUnmaskRequest
        See :meth:`~.client.ClientSession.unmask`.
    """
    try:
        survivors = validate_ids(request.survivors, what="survivors")
        dropped = validate_ids(request.dropped, what="dropped")
    except ConfigurationError as error:
        raise ProtocolError(str(error)) from error
    overlap = set(survivors) & set(dropped)
    if overlap:
        raise OverlappingSetsError(
            f"Refusing to unmask: {sorted(overlap)} listed both as survivor and as dropped."
        )
    unknown = (set(survivors) | set(dropped)) - masking_peers - {site_id}
    if unknown:
        raise UnknownPeerError(
            f"Refusing to unmask: {sorted(unknown)} are not neighbours that shared keys "
            "with this site."
        )
    if site_id not in survivors:
        raise NotSurvivorError("Refusing to unmask: this site is not listed as a survivor.")
    if len(survivors) < threshold:
        raise TooFewSurvivorsError(
            f"Refusing to unmask: {len(survivors)} survivors are fewer than the threshold "
            f"{threshold}."
        )
    conflicts = [o for o in survivors if released.get(o) is ShareKind.MASK_KEY]
    conflicts += [o for o in dropped if released.get(o) is ShareKind.SELF_MASK]
    if conflicts:
        raise ConflictingUnmaskRequest(
            f"Refusing to unmask: the other share of {sorted(conflicts)} was already "
            "released; both together would reveal their inputs."
        )
    if answered not in (None, (frozenset(survivors), frozenset(dropped))):
        raise ConflictingUnmaskRequest(
            "Refusing to unmask: this round's unmask request was already answered with "
            "other survivor and dropped sets."
        )
    return survivors, dropped
