import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from privacy.secagg import (
    InputError,
    InputRangeError,
    ModulusOverflowError,
    RoundSetup,
    quantisation_bound,
    required_modulus_bits,
    run_round_in_memory,
)
from privacy.secagg.quantise import check_modulus, decode_sum, encode_update, quantisation_levels

pytestmark = pytest.mark.timeout(120)

NAMES = ("w",)


def _encode(values, *, weight=1, clipping_range=1.0, bits=16, max_weight=100):
    values = np.asarray(values, dtype=np.float64)
    return encode_update(
        {"w": values},
        weight=weight,
        names=NAMES,
        shapes=(values.shape,),
        clipping_range=clipping_range,
        bits=bits,
        max_weight=max_weight,
    )


@pytest.mark.parametrize("bad", [1.5, -1.0000001, np.inf, -np.inf, np.nan])
def test_out_of_range_value_raises_naming_the_range_and_the_fix(bad):
    values = [0.0, 0.5, bad, -0.25]

    with pytest.raises(InputRangeError) as caught:
        _encode(values, clipping_range=1.0)

    message = str(caught.value)
    assert "[-1.0, 1.0]" in message
    assert "raise clipping-range" in message
    assert "'w'" in message and "index 2" in message


def test_values_on_the_range_ends_are_accepted():
    encoded = _encode([-1.0, 1.0, 0.0], bits=8)

    assert encoded.tolist() == [0, 255, 128, 1]


@pytest.mark.parametrize("weight", [0, 101, 2.5, True, -3])
def test_weight_outside_the_allowed_range_raises(weight):
    with pytest.raises(InputRangeError, match="weight"):
        _encode([0.1], weight=weight, max_weight=100)


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"w": np.zeros(3)}, "shape"),
        ({"v": np.zeros(4)}, "arrays"),
        ({"w": np.zeros(4), "v": np.zeros(1)}, "arrays"),
        ({"w": np.array(["a", "b", "c", "d"])}, "dtype"),
    ],
)
def test_update_not_matching_the_round_raises(arrays, match):
    with pytest.raises(InputError, match=match):
        encode_update(
            arrays, weight=1, names=NAMES, shapes=((4,),), clipping_range=1.0, bits=8, max_weight=1
        )


@settings(max_examples=60, deadline=None)
@given(
    values=hnp.arrays(np.float64, st.integers(1, 40), elements=st.floats(-3.0, 3.0)),
    weight=st.integers(1, 1000),
    bits=st.integers(1, 32),
)
def test_one_encoded_update_decodes_within_the_bound(values, weight, bits):
    encoded = _encode(values, weight=weight, clipping_range=3.0, bits=bits, max_weight=1000)

    arrays, total_weight = decode_sum(
        encoded, names=NAMES, shapes=(values.shape,), clipping_range=3.0, bits=bits
    )

    assert total_weight == weight
    assert np.abs(arrays["w"] - values).max() <= quantisation_bound(clipping_range=3.0, bits=bits)


def test_the_bound_is_reached_by_a_value_halfway_between_levels():
    step = 2.0 / quantisation_levels(4)
    halfway = -1.0 + 2.5 * step - 1e-12

    arrays, _ = decode_sum(
        _encode([halfway], bits=4), names=NAMES, shapes=((1,),), clipping_range=1.0, bits=4
    )

    error = abs(arrays["w"][0] - halfway)
    assert error == pytest.approx(quantisation_bound(clipping_range=1.0, bits=4), rel=1e-6)


def test_modulus_overflow_is_refused_before_the_round_starts():
    with pytest.raises(ModulusOverflowError) as caught:
        RoundSetup.create(
            round_id="r",
            participants=[1, 2, 3, 4, 5],
            threshold=3,
            array_shapes={"w": (10,)},
            clipping_range=1.0,
            quantisation_bits=16,
            max_weight=1 << 20,
            modulus_bits=32,
        )

    assert "needs 39 bits" in str(caught.value)
    assert "modulus-bits" in str(caught.value)


@pytest.mark.parametrize(
    ("num_clients", "bits", "max_weight"), [(3, 8, 1), (10, 16, 1000), (7, 24, 5)]
)
def test_the_largest_possible_sum_fits_exactly_the_required_modulus(num_clients, bits, max_weight):
    needed = required_modulus_bits(num_clients=num_clients, bits=bits, max_weight=max_weight)
    largest = num_clients * max_weight * quantisation_levels(bits)

    check_modulus(num_clients=num_clients, bits=bits, max_weight=max_weight, modulus_bits=needed)

    assert largest < 2**needed
    assert largest >= 2 ** (needed - 1)
    with pytest.raises(ModulusOverflowError):
        check_modulus(
            num_clients=num_clients, bits=bits, max_weight=max_weight, modulus_bits=needed - 1
        )


def test_a_tight_modulus_still_sums_maximal_inputs_without_wrapping():
    inputs = {site: ({"w": np.ones(6)}, 1000) for site in range(3)}
    modulus_bits = required_modulus_bits(num_clients=3, bits=8, max_weight=1000)

    result = run_round_in_memory(
        inputs,
        threshold=2,
        clipping_range=1.0,
        quantisation_bits=8,
        max_weight=1000,
        modulus_bits=modulus_bits,
    )

    np.testing.assert_allclose(result.arrays["w"], 1.0)
    assert result.total_weight == 3000


def test_a_round_with_an_out_of_range_update_fails_loudly():
    inputs = {site: ({"w": np.full(5, 0.5)}, 1) for site in range(3)}
    inputs[2] = ({"w": np.array([0.5, 0.5, 9.0, 0.5, 0.5])}, 1)

    with pytest.raises(InputRangeError, match="clipping range"):
        run_round_in_memory(inputs, threshold=2, clipping_range=1.0)
