"""The site's side of a SecAgg+ round: a state machine that refuses unsafe requests.

Threat model: the coordinator is honest but curious, and may also send malformed or malicious
requests; the client then refuses with a specific :class:`~.errors.RequestRefused` rather than
release anything that could unmask its own or a neighbour's input. Round keys are
authenticated (:mod:`.identity`): a site signs its keys with its long-term identity key, bound
to the round setup it saw, and before sharing anything checks every peer's signature against
the roster it holds locally, so a coordinator cannot substitute keys of its own (a
man-in-the-middle that would read the site's shares and unmask its update), pad the round
with sites outside the roster, count one site twice, or show sites different setups. A
session that raised once is finished and answers nothing more.

A session can be saved mid-round (:meth:`ClientSession.snapshot`) and rebuilt at the stage it
had reached (:meth:`ClientSession.restore`): in deployment every message starts a fresh
ClientApp process, so the session lives in ``context.state`` between the four stages. Its
snapshot holds its private keys and the shares it holds for its neighbours: it must stay on
the site (Flower's ``context.state`` never leaves the node).
"""

from __future__ import annotations

import base64
import contextlib
import enum
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from . import keys
from .errors import ConfigurationError, IdentityError, PeerAuthenticationError, ProtocolError
from .identity import Roster, SiteIdentity, advertisement_bytes, verify
from .ids import NodeId, validate_ids
from .masking import apply_masks, pairwise_mask_key, pairwise_sign, self_mask_key, wire_dtype
from .messages import (
    KeyAdvertisement,
    KeyBroadcast,
    MaskedInput,
    ShareDelivery,
    ShareKeys,
    ShareKind,
    UnmaskRequest,
    UnmaskResponse,
)
from .round_setup import MAX_VECTOR_LENGTH, RoundSetup
from .shamir import SHARE_BYTES, split_secret
from .unmask_policy import check_unmask_request
from .wire import load_json_object, setup_from_bytes, setup_to_bytes

__all__ = ["ClientSession"]

_SEED_BYTES = 32
_SNAPSHOT_FORMAT = "fedrad-secagg-session/2"


class _Stage(enum.Enum):
    NEW = enum.auto()
    ADVERTISED = enum.auto()
    SHARED = enum.auto()
    MASKED = enum.auto()
    UNMASKED = enum.auto()
    FAILED = enum.auto()


