import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from privacy.secagg.errors import ConfigurationError, ShareReconstructionError
from privacy.secagg.shamir import PRIME, SHARE_BYTES, combine_shares, interpolate, split_secret

pytestmark = pytest.mark.timeout(120)

SECRETS = st.binary(min_size=32, max_size=32)


@st.composite
def sharings(draw, min_threshold=1):
    holders = draw(st.integers(max(2, min_threshold), 9))
    threshold = draw(st.integers(min_threshold, holders))
    xs = draw(st.lists(st.integers(1, 2**64), min_size=holders, max_size=holders, unique=True))
    return threshold, xs


@settings(max_examples=60, deadline=None)
@given(secret=SECRETS, sharing=sharings(), data=st.data())
def test_any_threshold_shares_reconstruct_the_secret(secret, sharing, data):
    threshold, xs = sharing
    shares = split_secret(secret, threshold=threshold, xs=xs)
    chosen = data.draw(
        st.lists(st.sampled_from(xs), min_size=threshold, max_size=threshold, unique=True)
    )

    result = combine_shares({x: shares[x] for x in chosen}, threshold=threshold, secret_bytes=32)

    assert result == secret


@settings(max_examples=40, deadline=None)
@given(secret=SECRETS, sharing=sharings())
def test_all_shares_together_reconstruct_and_agree(secret, sharing):
    threshold, xs = sharing
    shares = split_secret(secret, threshold=threshold, xs=xs)

    result = combine_shares(shares, threshold=threshold, secret_bytes=32)

    assert result == secret
    assert all(len(share) == SHARE_BYTES for share in shares.values())


@settings(max_examples=40, deadline=None)
@given(secret=SECRETS, sharing=sharings(min_threshold=2))
def test_fewer_than_threshold_shares_are_refused(secret, sharing):
    threshold, xs = sharing
    shares = split_secret(secret, threshold=threshold, xs=xs)
    too_few = {x: shares[x] for x in xs[: threshold - 1]}

    with pytest.raises(ShareReconstructionError, match="cannot reconstruct"):
        combine_shares(too_few, threshold=threshold, secret_bytes=32)


@settings(max_examples=40, deadline=None)
@given(secret=SECRETS, other=SECRETS, sharing=sharings(min_threshold=2))
def test_threshold_minus_one_shares_do_not_pin_the_secret(secret, other, sharing):
    threshold, xs = sharing
    shares = split_secret(secret, threshold=threshold, xs=xs)
    points = {x: int.from_bytes(shares[x], "big") for x in xs[: threshold - 1]}

    # Interpolating t-1 shares as if they were enough gives a wrong value...
    guessed = interpolate(points, 0)
    # ...and a polynomial of the same degree through them can have any other secret.
    forged = {**points, 0: int.from_bytes(other, "big")}

    assert guessed != int.from_bytes(secret, "big")
    assert all(interpolate(forged, x) == y for x, y in points.items())
    assert interpolate(forged, 0) == int.from_bytes(other, "big")


@settings(max_examples=40, deadline=None)
@given(first=SECRETS, second=SECRETS, sharing=sharings())
def test_shares_of_distinct_secrets_differ(first, second, sharing):
    threshold, xs = sharing
    if first == second:
        return

    one = split_secret(first, threshold=threshold, xs=xs)
    two = split_secret(second, threshold=threshold, xs=xs)

    assert one != two


@settings(max_examples=20, deadline=None)
@given(secret=SECRETS, sharing=sharings(min_threshold=2))
def test_sharing_twice_gives_fresh_shares(secret, sharing):
    threshold, xs = sharing

    one = split_secret(secret, threshold=threshold, xs=xs)
    two = split_secret(secret, threshold=threshold, xs=xs)

    assert all(one[x] != two[x] for x in xs)


def test_a_corrupted_extra_share_is_detected():
    xs = [1, 2, 3, 4, 5]
    shares = split_secret(b"k" * 32, threshold=3, xs=xs)
    shares[5] = ((int.from_bytes(shares[5], "big") + 1) % PRIME).to_bytes(SHARE_BYTES, "big")

    with pytest.raises(ShareReconstructionError, match="disagrees"):
        combine_shares(shares, threshold=3, secret_bytes=32)


def test_shares_of_different_sharings_do_not_fit_the_secret_size():
    one = split_secret(b"a" * 32, threshold=3, xs=[1, 2, 3])
    two = split_secret(b"a" * 32, threshold=3, xs=[1, 2, 3])
    mixed = {1: one[1], 2: one[2], 3: two[3]}

    with pytest.raises(ShareReconstructionError, match="does not fit"):
        combine_shares(mixed, threshold=3, secret_bytes=32)


@pytest.mark.parametrize(
    ("xs", "threshold", "secret"),
    [
        ([1, 1, 2], 2, b"s" * 32),
        ([0, 1, 2], 2, b"s" * 32),
        ([1, 2], 3, b"s" * 32),
        ([1, 2], 2, b""),
    ],
)
def test_invalid_sharing_requests_are_refused(xs, threshold, secret):
    with pytest.raises(ConfigurationError):
        split_secret(secret, threshold=threshold, xs=xs)
