import os

import numpy as np
import pytest
from scipy.stats import chisquare

from privacy.secagg import InMemoryRound, RoundSetup
from privacy.secagg.keys import agree, generate_private_key, public_bytes
from privacy.secagg.masking import apply_masks, pairwise_mask_key, prg_words, self_mask_key

pytestmark = pytest.mark.timeout(120)

LENGTH = 4095  # plus the weight word: 4096 masked words per site


def _flower_seed(key: bytes) -> int:
    """Flower 1.42's pseudo_rand_gen: XOR-fold the key into a 32-bit RandomState seed."""
    seed = 0
    for i in range(0, len(key), 4):
        seed ^= int.from_bytes(key[i : i + 4], "little")
    return seed


def _top_byte_p_value(words: np.ndarray, modulus_bits: int) -> float:
    top = (words.astype(np.uint64) >> np.uint64(modulus_bits - 8)).astype(np.int64)
    return float(chisquare(np.bincount(top, minlength=256)).pvalue)


def _masked_zero_inputs(modulus_bits: int) -> dict:
    setup = RoundSetup.create(
        round_id="uniformity",
        participants=[1, 2, 3],
        threshold=2,
        array_shapes={"w": (LENGTH,)},
        clipping_range=1.0,
        quantisation_bits=8,
        max_weight=1000,
        modulus_bits=modulus_bits,
    )
    zeros = {"w": np.zeros(LENGTH)}
    round_ = InMemoryRound(setup, {site: (zeros, 1) for site in setup.participants})
    deliveries = round_.share_keys(round_.advertise_keys())
    return {
        site: round_.clients[site].mask_input(delivery, zeros, weight=1).masked
        for site, delivery in deliveries.items()
    }


@pytest.mark.parametrize("modulus_bits", [64, 32, 20])
def test_masked_all_zero_inputs_look_uniform(modulus_bits):
    masked = _masked_zero_inputs(modulus_bits)

    p_values = {site: _top_byte_p_value(words, modulus_bits) for site, words in masked.items()}
    byte_p = (
        chisquare(
            np.bincount(np.concatenate([m.view(np.uint8) for m in masked.values()]), minlength=256)
        ).pvalue
        if modulus_bits % 8 == 0
        else 1.0
    )

    assert all(p > 0.001 for p in p_values.values()), p_values
    assert byte_p > 0.001
    assert all(int(words.max()) < 2**modulus_bits for words in masked.values())


def test_the_uniformity_check_rejects_unmasked_words():
    words = np.full(LENGTH + 1, 128, dtype=np.uint64) << np.uint64(56)

    assert _top_byte_p_value(words, 64) < 0.001


def test_keys_that_differ_only_in_high_bytes_give_different_masks():
    key = bytearray(os.urandom(32))
    other = bytearray(key)
    for word in (24, 28):  # XOR the same pattern into the two highest 32-bit words
        for offset, byte in enumerate(b"\x5a\xa5\x0f\xf0"):
            other[word + offset] ^= byte
    key, other = bytes(key), bytes(other)

    masks, other_masks = prg_words(key, 64), prg_words(other, 64)

    assert key[:24] == other[:24]
    assert _flower_seed(key) == _flower_seed(other)  # Flower would use the same mask
    assert not np.array_equal(masks, other_masks)
    assert np.count_nonzero(masks == other_masks) <= 1


def test_shared_secrets_that_differ_only_in_high_bytes_give_different_pairwise_masks():
    secret = os.urandom(32)
    other = secret[:31] + bytes([secret[31] ^ 0x80])

    keys = [pairwise_mask_key(s, round_id="r", pair=(1, 2)) for s in (secret, other)]

    assert not np.array_equal(prg_words(keys[0], 32), prg_words(keys[1], 32))


def test_the_generator_is_deterministic_per_key():
    key = os.urandom(32)

    assert np.array_equal(prg_words(key, 100), prg_words(key, 100))
    assert np.array_equal(prg_words(key, 100)[:10], prg_words(key, 10))


@pytest.mark.parametrize("modulus_bits", [64, 32, 17])
def test_pairwise_masks_of_two_sites_cancel(modulus_bits):
    private_a, private_b = generate_private_key(), generate_private_key()
    key_a = pairwise_mask_key(agree(private_a, public_bytes(private_b)), round_id="r", pair=(1, 2))
    key_b = pairwise_mask_key(agree(private_b, public_bytes(private_a)), round_id="r", pair=(2, 1))
    values = np.arange(50, dtype=np.uint64)

    masked_a = apply_masks(values, [(key_a, 1)], modulus_bits=modulus_bits)
    masked_b = apply_masks(values, [(key_b, -1)], modulus_bits=modulus_bits)
    total = (masked_a + masked_b) & np.uint64(2**modulus_bits - 1)

    assert key_a == key_b
    assert not np.array_equal(masked_a, values)
    assert np.array_equal(total, 2 * values)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ({"round_id": "r1", "owner": 1}, {"round_id": "r2", "owner": 1}),
        ({"round_id": "r1", "owner": 1}, {"round_id": "r1", "owner": 2}),
        ({"round_id": "r1", "owner": 1}, {"round_id": "r1", "owner": "1"}),
    ],
)
def test_mask_keys_are_bound_to_round_and_owner(first, second):
    seed = os.urandom(32)

    assert self_mask_key(seed, **first) != self_mask_key(seed, **second)