class ClientSession:
    """One site's part in one round; create a fresh session for every round.

    Parameters
    ----------
    site_id
        This site's id, as the coordinator lists it.
    identity
        This site's long-term identity (its private key signs the round keys), listed in
        ``roster`` under its name.
    roster
        The consortium's sites, as this site holds them locally: every peer must sign its
        round keys with the key the roster lists for the name it signs as.
    min_threshold
        The smallest threshold this site accepts (a site limit from its node config).
    max_vector_length
        The largest update this site accepts to mask.

    Raises
    ------
    IdentityError
        If ``roster`` does not list ``identity`` under its name.
    """

    def __init__(
        self,
        site_id: NodeId,
        *,
        identity: SiteIdentity,
        roster: Roster,
        min_threshold: int = 2,
        max_vector_length: int = MAX_VECTOR_LENGTH,
    ) -> None:
        (self.site_id,) = validate_ids([site_id], what="site_id")
        if min_threshold < 2:
            raise ConfigurationError(f"min_threshold must be at least 2, got {min_threshold}.")
        listed = roster.key_of(identity.name)
        if listed is None or listed != identity.public_key:
            raise IdentityError(
                f"This site's roster does not list its identity key under {identity.name!r}."
            )
        self._identity = identity
        self._roster = roster
        self._min_threshold = min_threshold
        self._max_vector_length = max_vector_length
        self._stage = _Stage.NEW
        self._setup: RoundSetup | None = None
        self._encryption_key = keys.generate_private_key()
        self._mask_key = keys.generate_private_key()
        self._peer_mask_keys: dict[NodeId, bytes] = {}
        self._peer_encryption_keys: dict[NodeId, bytes] = {}
        self._self_mask_seed = b""
        self._held: dict[NodeId, tuple[bytes, bytes]] = {}  # owner -> (self-mask, mask-key) share
        self._masking_peers: frozenset[NodeId] = frozenset()
        self._released: dict[NodeId, ShareKind] = {}
        self._answered: tuple[frozenset[NodeId], frozenset[NodeId]] | None = None

    def snapshot(self) -> bytes:
        """Return everything this session holds, its private keys included, as UTF-8 JSON.

        :meth:`restore` rebuilds the session from it at the stage it had reached. A new
        attribute of the session must be saved here and rebuilt there.
        """
        setup, answered = self._setup, self._answered
        state = {
            "format": _SNAPSHOT_FORMAT,
            "site-id": self.site_id,
            "identity": [self._identity.name, _public_text(self._identity.public_key)],
            "roster": self._roster.to_bytes().decode("utf-8"),
            "min-threshold": self._min_threshold,
            "max-vector-length": self._max_vector_length,
            "stage": self._stage.name,
            "setup": None if setup is None else setup_to_bytes(setup).decode("utf-8"),
            "encryption-key": _b64(keys.private_bytes(self._encryption_key)),
            "mask-key": _b64(keys.private_bytes(self._mask_key)),
            "peer-mask-keys": [[p, _b64(k)] for p, k in self._peer_mask_keys.items()],
            "peer-encryption-keys": [[p, _b64(k)] for p, k in self._peer_encryption_keys.items()],
            "self-mask-seed": _b64(self._self_mask_seed),
            "held": [[o, _b64(s), _b64(k)] for o, (s, k) in self._held.items()],
            "masking-peers": sorted(self._masking_peers),
            "released": [[o, kind.value] for o, kind in self._released.items()],
            "answered": None if answered is None else [sorted(answered[0]), sorted(answered[1])],
        }
        return json.dumps(state).encode("utf-8")

    @classmethod
    def restore(cls, data: bytes) -> ClientSession:
        """Rebuild the session :meth:`snapshot` saved, at the stage it had reached.

        Raises
        ------
        ProtocolError
            If the bytes are not a saved session of this format.
        """
        raw = load_json_object(data, _SNAPSHOT_FORMAT, "saved session")
        try:
            name, public = raw["identity"]
            session = cls(
                raw["site-id"],
                identity=SiteIdentity(name=name, public_key=_public_key(public)),
                roster=Roster.from_bytes(raw["roster"].encode("utf-8")),
                min_threshold=raw["min-threshold"],
                max_vector_length=raw["max-vector-length"],
            )
            session._load_snapshot(raw)
        except (KeyError, TypeError, ValueError, ConfigurationError) as error:
            raise ProtocolError(f"Malformed saved session: {error!r}") from error
        return session

    def _load_snapshot(self, raw: dict[str, Any]) -> None:
        setup = raw["setup"]
        self._stage = _Stage[raw["stage"]]
        self._setup = None if setup is None else setup_from_bytes(setup.encode("utf-8"))
        self._encryption_key = keys.load_private_key(_unb64(raw["encryption-key"]))
        self._mask_key = keys.load_private_key(_unb64(raw["mask-key"]))
        self._peer_mask_keys = {_id(p): _unb64(k) for p, k in raw["peer-mask-keys"]}
        self._peer_encryption_keys = {_id(p): _unb64(k) for p, k in raw["peer-encryption-keys"]}
        self._self_mask_seed = _unb64(raw["self-mask-seed"])
        self._held = {_id(o): (_unb64(s), _unb64(k)) for o, s, k in raw["held"]}
        self._masking_peers = frozenset(validate_ids(raw["masking-peers"], what="peers"))
        self._released = {_id(o): ShareKind(kind) for o, kind in raw["released"]}
        answered = raw["answered"]
        self._answered = (
            None
            if answered is None
            else (
                frozenset(validate_ids(answered[0], what="ids")),
                frozenset(validate_ids(answered[1], what="ids")),
            )
        )

    @property
    def released(self) -> Mapping[NodeId, ShareKind]:
        """The owner and kind of every share this session has released (for audit and tests)."""
        return MappingProxyType(self._released)

    @property
    def failed(self) -> bool:
        """Whether the session raised and is finished."""
        return self._stage is _Stage.FAILED

    def advertise_keys(self, setup: RoundSetup) -> KeyAdvertisement:
        """Check the round parameters and answer with this site's two public keys.

        Raises
        ------
        ConfigurationError
            If the site is not a participant, the threshold is below this site's minimum, the
            site has fewer neighbours than the threshold, or the update is too large.
        """
        with self._step(_Stage.NEW, _Stage.ADVERTISED):
            if self.site_id not in setup.participants:
                raise ConfigurationError(f"Site {self.site_id!r} is not among the participants.")
            if setup.threshold < self._min_threshold:
                raise ConfigurationError(
                    f"threshold {setup.threshold} is below this site's minimum "
                    f"{self._min_threshold}; the coordinator must raise it."
                )
            if len(setup.neighbours[self.site_id]) < setup.threshold:
                raise ConfigurationError("This site has fewer neighbours than the threshold.")
            if setup.vector_length > self._max_vector_length:
                raise ConfigurationError(
                    f"An update of {setup.vector_length} values exceeds this site's limit of "
                    f"{self._max_vector_length}."
                )
            self._check_round_size(setup)
            self._setup = setup
            encryption_key = keys.public_bytes(self._encryption_key)
            mask_key = keys.public_bytes(self._mask_key)
            signed = advertisement_bytes(
                setup_digest=_digest(setup),
                round_id=setup.round_id,
                sender=self.site_id,
                signer=self._identity.name,
                encryption_key=encryption_key,
                mask_key=mask_key,
            )
            return KeyAdvertisement(
                round_id=setup.round_id,
                sender=self.site_id,
                encryption_key=encryption_key,
                mask_key=mask_key,
                signer=self._identity.name,
                signature=self._identity.sign(signed),
            )

    def share_keys(self, broadcast: KeyBroadcast) -> ShareKeys:
        """Secret-share this site's self-mask seed and mask key among the live neighbours.

        Every peer is authenticated first (:meth:`_authenticate`); nothing is shared unless
        all are.

        Raises
        ------
        PeerAuthenticationError
            If a peer's signature is bad, a peer signs as a name not in this site's roster, or
            the round does not match the roster (see :meth:`_authenticate`).
        ProtocolError
            If the broadcast is for another round or site, lists a non-neighbour, or carries
            an unusable key.
        ConfigurationError
            If too few neighbours remain for the threshold.
        """
        with self._step(_Stage.ADVERTISED, _Stage.SHARED):
            setup = self._checked_setup(broadcast.round_id, broadcast.receiver)
            peers = self._checked_peers(broadcast.peers, setup.neighbours[self.site_id])
            self._authenticate(setup, broadcast)
            for peer, encryption_key, mask_key in zip(
                peers, broadcast.encryption_keys, broadcast.mask_keys, strict=True
            ):
                keys.agree(self._mask_key, mask_key)  # refuse unusable keys before sharing
                self._peer_encryption_keys[peer] = encryption_key
                self._peer_mask_keys[peer] = mask_key
            self._self_mask_seed = os.urandom(_SEED_BYTES)
            holders = [*peers, self.site_id]
            points = {node: setup.share_point(node) for node in holders}
            xs = list(points.values())
            seed_shares = split_secret(self._self_mask_seed, threshold=setup.threshold, xs=xs)
            key_shares = split_secret(
                keys.private_bytes(self._mask_key), threshold=setup.threshold, xs=xs
            )
            own = points[self.site_id]
            self._held[self.site_id] = (seed_shares[own], key_shares[own])
            sealed = tuple(
                self._seal(peer, seed_shares[points[peer]] + key_shares[points[peer]])
                for peer in peers
            )
            return ShareKeys(
                round_id=setup.round_id, sender=self.site_id, receivers=peers, sealed_shares=sealed
            )

    def mask_input(
        self,
        delivery: ShareDelivery,
        arrays: Mapping[str, np.ndarray],
        *,
        weight: int,
        counts: Mapping[str, np.ndarray] | None = None,
        noise: np.ndarray | None = None,
    ) -> MaskedInput:
        """Store the neighbours' shares, then quantise, weight and mask the update.

        Parameters
        ----------
        delivery
            The encrypted shares from the neighbours that completed key sharing.
        arrays
            The update, named as in the round setup, every value within the clipping range.
        weight
            The site's integer weight (for example its number of training examples).
        counts
            The round's named counts (non-negative integers, summed exactly), if it has any.
        noise
            Integer noise added to the quantised values (client-level DP; a round with
            ``signed_values`` only).

        Raises
        ------
        InputError, InputRangeError
            If the update does not fit the round; nothing is clipped.
        ShareDecryptionError
            If a share fails authentication.
        """
        with self._step(_Stage.SHARED, _Stage.MASKED):
            setup = self._checked_setup(delivery.round_id, delivery.receiver)
            encoded = setup.encode(arrays, weight=weight, counts=counts, noise=noise)
            senders = self._checked_peers(delivery.senders, self._peer_mask_keys)
            for sender, sealed in zip(senders, delivery.sealed_shares, strict=True):
                self._held[sender] = self._open(sender, sealed)
            self._masking_peers = frozenset(senders)
            masks = [
                (
                    self_mask_key(
                        self._self_mask_seed, round_id=setup.round_id, owner=self.site_id
                    ),
                    1,
                )
            ]
            for peer in senders:
                secret = keys.agree(self._mask_key, self._peer_mask_keys[peer])
                key = pairwise_mask_key(secret, round_id=setup.round_id, pair=(self.site_id, peer))
                masks.append((key, pairwise_sign(self.site_id, peer)))
            masked = apply_masks(encoded, masks, modulus_bits=setup.modulus_bits)
            return MaskedInput(
                round_id=setup.round_id,
                sender=self.site_id,
                masked=masked.astype(wire_dtype(setup.modulus_bits)),
            )

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Release self-mask shares of survivors and mask-key shares of dropped neighbours.

        A retry of the same request gets the same answer; any other request is refused.

        Raises
        ------
        OverlappingSetsError
            If a node is listed as both survivor and dropped.
        UnknownPeerError
            If a listed node is not a neighbour that shared keys with this site.
        NotSurvivorError
            If this site is not listed among the survivors.
        TooFewSurvivorsError
            If fewer survivors than the threshold are listed.
        ConflictingUnmaskRequest
            If the request asks for the other share of a peer already released, or differs
            from a request already answered.
        """
        with self._step(_Stage.MASKED, _Stage.UNMASKED, also=_Stage.UNMASKED):
            setup = self._checked_setup(request.round_id, request.receiver)
            survivors, dropped = check_unmask_request(
                request,
                site_id=self.site_id,
                threshold=setup.threshold,
                masking_peers=self._masking_peers,
                released=self._released,
                answered=self._answered,
            )
            for owner in survivors:
                self._released[owner] = ShareKind.SELF_MASK
            for owner in dropped:
                self._released[owner] = ShareKind.MASK_KEY
            self._answered = (frozenset(survivors), frozenset(dropped))
            return UnmaskResponse(
                round_id=setup.round_id,
                sender=self.site_id,
                self_mask_owners=survivors,
                self_mask_shares=tuple(self._held[owner][0] for owner in survivors),
                mask_key_owners=dropped,
                mask_key_shares=tuple(self._held[owner][1] for owner in dropped),
            )

    @contextlib.contextmanager
    def _step(
        self, expected: _Stage, after: _Stage, *, also: _Stage | None = None
    ) -> Iterator[None]:
        if self._stage not in (expected, also):
            raise ProtocolError(
                f"Site {self.site_id!r} is at stage {self._stage.name.lower()}, not "
                f"{expected.name.lower()}; start a fresh session for a new round."
            )
        try:
            yield
        except Exception:
            self._stage = _Stage.FAILED  # fail closed: a session that refused answers no more
            raise
        self._stage = after

    def _check_round_size(self, setup: RoundSetup) -> None:
        if len(setup.participants) > len(self._roster):
            raise PeerAuthenticationError(
                f"roster mismatch: the round lists {len(setup.participants)} participants but "
                f"this site's roster holds only {len(self._roster)} sites, so some participants "
                "cannot be consortium sites."
            )

    def _authenticate(self, setup: RoundSetup, broadcast: KeyBroadcast) -> None:
        """Check every peer of ``broadcast`` against this site's roster, before any sharing.

        Each peer must sign as a roster name, with a valid signature by that name's key over
        its keys, its node id and the digest of the setup this site saw; no two participants
        (this site included) may use one roster identity; and the round may not list more
        participants than the roster has sites (no Sybils).

        Raises
        ------
        PeerAuthenticationError
            With a message naming the peer and the cause.
        """
        self._check_round_size(setup)
        digest = _digest(setup)
        seen: dict[str, NodeId] = {self._identity.name: self.site_id}
        for peer, encryption_key, mask_key, signer, signature in zip(
            broadcast.peers,
            broadcast.encryption_keys,
            broadcast.mask_keys,
            broadcast.signers,
            broadcast.signatures,
            strict=True,
        ):
            key = self._roster.key_of(signer)
            if key is None:
                raise PeerAuthenticationError(
                    f"peer {peer!r} signs with a key not in this site's roster (it signs as "
                    f"{signer!r}); refusing the round before sharing anything."
                )
            signed = advertisement_bytes(
                setup_digest=digest,
                round_id=setup.round_id,
                sender=peer,
                signer=signer,
                encryption_key=encryption_key,
                mask_key=mask_key,
            )
            if not verify(key, signature, signed):
                raise PeerAuthenticationError(
                    f"bad signature from peer {peer!r} (signing as {signer!r}): its round keys "
                    "were altered, are not its own, or it saw another round setup; refusing "
                    "the round before sharing anything."
                )
            if signer in seen:
                raise PeerAuthenticationError(
                    f"roster mismatch: peer {peer!r} signs as {signer!r}, the identity of "
                    f"{'this site' if seen[signer] == self.site_id else f'peer {seen[signer]!r}'}"
                    "; one site may hold one place in a round."
                )
            seen[signer] = peer

    def _checked_setup(self, round_id: str, receiver: NodeId) -> RoundSetup:
        setup = self._current_setup()
        if round_id != setup.round_id or receiver != self.site_id:
            raise ProtocolError(
                f"Message for round {round_id!r} and site {receiver!r} reached site "
                f"{self.site_id!r} in round {setup.round_id!r}."
            )
        return setup

    def _current_setup(self) -> RoundSetup:
        if self._setup is None:
            raise ProtocolError(f"Site {self.site_id!r} has no round set up.")
        return self._setup

    def _checked_peers(
        self, peers: tuple[NodeId, ...], allowed: Mapping[NodeId, object] | frozenset[NodeId]
    ) -> tuple[NodeId, ...]:
        threshold = self._current_setup().threshold
        try:
            checked = validate_ids(peers, what="peers")
        except ConfigurationError as error:
            raise ProtocolError(str(error)) from error
        strangers = set(checked) - set(allowed)
        if strangers:
            raise ProtocolError(f"{sorted(strangers)} are not live neighbours of this site.")
        if len(checked) + 1 < threshold:
            raise ConfigurationError(
                f"Only {len(checked)} neighbours remain: with this site, fewer share holders "
                f"than the threshold {threshold}."
            )
        return checked

    def _seal(self, peer: NodeId, plaintext: bytes) -> bytes:
        return keys.seal_share(
            self._encryption_key,
            self._peer_encryption_keys[peer],
            plaintext,
            round_id=self._current_setup().round_id,
            sender=self.site_id,
            receiver=peer,
        )

    def _open(self, sender: NodeId, sealed: bytes) -> tuple[bytes, bytes]:
        plaintext = keys.open_share(
            self._encryption_key,
            self._peer_encryption_keys[sender],
            sealed,
            round_id=self._current_setup().round_id,
            sender=sender,
            receiver=self.site_id,
        )
        if len(plaintext) != 2 * SHARE_BYTES:
            raise ProtocolError(f"A share pair from {sender!r} has the wrong length.")
        return plaintext[:SHARE_BYTES], plaintext[SHARE_BYTES:]


def _digest(setup: RoundSetup) -> bytes:
    return hashlib.sha256(setup_to_bytes(setup)).digest()


def _public_text(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode("ascii")


def _public_key(text: str) -> ec.EllipticCurvePublicKey:
    key = serialization.load_ssh_public_key(text.encode("ascii"))
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("the saved identity key is not an EC key")
    return key


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _id(value: object) -> NodeId:
    (node_id,) = validate_ids([value], what="id")
    return node_id
