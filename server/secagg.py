"""One round under secure aggregation (SecAgg+, Bell et al.) over a Flower Grid.

The coordinator learns only the weighted sum of the sites' model updates (weight: their number
of training examples), of their training loss sums and, when asked, the exact sum of their
evaluation counts (:mod:`fedrad.core.evalsums`) for the model it sent; never one site's. The round
takes four exchanges (see :mod:`client.secagg` for the site's side): the round setup with the
global model (the sites evaluate it, train and answer with public keys), then key shares,
masked inputs and unmasking. An evaluation-only round (``train=False``) sums counts only.
:class:`~privacy.secagg.ServerSession` decides who is still in the round: a
node whose reply is missing, an error or malformed at any exchange is dropped, and when too
few remain the round is reported ``"aborted"`` with no model, never as a success.

Flower node ids (uint64) become participant ids ``1..n`` in the order given; the node ids
stay on the coordinator. Each site's key advertisement is signed with its identity key; the
coordinator relays it, signature and roster name included, unchanged to the site's
neighbours, which check it against their own rosters (:mod:`privacy.secagg.identity`).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedrad.core import keys
from fedrad.core.errors import error_text
from privacy.secagg import (
    KeyAdvertisement,
    MaskedInput,
    NodeId,
    ProtocolError,
    RoundAborted,
    RoundSetup,
    SecAggError,
    ServerSession,
    ShareKeys,
    UnmaskResponse,
    default_degree,
)
from privacy.secagg.wire import (
    KEYS_ACTION,
    LOSS_ARRAY,
    LOSS_RANGE,
    MASK_ACTION,
    SHARES_ACTION,
    UNMASK_ACTION,
    FieldValue,
    invitation_to_fields,
    message_from_fields,
    message_to_fields,
)
from server.exchange import describe_failures, node_label, send_and_receive
from server.strategies import numpy_to_arrays

__all__ = ["SecureRoundResult", "default_threshold", "secure_round"]

log = logging.getLogger(__name__)

_Reply = TypeVar("_Reply", KeyAdvertisement, ShareKeys, MaskedInput, UnmaskResponse)


@dataclass(frozen=True)
class SecureRoundResult:
    """The outcome of one secure round.

    Attributes
    ----------
    arrays
        The new global weights: the old ones plus the weighted mean of the sites' updates
        (plain FedAvg of their models, within ``error_bound``); None when the round aborted.
    totals
        Securely summed scalars: ``num-examples`` (the total weight) and ``loss-sum``.
    contributors
        How many sites' updates are in the sum.
    dropped
        The nodes (``"node-<id>"``) whose update is not in the sum.
    aggregated
        The nodes (``"node-<id>"``) whose update (or counts) is in the sum.
    failures
        Why a node was dropped, where it said or failed to answer (``"node-<id>"``).
    status
        ``"completed"`` or ``"aborted"``.
    reason
        Why the round aborted; empty when it completed.
    error_bound
        The largest absolute error of ``arrays`` against exact FedAvg (quantisation).
    seconds
        Wall-clock time of the round, by exchange (``keys`` includes local training).
    counts
        The exact sums of the sites' counts (evaluation of the model sent), by name.
    """

    arrays: dict[str, np.ndarray] | None
    totals: dict[str, float]
    contributors: int
    dropped: list[str]
    failures: dict[str, str]
    status: str
    reason: str = ""
    error_bound: float = 0.0
    seconds: dict[str, float] = field(default_factory=dict)
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    aggregated: list[str] = field(default_factory=list)


def secure_round(
    grid: Grid,
    node_ids: Sequence[int],
    *,
    server_round: int,
    arrays: Mapping[str, np.ndarray],
    site_config: ConfigRecord,
    threshold: int,
    clipping_range: float,
    timeout: float,
    quantisation_bits: int = 16,
    max_weight: int = 1 << 24,
    count_sizes: Mapping[str, int] | None = None,
    max_count: int = 1 << 40,
    train: bool = True,
    signed_values: bool = False,
    names: Mapping[int, str] | None = None,
) -> SecureRoundResult:
    """Run one round on ``node_ids`` and aggregate their updates (and counts) securely.

    With ``train=True`` (a training round) the sites train and their updates are summed; with
    ``train=False`` (an evaluation-only round) only their counts are.

    Parameters
    ----------
    grid
        The ServerApp's grid.
    node_ids
        The sampled nodes (at least 3).
    server_round
        The round number (the sites seed their training with it; also the messages' group).
    arrays
        The current global weights.
    site_config
        The training config sent to every site, as for a plain ``train`` message.
    threshold
        Shares needed to rebuild a secret: more than half of ``len(node_ids)`` (complete
        neighbour graph up to 10 sites) and at most ``len(node_ids) - 1``; the round aborts
        when fewer sites remain.
    clipping_range
        Every update value (trained minus global weight) is clipped to it at the site (the
        site counts the clipped values in its log). Quantisation error grows with it.
    timeout
        Seconds to wait for the replies of each of the four exchanges.
    quantisation_bits, max_weight
        Bits per quantised value; largest number of training examples a site may weigh in.
    count_sizes, max_count
        Named integer counts every site adds, summed exactly (the evaluation of ``arrays``,
        see :mod:`fedrad.core.evalsums`), and the largest one count may be at one site.
    train
        False for an evaluation-only round: the sites do not train, only counts are summed
        (``arrays`` of the result is then empty).
    signed_values
        True under client-level DP: the sites add integer noise to their quantised values, so
        the sum is read as signed and the mean clipped to the range afterwards.
    names
        Node id to site name, for the failures and lists of the result (else ``node-<id>``).
    """
    started = time.monotonic()
    nodes = list(dict.fromkeys(int(n) for n in node_ids))
    node_of: dict[NodeId, int] = {i + 1: node for i, node in enumerate(nodes)}
    failures: dict[str, str] = {}
    seconds: dict[str, float] = {}
    if LOSS_ARRAY in arrays:
        raise ValueError(f"The model may not hold an array named {LOSS_ARRAY!r}.")
    try:
        setup = RoundSetup.create(
            round_id=f"round-{server_round}-{secrets.token_hex(8)}",
            participants=list(node_of),
            threshold=threshold,
            array_shapes=(
                {**{k: np.shape(v) for k, v in arrays.items()}, LOSS_ARRAY: (1,)} if train else {}
            ),
            clipping_range=clipping_range,
            quantisation_bits=quantisation_bits,
            max_weight=max_weight,
            count_sizes=count_sizes,
            max_count=max_count,
            signed_values=signed_values and train,
        )
    except SecAggError as error:
        return _aborted(nodes, failures, f"cannot set up the round: {error}", seconds, names)
    exchange = _Exchange(
        grid,
        node_of,
        group_id=str(server_round),
        timeout=timeout,
        failures=failures,
        seconds=seconds,
        names=names,
    )
    server = ServerSession(setup)
    global_record = numpy_to_arrays(arrays.items())
    try:
        adverts = exchange.run(
            KEYS_ACTION,
            {
                p: RecordDict(
                    {
                        keys.ARRAYS: global_record,
                        keys.CONFIG: site_config,
                        keys.SECAGG: ConfigRecord(invitation_to_fields(setup, p)),  # type: ignore[arg-type]
                    }
                )
                for p in node_of
            },
            KeyAdvertisement,
        )
        broadcasts = server.collect_keys(adverts)
        exchange.note_pruned(KEYS_ACTION, adverts, server.live)
        shares = exchange.run(SHARES_ACTION, _contents(broadcasts), ShareKeys)
        deliveries = server.collect_shares(shares)
        exchange.note_pruned(SHARES_ACTION, shares, server.live)
        masked = exchange.run(MASK_ACTION, _contents(deliveries), MaskedInput)
        requests = server.collect_masked_inputs(masked)
        responses = exchange.run(UNMASK_ACTION, _contents(requests), UnmaskResponse)
        result = server.aggregate(responses)
    except RoundAborted as error:
        return _aborted(nodes, failures, str(error), seconds, names)
    new_arrays: dict[str, np.ndarray] = {}
    totals: dict[str, float] = {keys.NUM_EXAMPLES: result.total_weight}
    if train:
        new_arrays = {name: _add(array, result.arrays[name]) for name, array in arrays.items()}
        mean_loss = float(result.arrays[LOSS_ARRAY][0]) * LOSS_RANGE / clipping_range
        totals[keys.LOSS_SUM] = mean_loss * result.total_weight
    seconds["total"] = round(time.monotonic() - started, 3)
    dropped = [node_label(node_of[p], names) for p in result.dropped]
    log.info(
        "secure %s round %d: %d of %d site(s) aggregated, %d dropped (%.1f s)",
        "training" if train else "evaluation",
        server_round,
        len(result.contributors),
        len(nodes),
        len(dropped),
        seconds["total"],
    )
    return SecureRoundResult(
        arrays=new_arrays,
        totals=totals,
        contributors=len(result.contributors),
        dropped=dropped,
        failures=failures,
        status="completed",
        error_bound=result.error_bound,
        seconds=seconds,
        counts=result.counts,
        aggregated=[node_label(node_of[p], names) for p in sorted(result.contributors)],
    )


def default_threshold(num_sites: int) -> int:
    """Return the smallest threshold a round of ``num_sites`` accepts: the most dropouts.

    That is a majority of each site's share holders (its neighbours and itself), so that no
    split of them can release both secrets of one site; with 3 to 10 sites every site
    neighbours every other, so it is ``num_sites // 2 + 1``.
    """
    degree = min(default_degree(num_sites), num_sites - 1)
    return (degree + 1) // 2 + 1


class _Exchange:
    """Sends one stage's messages and returns the well-formed replies of the expected nodes."""

    def __init__(
        self,
        grid: Grid,
        node_of: Mapping[NodeId, int],
        *,
        group_id: str,
        timeout: float,
        failures: dict[str, str],
        seconds: dict[str, float],
        names: Mapping[int, str] | None = None,
    ) -> None:
        self.grid = grid
        self.names = names
        self.node_of = node_of
        self.participant_of = {node: p for p, node in node_of.items()}
        self.group_id = group_id
        self.timeout = timeout
        self.failures = failures
        self.seconds = seconds

    def run(
        self, action: str, contents: Mapping[NodeId, RecordDict], kind: type[_Reply]
    ) -> list[_Reply]:
        started = time.monotonic()
        messages = [
            Message(
                content=content,
                message_type=f"{MessageType.TRAIN}.{action}",
                dst_node_id=self.node_of[p],
                group_id=self.group_id,
            )
            for p, content in contents.items()
        ]
        answered: dict[NodeId, _Reply] = {}
        for reply in send_and_receive(self.grid, messages, timeout=self.timeout):
            node = reply.metadata.src_node_id
            participant = self.participant_of.get(node)
            if participant is None or participant not in contents or participant in answered:
                log.warning("ignoring an unexpected %s reply from node %s", action, node)
                continue
            message = self._decoded(action, reply, kind, participant)
            if message is not None:
                answered[participant] = message
        for p in contents:
            if p not in answered:
                self.failures.setdefault(
                    node_label(self.node_of[p], self.names),
                    f"{action}: no reply within {self.timeout} s",
                )
        self.seconds[action] = round(time.monotonic() - started, 3)
        return list(answered.values())

    def note_pruned(self, action: str, answered: Sequence[_Reply], live: Sequence[NodeId]) -> None:
        """Record why a node that answered was still dropped (the session logs the detail)."""
        for message in answered:
            if message.sender not in live:
                self.failures.setdefault(
                    node_label(self.node_of[message.sender], self.names),
                    f"{action}: dropped by the protocol (malformed message, or too few live "
                    "neighbours)",
                )

    def _decoded(
        self, action: str, reply: Message, kind: type[_Reply], participant: NodeId
    ) -> _Reply | None:
        name = node_label(reply.metadata.src_node_id, self.names)
        if reply.has_error():
            self.failures[name] = (
                f"{action}: {error_text(int(reply.error.code), str(reply.error.reason))}"
            )
            return None
        try:
            record = reply.content.get(keys.SECAGG)
            if not isinstance(record, ConfigRecord):
                raise ProtocolError(f"no ConfigRecord '{keys.SECAGG}' in the reply")
            message = message_from_fields(kind, dict(record))
            if message.sender != participant:
                raise ProtocolError(f"the reply claims to come from participant {message.sender}")
        except ProtocolError as error:
            self.failures[name] = f"{action}: {error}"
            return None
        return message


def _contents(messages: Mapping[NodeId, object]) -> dict[NodeId, RecordDict]:
    return {p: _record(message_to_fields(m)) for p, m in messages.items()}  # type: ignore[arg-type]


def _record(fields: dict[str, FieldValue]) -> RecordDict:
    return RecordDict({keys.SECAGG: ConfigRecord(fields)})  # type: ignore[arg-type]


def _add(array: np.ndarray, mean_update: np.ndarray) -> np.ndarray:
    total: np.ndarray = np.asarray(array, dtype=np.float64) + mean_update
    if np.issubdtype(array.dtype, np.integer):
        total = np.rint(total)
    return total.astype(array.dtype)


def _aborted(
    nodes: list[int],
    failures: dict[str, str],
    reason: str,
    seconds: dict[str, float],
    names: Mapping[int, str] | None,
) -> SecureRoundResult:
    log.warning("secure round aborted: %s; failures: %s", reason, describe_failures(failures))
    return SecureRoundResult(
        arrays=None,
        totals={},
        contributors=0,
        dropped=[node_label(node, names) for node in nodes],
        failures=failures,
        status="aborted",
        reason=reason,
        seconds=seconds,
    )
