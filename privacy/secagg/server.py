"""The coordinator's side of a SecAgg+ round: collect, prune dropouts, unmask the sum.

Each ``collect_*`` method takes every reply that arrived for one stage and returns the
messages for the next; a site that sent nothing, or something malformed, is dropped from the
round. Sites lost before masking leave everybody's neighbour lists; sites lost after masking
have their pairwise masks removed through their mask-key shares. When too few sites remain to
finish, the server raises :class:`~.errors.RoundAborted` before asking for any share it could
not use, and forgets what it held.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import NoReturn, TypeVar

import numpy as np

from . import keys
from .errors import ProtocolError, RoundAborted, ShareReconstructionError
from .ids import NodeId
from .masking import apply_masks, pairwise_mask_key, pairwise_sign, self_mask_key, wire_dtype
from .messages import (
    KeyAdvertisement,
    KeyBroadcast,
    MaskedInput,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from .quantise import decode_counts, decode_sum, quantisation_bound
from .round_setup import RoundSetup
from .shamir import SHARE_BYTES, combine_shares

__all__ = ["AggregateResult", "ServerSession"]

logger = logging.getLogger(__name__)

_SECRET_BYTES = 32
_SEALED_PAIR_BYTES = 2 * SHARE_BYTES + keys.SEALED_OVERHEAD
_M = TypeVar("_M", KeyAdvertisement, ShareKeys, MaskedInput, UnmaskResponse)


class _Stage(enum.Enum):
    KEYS = enum.auto()
    SHARES = enum.auto()
    MASKED = enum.auto()
    UNMASK = enum.auto()
    DONE = enum.auto()
    ABORTED = enum.auto()


@dataclasses.dataclass(frozen=True)
class AggregateResult:
    """The outcome of a completed round.

    Attributes
    ----------
    arrays
        The weighted mean ``sum(w_i x_i) / sum(w_i)`` over the contributors, by array name.
    total_weight
        ``sum(w_i)`` over the contributors.
    contributors
        The sites whose masked input is in the sum.
    dropped
        The participants whose input is not.
    error_bound
        The largest absolute error of ``arrays`` against the exact weighted mean.
    counts
        The exact sums of the round's counts over the contributors, by count name.
    """

    arrays: dict[str, np.ndarray]
    total_weight: int
    contributors: tuple[NodeId, ...]
    dropped: tuple[NodeId, ...]
    error_bound: float
    counts: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)


class ServerSession:
    """The coordinator's part in one round; send :attr:`setup` to every participant first."""

    def __init__(self, setup: RoundSetup) -> None:
        self.setup = setup
        self._stage = _Stage.KEYS
        self._live: frozenset[NodeId] = frozenset(setup.participants)
        self._neighbours: dict[NodeId, frozenset[NodeId]] = dict(setup.neighbours)
        self._public: dict[NodeId, tuple[bytes, bytes]] = {}
        self._sealed: dict[tuple[NodeId, NodeId], bytes] = {}
        self._masked: dict[NodeId, np.ndarray] = {}
        self._requests: dict[NodeId, tuple[frozenset[NodeId], frozenset[NodeId]]] = {}

    @property
    def live(self) -> tuple[NodeId, ...]:
        """The sites still in the round, in participant order."""
        return self._ordered(self._live)

    def collect_keys(self, adverts: Iterable[KeyAdvertisement]) -> dict[NodeId, KeyBroadcast]:
        """Take the key advertisements; return each live site's neighbours' public keys."""
        self._enter(_Stage.KEYS, _Stage.SHARES)
        accepted = self._accept(adverts, self._check_advert, self._live)
        self._public = {node: (m.encryption_key, m.mask_key) for node, m in accepted.items()}
        self._shrink_to(set(accepted))
        return {
            node: KeyBroadcast(
                round_id=self.setup.round_id,
                receiver=node,
                peers=(peers := self._ordered(self._neighbours[node])),
                encryption_keys=tuple(self._public[p][0] for p in peers),
                mask_keys=tuple(self._public[p][1] for p in peers),
                signers=tuple(accepted[p].signer for p in peers),
                signatures=tuple(accepted[p].signature for p in peers),
            )
            for node in self.live
        }

    def collect_shares(self, messages: Iterable[ShareKeys]) -> dict[NodeId, ShareDelivery]:
        """Take the encrypted shares; return to each live site those addressed to it."""
        self._enter(_Stage.SHARES, _Stage.MASKED)
        accepted = self._accept(messages, self._check_shares, self._live)
        for sender, message in accepted.items():
            for receiver, sealed in zip(message.receivers, message.sealed_shares, strict=True):
                self._sealed[sender, receiver] = sealed
        self._shrink_to(set(accepted))
        return {
            node: ShareDelivery(
                round_id=self.setup.round_id,
                receiver=node,
                senders=(senders := self._ordered(self._neighbours[node])),
                sealed_shares=tuple(self._sealed[s, node] for s in senders),
            )
            for node in self.live
        }

    def collect_masked_inputs(self, messages: Iterable[MaskedInput]) -> dict[NodeId, UnmaskRequest]:
        """Take the masked inputs; return each survivor's request for shares.

        Raises
        ------
        RoundAborted
            If the survivors could not reconstruct every secret needed, before any is asked.
        """
        self._enter(_Stage.MASKED, _Stage.UNMASK)
        accepted = self._accept(messages, self._check_masked, self._live)
        self._masked = {node: m.masked.astype(np.uint64) for node, m in accepted.items()}
        survivors = frozenset(accepted)
        self._abort_unless(len(survivors) >= self.setup.threshold, "too few masked inputs")
        for node in self._live:
            holders = self._neighbours[node] & survivors
            if node in survivors:
                holders |= {node}
            elif not holders:
                continue  # dropped with no surviving neighbour: no mask of it to remove
            self._abort_unless(
                len(holders) >= self.setup.threshold,
                f"too few surviving share holders for site {node!r}",
            )
        for node in self._ordered(survivors):
            self._requests[node] = (
                (self._neighbours[node] | {node}) & survivors,
                self._neighbours[node] - survivors,
            )
        return {
            node: UnmaskRequest(
                round_id=self.setup.round_id,
                receiver=node,
                survivors=self._ordered(kept),
                dropped=self._ordered(lost),
            )
            for node, (kept, lost) in self._requests.items()
        }

    def aggregate(self, responses: Iterable[UnmaskResponse]) -> AggregateResult:
        """Reconstruct the secrets, remove every mask and return the weighted mean.

        Raises
        ------
        RoundAborted
            If too few sites answered or a secret cannot be reconstructed.
        """
        self._enter(_Stage.UNMASK, _Stage.DONE)
        accepted = self._accept(responses, self._check_response, self._requests)
        self._abort_unless(len(accepted) >= self.setup.threshold, "too few unmask responses")
        seed_shares: dict[NodeId, dict[int, bytes]] = {node: {} for node in self._masked}
        key_shares: dict[NodeId, dict[int, bytes]] = {node: {} for node in self._live}
        for sender, response in accepted.items():
            point = self.setup.share_point(sender)
            for owner, share in zip(
                response.self_mask_owners, response.self_mask_shares, strict=True
            ):
                seed_shares[owner][point] = share
            for owner, share in zip(
                response.mask_key_owners, response.mask_key_shares, strict=True
            ):
                key_shares[owner][point] = share
        masks = [self._self_mask(node, shares) for node, shares in seed_shares.items()]
        for node in self._live - set(self._masked):
            masks += self._pairwise_masks_of_dropped(node, key_shares[node])
        total = np.zeros(self.setup.vector_length + 1, dtype=np.uint64)
        for masked in self._masked.values():
            np.add(total, masked, out=total)  # wraps modulo 2^64, a multiple of the modulus
        total = apply_masks(total, masks, modulus_bits=self.setup.modulus_bits)
        try:
            arrays, weight = decode_sum(
                total,
                names=self.setup.array_names,
                shapes=self.setup.array_shapes,
                clipping_range=self.setup.clipping_range,
                bits=self.setup.quantisation_bits,
                signed=self.setup.signed_values,
                modulus_bits=self.setup.modulus_bits,
            )
            counts = decode_counts(
                total,
                value_length=self.setup.value_length,
                names=self.setup.count_names,
                sizes=self.setup.count_sizes,
            )
            if any(
                int(c.max(initial=0)) > len(self._masked) * self.setup.max_count
                for c in counts.values()
            ):
                raise ShareReconstructionError(
                    "A summed count is out of range: some mask was not removed correctly."
                )
        except ShareReconstructionError as error:
            self._abort(str(error))
        contributors = self._ordered(self._masked)
        self._forget()
        return AggregateResult(
            arrays=arrays,
            total_weight=weight,
            contributors=contributors,
            dropped=tuple(p for p in self.setup.participants if p not in contributors),
            error_bound=quantisation_bound(
                clipping_range=self.setup.clipping_range, bits=self.setup.quantisation_bits
            ),
            counts=counts,
        )

    def _self_mask(self, node: NodeId, shares: Mapping[int, bytes]) -> tuple[bytes, int]:
        seed = self._reconstruct(node, shares)
        return self_mask_key(seed, round_id=self.setup.round_id, owner=node), -1

    def _pairwise_masks_of_dropped(
        self, node: NodeId, shares: Mapping[int, bytes]
    ) -> list[tuple[bytes, int]]:
        survivors = self._neighbours[node] & set(self._masked)
        if not survivors:
            return []
        private = keys.load_private_key(self._reconstruct(node, shares))
        if keys.public_bytes(private) != self._public[node][1]:
            self._abort(f"the mask key reconstructed for site {node!r} does not match its key")
        masks = []
        for peer in survivors:
            secret = keys.agree(private, self._public[peer][1])
            key = pairwise_mask_key(secret, round_id=self.setup.round_id, pair=(node, peer))
            masks.append((key, -pairwise_sign(peer, node)))  # undo what the survivor added
        return masks

    def _reconstruct(self, node: NodeId, shares: Mapping[int, bytes]) -> bytes:
        try:
            return combine_shares(
                shares, threshold=self.setup.threshold, secret_bytes=_SECRET_BYTES
            )
        except ShareReconstructionError as error:
            self._abort(f"cannot reconstruct a secret of site {node!r}: {error}")

    def _accept(
        self, messages: Iterable[_M], check: Callable[[_M], None], senders: Iterable[NodeId]
    ) -> dict[NodeId, _M]:
        """Return the valid message of each expected sender; drop senders of malformed ones."""
        expected = set(senders)
        accepted: dict[NodeId, _M] = {}
        rejected: set[NodeId] = set()
        for message in messages:
            sender = message.sender
            if message.round_id != self.setup.round_id or sender not in expected:
                logger.warning("Ignoring a message from %r for round %r", sender, message.round_id)
                continue
            try:
                check(message)
                if sender in accepted or sender in rejected:
                    raise ProtocolError("sent twice")
            except (ProtocolError, ValueError, TypeError) as error:
                logger.warning(
                    "Dropping site %r from round %r: %s", sender, message.round_id, error
                )
                rejected.add(sender)
                accepted.pop(sender, None)
                continue
            accepted[sender] = message
        return accepted

    def _check_advert(self, message: KeyAdvertisement) -> None:
        for key in (message.encryption_key, message.mask_key):
            if not isinstance(key, bytes) or len(key) != keys.KEY_BYTES:
                raise ProtocolError("a public key is not 32 bytes")
        # The sites check the signature against their own rosters; the server relays it as is.
        if not isinstance(message.signer, str) or not 0 < len(message.signer) <= 256:
            raise ProtocolError("the signer is not a roster name of 1 to 256 characters")
        if not isinstance(message.signature, bytes) or not 0 < len(message.signature) <= 256:
            raise ProtocolError("the signature is not 1 to 256 bytes")

    def _check_shares(self, message: ShareKeys) -> None:
        expected = self._neighbours[message.sender]
        if set(message.receivers) != expected or len(message.receivers) != len(expected):
            raise ProtocolError("shares are not addressed to exactly the live neighbours")
        if any(
            not isinstance(s, bytes) or len(s) != _SEALED_PAIR_BYTES for s in message.sealed_shares
        ):
            raise ProtocolError("an encrypted share has the wrong length")

    def _check_masked(self, message: MaskedInput) -> None:
        masked = message.masked
        if not isinstance(masked, np.ndarray) or masked.dtype != wire_dtype(
            self.setup.modulus_bits
        ):
            raise ProtocolError("the masked input has the wrong type or dtype")
        if masked.shape != (self.setup.vector_length + 1,):
            raise ProtocolError(f"the masked input has shape {masked.shape}")
        if masked.size and int(masked.max()) >> self.setup.modulus_bits:
            raise ProtocolError("the masked input exceeds the modulus")

    def _check_response(self, message: UnmaskResponse) -> None:
        survivors, dropped = self._requests[message.sender]
        if (
            set(message.self_mask_owners) != survivors
            or set(message.mask_key_owners) != dropped
            or len(message.self_mask_owners) != len(survivors)
            or len(message.mask_key_owners) != len(dropped)
        ):
            raise ProtocolError("the response does not answer the request")
        shares = (*message.self_mask_shares, *message.mask_key_shares)
        if any(not isinstance(s, bytes) or len(s) != SHARE_BYTES for s in shares):
            raise ProtocolError("a share has the wrong length")

    def _enter(self, expected: _Stage, after: _Stage) -> None:
        if self._stage is not expected:
            raise ProtocolError(
                f"The server is at stage {self._stage.name.lower()}, not {expected.name.lower()}."
            )
        self._stage = after

    def _shrink_to(self, responders: set[NodeId]) -> None:
        """Keep the responders that, with their live neighbours, still hold t shares each."""
        live = set(self._live) & responders
        threshold = self.setup.threshold
        while weak := {n for n in live if len(self._neighbours[n] & live) + 1 < threshold}:
            logger.warning("Dropping sites %r: too few live neighbours", sorted(weak))
            live -= weak
        self._live = frozenset(live)
        self._neighbours = {n: self._neighbours[n] & self._live for n in self._live}
        self._abort_unless(len(live) >= self.setup.threshold, "too few sites remain")

    def _abort_unless(self, condition: bool, reason: str) -> None:
        if not condition:
            self._abort(reason)

    def _abort(self, reason: str) -> NoReturn:
        self._stage = _Stage.ABORTED
        self._forget()
        logger.warning("Secure aggregation round %r aborted: %s", self.setup.round_id, reason)
        raise RoundAborted(f"Round {self.setup.round_id!r} aborted: {reason.rstrip('.')}.")

    def _forget(self) -> None:
        self._sealed.clear()
        self._masked.clear()
        self._requests.clear()

    def _ordered(self, nodes: Iterable[NodeId]) -> tuple[NodeId, ...]:
        members = set(nodes)
        return tuple(p for p in self.setup.participants if p in members)
