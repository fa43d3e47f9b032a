"""X25519 key agreement, HKDF-SHA256 key derivation and AES-GCM encryption of shares.

Every derived key is bound by HKDF's ``info`` to a purpose, the round and the node ids, so a
key agreed for one use, round or pair can serve no other. These public keys are
authenticated one layer up: each site signs them with its identity key and checks its
peers' signatures against its roster (:mod:`.identity`), so a coordinator cannot swap them.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ProtocolError, ShareDecryptionError
from .ids import NodeId, encode_fields, encode_id

__all__ = [
    "KEY_BYTES",
    "SEALED_OVERHEAD",
    "agree",
    "derive_key",
    "generate_private_key",
    "load_private_key",
    "open_sealed",
    "private_bytes",
    "public_bytes",
    "open_share",
    "seal",
    "seal_share",
    "share_associated_data",
    "share_encryption_key",
]

KEY_BYTES = 32
_NONCE_BYTES = 12
_TAG_BYTES = 16
SEALED_OVERHEAD = _NONCE_BYTES + _TAG_BYTES
_LABEL = b"fedrad/secagg/v1"


def generate_private_key() -> X25519PrivateKey:
    """Return a fresh X25519 private key from the operating system's CSPRNG."""
    return X25519PrivateKey.generate()


def load_private_key(raw: bytes) -> X25519PrivateKey:
    """Return the X25519 private key of 32 raw bytes (for example a reconstructed one)."""
    return X25519PrivateKey.from_private_bytes(raw)


def public_bytes(private_key: X25519PrivateKey) -> bytes:
    """Return the 32 raw bytes of the public key of ``private_key``."""
    return private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def private_bytes(private_key: X25519PrivateKey) -> bytes:
    """Return the 32 raw bytes of ``private_key`` (to be secret-shared, never sent in clear)."""
    return private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def agree(private_key: X25519PrivateKey, peer_public: bytes) -> bytes:
    """Return the X25519 shared secret with the peer's raw public key.

    Raises
    ------
    ProtocolError
        If the peer key is not 32 bytes or is a low-order point (all-zero shared secret).
    """
    if len(peer_public) != KEY_BYTES:
        raise ProtocolError(f"A public key must be {KEY_BYTES} bytes, got {len(peer_public)}.")
    try:
        return private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as error:
        raise ProtocolError(f"Unusable peer public key: {error}") from error


def derive_key(secret: bytes, *, purpose: bytes, context: bytes) -> bytes:
    """Derive a 32-byte key from ``secret`` by HKDF-SHA256, bound to a purpose and a context."""
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=KEY_BYTES,
        salt=None,
        info=encode_fields(_LABEL, purpose, context),
    )
    return hkdf.derive(secret)


def share_associated_data(*, round_id: str, sender: NodeId, receiver: NodeId) -> bytes:
    """Return the associated data that binds an encrypted share to its round and direction."""
    return encode_fields(
        _LABEL, b"share", round_id.encode("utf-8"), encode_id(sender), encode_id(receiver)
    )


def share_encryption_key(
    shared_secret: bytes, *, round_id: str, sender: NodeId, receiver: NodeId
) -> bytes:
    """Derive the AES key for shares sent from ``sender`` to ``receiver`` in a round."""
    context = encode_fields(round_id.encode("utf-8"), encode_id(sender), encode_id(receiver))
    return derive_key(shared_secret, purpose=b"share-encryption", context=context)


def seal_share(
    own_key: X25519PrivateKey,
    peer_key: bytes,
    plaintext: bytes,
    *,
    round_id: str,
    sender: NodeId,
    receiver: NodeId,
) -> bytes:
    """Encrypt a share pair from ``sender`` (holding ``own_key``) to ``receiver`` (``peer_key``)."""
    secret = agree(own_key, peer_key)
    key = share_encryption_key(secret, round_id=round_id, sender=sender, receiver=receiver)
    associated = share_associated_data(round_id=round_id, sender=sender, receiver=receiver)
    return seal(key, plaintext, associated_data=associated)


def open_share(
    own_key: X25519PrivateKey,
    peer_key: bytes,
    sealed: bytes,
    *,
    round_id: str,
    sender: NodeId,
    receiver: NodeId,
) -> bytes:
    """Decrypt what :func:`seal_share` made, at ``receiver`` (holding ``own_key``).

    Raises
    ------
    ShareDecryptionError
        If the share was altered or sent for another round, sender or receiver.
    """
    secret = agree(own_key, peer_key)
    key = share_encryption_key(secret, round_id=round_id, sender=sender, receiver=receiver)
    associated = share_associated_data(round_id=round_id, sender=sender, receiver=receiver)
    return open_sealed(key, sealed, associated_data=associated)


def seal(key: bytes, plaintext: bytes, *, associated_data: bytes) -> bytes:
    """Encrypt with AES-256-GCM under a random nonce; return ``nonce || ciphertext || tag``."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, associated_data)


def open_sealed(key: bytes, sealed: bytes, *, associated_data: bytes) -> bytes:
    """Decrypt what :func:`seal` produced.

    Raises
    ------
    ShareDecryptionError
        If the ciphertext, key or associated data do not match (tampered or misaddressed share).
    """
    if len(sealed) < SEALED_OVERHEAD:
        raise ShareDecryptionError(f"An encrypted share of {len(sealed)} bytes is too short.")
    try:
        return AESGCM(key).decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], associated_data)
    except InvalidTag as error:
        raise ShareDecryptionError(
            "An encrypted share failed authentication: it was altered, or sent for another "
            "round, sender or receiver."
        ) from error
