"""Masks from a cryptographic pseudo-random generator keyed with the full 256-bit secret.

Each mask is the AES-256-CTR keystream of a 32-byte key, read as little-endian 64-bit words and
reduced modulo ``2^modulus_bits`` (a power of two divides ``2^64``, so the reduced words stay
uniform). Keys come from HKDF-SHA256 over the X25519 shared secret (pairwise masks) or the
self-mask seed, bound to the round and the node ids.

Unlike Flower's SecAgg+, which folds the 256-bit key into a 32-bit seed for
``numpy.random.RandomState`` (so distinct keys give identical masks, and 2^32 guesses undo any
mask), nothing here shortens the key, and the generator is a cipher, not a Mersenne Twister.
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .ids import NodeId, encode_fields, encode_id
from .keys import KEY_BYTES, derive_key

__all__ = [
    "apply_masks",
    "modulus_mask",
    "pairwise_mask_key",
    "pairwise_sign",
    "prg_words",
    "self_mask_key",
    "wire_dtype",
]

_ZERO_COUNTER = bytes(16)  # every key drives exactly one keystream, so a fixed counter is safe


def prg_words(key: bytes, count: int) -> np.ndarray:
    """Return ``count`` pseudo-random 64-bit words from AES-256-CTR keyed with ``key``."""
    if len(key) != KEY_BYTES:
        raise ValueError(f"A mask key must be {KEY_BYTES} bytes, got {len(key)}.")
    encryptor = Cipher(algorithms.AES(key), modes.CTR(_ZERO_COUNTER)).encryptor()
    stream = encryptor.update(bytes(8 * count)) + encryptor.finalize()
    return np.frombuffer(stream, dtype="<u8").astype(np.uint64, copy=False)


def self_mask_key(seed: bytes, *, round_id: str, owner: NodeId) -> bytes:
    """Derive the key of ``owner``'s self mask from its secret seed ``b``."""
    context = encode_fields(round_id.encode("utf-8"), encode_id(owner))
    return derive_key(seed, purpose=b"self-mask", context=context)


def pairwise_mask_key(shared_secret: bytes, *, round_id: str, pair: tuple[NodeId, NodeId]) -> bytes:
    """Derive the key of the mask two nodes share from their X25519 shared secret."""
    first, second = pair
    low, high = (first, second) if pairwise_sign(first, second) > 0 else (second, first)
    context = encode_fields(round_id.encode("utf-8"), encode_id(low), encode_id(high))
    return derive_key(shared_secret, purpose=b"pairwise-mask", context=context)


def pairwise_sign(own: NodeId, peer: NodeId) -> int:
    """Return +1 if ``own`` adds the pair's mask, -1 if it subtracts it (the larger id does)."""
    return 1 if own < peer else -1  # type: ignore[operator]  # ids of one round share a kind


def modulus_mask(modulus_bits: int) -> np.uint64:
    """Return the bit mask that reduces a 64-bit word modulo ``2^modulus_bits``."""
    return np.uint64((1 << modulus_bits) - 1)


def wire_dtype(modulus_bits: int) -> np.dtype:
    """Return the smallest unsigned dtype that holds residues modulo ``2^modulus_bits``."""
    return np.dtype(np.uint32) if modulus_bits <= 32 else np.dtype(np.uint64)


def apply_masks(
    vector: np.ndarray, masks: list[tuple[bytes, int]], *, modulus_bits: int
) -> np.ndarray:
    """Return ``vector + sum(sign * PRG(key))`` modulo ``2^modulus_bits`` as 64-bit words.

    Parameters
    ----------
    vector
        Unsigned 64-bit words.
    masks
        ``(key, sign)`` pairs, sign +1 to add the mask and -1 to subtract it.
    modulus_bits
        The modulus is ``2^modulus_bits``.
    """
    total = np.array(vector, dtype=np.uint64, copy=True)
    for key, sign in masks:
        words = prg_words(key, total.size)
        if sign > 0:
            np.add(total, words, out=total)  # uint64 arithmetic wraps modulo 2^64
        else:
            np.subtract(total, words, out=total)
    np.bitwise_and(total, modulus_mask(modulus_bits), out=total)
    return total
