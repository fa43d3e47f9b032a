"""Evaluation sums under DP: noised with the site's own multiplier and charged before release."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from fedrad.core.fairness import FairnessLayout
from fedrad.core.keys import SCORE_BINS
from privacy import (
    BudgetExhausted,
    PrivacyLedger,
    PrivacyRefused,
    SiteLimits,
    compute_epsilon,
    eval_entry,
    eval_noise_multiplier,
    release_eval_sums,
)
from privacy.release import eval_sensitivity

pytestmark = pytest.mark.timeout(120)

LIMITS = SiteLimits(max_epsilon=10.0, max_delta=1e-3)
CONFUSION = np.array([[400, 100], [50, 450]])
HIST = np.full((2, 2, SCORE_BINS), 50, dtype=np.int64)


def _release(
    ledger: PrivacyLedger, *, releases: int = 3, fraction=0.1, target=8.0, delta=1e-5, **kw
):
    return release_eval_sums(
        confusion=CONFUSION,
        score_hist=HIST,
        planned_releases=releases,
        budget_fraction=fraction,
        ledger=ledger,
        limits=kw.pop("limits", LIMITS),
        target_epsilon=target,
        delta=delta,
        accountant="rdp",
        num_train_samples=1000,
        server_round=kw.pop("server_round", 1),
        run_id="run-1",
    )


def _ledger(root: Path) -> PrivacyLedger:
    return PrivacyLedger.open(root, study_id="chest-2026", site_id="site-a")


def test_one_record_moves_the_counts_by_the_stated_sensitivity() -> None:
    # one record: one confusion cell and one bin of each class's score histogram
    assert eval_sensitivity(2) == (math.sqrt(3), 3.0)
    assert eval_sensitivity(5) == (math.sqrt(6), 6.0)
    assert eval_entry(3.0) == (3.0, 1.0, 1)


def test_eval_noise_takes_the_fraction_of_the_budget_in_zcdp() -> None:
    # Reference: epsilon = rho + 2 sqrt(rho log(1/delta)) (Bun and Steinke 2016, Prop. 1.3);
    # one Gaussian release of multiplier z is 1 / (2 z^2)-zCDP, and zCDP composes by sums
    z = eval_noise_multiplier(budget_epsilon=8.0, delta=1e-5, releases=13, fraction=0.1)
    log_inv = math.log(1e5)
    rho = (math.sqrt(log_inv + 8.0) - math.sqrt(log_inv)) ** 2
    assert rho + 2 * math.sqrt(rho * log_inv) == pytest.approx(8.0)
    assert 13 / (2 * z**2) == pytest.approx(0.1 * rho)
    assert z == pytest.approx(7.87, abs=0.01)
    # the releases alone then cost well under the whole budget
    assert compute_epsilon([(z, 1.0, 13)], delta=1e-5, accountant="rdp") < 2.5


def test_release_is_noised_clipped_and_charged_before_it_leaves(tmp_path: Path) -> None:
    # Execute
    release = _release(_ledger(tmp_path), releases=3, target=8.0)

    # Assert: the noise has the stated std, counts stay non-negative, the ledger paid first
    z = eval_noise_multiplier(budget_epsilon=8.0, delta=1e-5, releases=3, fraction=0.1)
    std = z * math.sqrt(3)
    assert release.std == pytest.approx(std)
    noise = (release.score_hist - HIST).ravel()
    assert noise.std() == pytest.approx(std, rel=0.2)  # 400 cells, none near 0
    assert release.confusion.min() >= 0 and release.score_hist.min() >= 0
    assert not np.array_equal(release.confusion, CONFUSION)
    assert release.num_examples == int(release.confusion.sum())
    reference = compute_epsilon([(z, 1.0, 1)], delta=1e-5, accountant="rdp")
    assert release.epsilon == pytest.approx(reference)
    assert _ledger(tmp_path).spent_epsilon == pytest.approx(reference)


def test_releases_compose_and_refuse_beyond_the_budget(tmp_path: Path) -> None:
    # Prepare: a coordinator that plans 1 release at fraction 0.5 of target 6 (z about 1.2),
    # then asks for more releases than it planned
    ledger = _ledger(tmp_path)
    z = eval_noise_multiplier(budget_epsilon=6.0, delta=1e-5, releases=1, fraction=0.5)
    spent = [_release(ledger, releases=1, fraction=0.5, target=6.0, server_round=1).epsilon]

    # Execute / Assert: releases compose until the target refuses one; nothing more recorded
    with pytest.raises(BudgetExhausted, match="evaluates this study no further"):
        for server_round in range(2, 10):
            spent.append(
                _release(
                    ledger, releases=1, fraction=0.5, target=6.0, server_round=server_round
                ).epsilon
            )
    assert len(_ledger(tmp_path).rounds) == len(spent) >= 2
    assert spent == sorted(spent) and spent[-1] <= 6.0
    assert spent[-1] == pytest.approx(
        compute_epsilon([(z, 1.0, len(spent))], delta=1e-5, accountant="rdp")
    )


def test_release_respects_the_site_ceiling_whatever_the_run_asks(tmp_path: Path) -> None:
    with pytest.raises(PrivacyRefused, match="max-epsilon"):
        _release(_ledger(tmp_path), target=50.0)
    assert _ledger(tmp_path).rounds == ()


def test_fairness_counts_share_the_release_and_its_epsilon(tmp_path: Path) -> None:
    # Prepare: the run's fairness vector for one site, and a second ledger for comparison
    layout = FairnessLayout.from_config(
        num_classes=2, positive_label=1, attributes="sex,age-band", intersections=""
    )
    extra = layout.zeros()
    extra[layout.cells[0].offset] = 500  # one large cell
    alone = _release(_ledger(tmp_path / "alone"))

    # Execute
    together = release_eval_sums(
        confusion=CONFUSION,
        score_hist=HIST,
        planned_releases=3,
        budget_fraction=0.1,
        ledger=_ledger(tmp_path / "together"),
        limits=LIMITS,
        target_epsilon=8.0,
        delta=1e-5,
        accountant="rdp",
        num_train_samples=1000,
        server_round=1,
        run_id="run-1",
        extra=extra,
        extra_l2_squared=layout.record_l2_squared,
    )

    # Check: one record moves the vector by 1 in n and 1 in one bin per attribute (l2^2 = 4);
    # the noise grows with the whole release's sensitivity, the epsilon does not
    assert layout.record_l2_squared == 4.0
    assert together.std == pytest.approx(alone.std * math.sqrt((3 + 4) / 3))
    assert together.epsilon == pytest.approx(alone.epsilon)
    assert together.extra is not None and together.extra.shape == extra.shape
    assert together.extra.min() >= 0
    assert abs(int(together.extra[layout.cells[0].offset]) - 500) < 8 * together.std
    empty = np.delete(together.extra, layout.cells[0].offset)
    assert 0 < empty.mean() < together.std  # the other counts hold only (clipped) noise
