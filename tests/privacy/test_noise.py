"""Integer noise for DP: the discrete Gaussian sampler, its OS randomness, its accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from privacy import compute_epsilon
from privacy import noise as noise_module
from privacy.noise import discrete_gaussian, effective_noise_multiplier, secure_uniform, sigma_for

pytestmark = pytest.mark.timeout(120)


def _pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    weights = np.exp(-np.square(support) / (2 * sigma**2))
    return weights / weights.sum()


@pytest.mark.parametrize("sigma", [0.7, 3.0, 40.0])
def test_discrete_gaussian_has_the_discrete_gaussian_distribution(sigma: float) -> None:
    # Prepare
    n = 200_000
    support = np.arange(-int(12 * sigma) - 2, int(12 * sigma) + 3)
    expected = _pmf(sigma, support)

    # Execute
    samples = discrete_gaussian(sigma, n)

    # Assert: integers, centred, the exact variance, and every well-filled cell within 5 sigma
    assert samples.dtype == np.int64 and samples.shape == (n,)
    variance = float(np.sum(expected * np.square(support)))
    assert abs(samples.mean()) < 5 * math.sqrt(variance / n)
    assert samples.var() == pytest.approx(variance, rel=0.02)
    assert samples.min() >= support[0] and samples.max() <= support[-1]
    counts = np.bincount(samples - support[0], minlength=support.size)
    filled = expected * n > 50
    z = (counts[filled] - expected[filled] * n) / np.sqrt(expected[filled] * n)
    assert np.abs(z).max() < 5


def test_noise_comes_from_os_urandom(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: an OS source that returns only zero bytes
    monkeypatch.setattr(noise_module.os, "urandom", lambda k: bytes(k))

    # Execute
    uniforms = secure_uniform(5)

    # Assert: the smallest double above 0, five times: nothing else feeds the uniforms
    assert uniforms.tolist() == [2.0**-53] * 5


def test_discrete_gaussian_renyi_divergence_is_the_gaussian_bound() -> None:
    # Reference: for an integer shift D, D_alpha(N_Z(0, s^2) || N_Z(D, s^2)) <= alpha D^2 / (2 s^2)
    # (Canonne, Kamath, Steinke 2020, Proposition 5), the Gaussian mechanism's RDP (Mironov 2017).
    sigma, shift = 3.0, 1
    support = np.arange(-200, 201).astype(np.float64)
    log_z = math.log(float(np.sum(np.exp(-np.square(support) / (2 * sigma**2)))))
    log_p = -np.square(support) / (2 * sigma**2) - log_z
    log_q = -np.square(support - shift) / (2 * sigma**2) - log_z
    for alpha in (2.0, 5.0, 20.0):
        terms = alpha * log_p + (1 - alpha) * log_q
        top = float(terms.max())
        exact = (top + math.log(float(np.sum(np.exp(terms - top))))) / (alpha - 1)
        bound = alpha * shift**2 / (2 * sigma**2)
        assert exact <= bound + 1e-12
        assert exact >= 0.95 * bound  # and the bound is tight for sigma well above 1


def test_effective_multiplier_of_one_share_is_sigma_over_sensitivity() -> None:
    assert effective_noise_multiplier(sigma=6.0, num_shares=1, l2=2.0, l1=4.0, dim=10) == 3.0


def test_effective_multiplier_matches_kairouz_liu_steinke_at_a_small_sigma() -> None:
    # Reference value: KLS 2021, Theorem 1, at sigma 0.5, n 2, d 4, l2 1, l1 2:
    # tau = 10 exp(-2 pi^2 0.25 / 2) = 10 exp(-pi^2 / 4) = 0.84804...
    tau = 10 * math.exp(-(math.pi**2) / 4)
    eps = min(math.sqrt(1 / (2 * 0.25) + tau * 4 / 2), 2 / (math.sqrt(2) * 0.5) + tau * 4)
    assert tau == pytest.approx(0.848049, abs=1e-6)
    assert eps == pytest.approx(1.922524, abs=1e-6)  # sqrt(2 + 1.696098)

    got = effective_noise_multiplier(sigma=0.5, num_shares=2, l2=1.0, l1=2.0, dim=4)

    assert got == pytest.approx(1 / eps, rel=1e-12)


def test_shares_sized_for_the_target_reach_it() -> None:
    for shares in (2, 3, 10):
        sigma = sigma_for(1.1, num_shares=shares, l2=30.0, l1=300.0, dim=100)
        got = effective_noise_multiplier(sigma=sigma, num_shares=shares, l2=30.0, l1=300.0, dim=100)
        assert got >= 1.1
        assert sigma == pytest.approx(1.1 * 30.0 / math.sqrt(shares), rel=1e-9)


def test_a_gaussian_history_entry_at_rate_one_is_the_gaussian_mechanism() -> None:
    # Reference: RDP of the Gaussian mechanism is alpha / (2 z^2) (Mironov 2017, Prop. 7).
    z = 2.5
    orders = np.array(RDPAccountant.DEFAULT_ALPHAS)
    rdp = rdp_analysis.compute_rdp(q=1.0, noise_multiplier=z, steps=1, orders=orders)
    assert np.allclose(rdp, orders / (2 * z**2), rtol=1e-12)

    # and its epsilon is within the zCDP conversion of Bun and Steinke 2016 (Prop. 1.3)
    rho, delta = 1 / (2 * z**2), 1e-5
    epsilon = compute_epsilon([(z, 1.0, 1)], delta=delta, accountant="rdp")
    assert epsilon <= rho + 2 * math.sqrt(rho * math.log(1 / delta))
    assert epsilon >= 0.8 * (rho + 2 * math.sqrt(rho * math.log(1 / delta)))
