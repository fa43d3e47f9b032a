"""Evaluation sums a site releases under DP: integer noise, charged before they leave.

Under either DP mode a site's evaluation of the global model on its validation split is a
query on its patients' records that no training accountant covers. fedrad releases it as a
Gaussian-type mechanism on the counts:

- the confusion counts and the per-class score histograms get independent discrete Gaussian
  noise ``N_Z(0, (z * l2)^2)`` (:func:`privacy.noise.discrete_gaussian`, OS randomness); ``z``
  is derived (:func:`eval_noise_multiplier`) so that the run's planned releases (one per planned
  round and a final one) together spend at most the site's own ``eval-budget-fraction`` (node
  config, default 0.1, never the coordinator's) of the study's budget;
- one record adds 1 to one confusion cell and 1 to one bin of each of the ``C`` class-score
  histograms, so ``l2 = sqrt(1 + C)`` and ``l1 = 1 + C`` (add/remove of one record);
- the number of examples is the sum of the noised confusion counts (post-processing), the loss
  sum is withheld (an unbounded per-record loss has no finite sensitivity), and negative noised
  counts are clipped to 0 (post-processing);
- the release costs a Gaussian mechanism of noise multiplier ``z`` (CKS 2020: the discrete
  Gaussian satisfies the same ``l2^2 / (2 sigma^2)``-zCDP as the continuous one), that is the
  Opacus history entry ``(z, 1.0, 1)`` (:func:`eval_entry`), recorded in the study's
  record-level ledger before the sums are returned. Under DP-SGD it is the same ledger as
  training, so one epsilon covers both; the noise multiplier DP-SGD derives reserves the
  planned releases. A coordinator that runs more rounds than it planned only meets the
  budget's refusals sooner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from privacy.accounting import BudgetExhausted, HistoryEntry
from privacy.dp import SiteLimits, default_delta
from privacy.ledger import PrivacyLedger
from privacy.noise import discrete_gaussian, effective_noise_multiplier

__all__ = [
    "EvalRelease",
    "eval_entry",
    "eval_noise_multiplier",
    "eval_sensitivity",
    "release_eval_sums",
    "study_delta",
]


def eval_sensitivity(num_classes: int) -> tuple[float, float]:
    """L2 and L1 sensitivity of the evaluation counts of a ``num_classes`` model."""
    return math.sqrt(1 + num_classes), float(1 + num_classes)


def eval_entry(noise_multiplier: float) -> HistoryEntry:
    """The accountant history entry of one evaluation release at ``noise_multiplier``.

    For a single discrete Gaussian (one site adds all the noise) the bound of
    :func:`privacy.noise.effective_noise_multiplier` is exactly ``sigma / l2 = z``, for every
    number of classes.
    """
    l2, l1 = eval_sensitivity(2)
    z = effective_noise_multiplier(sigma=noise_multiplier * l2, num_shares=1, l2=l2, l1=l1, dim=1)
    return (z, 1.0, 1)


def eval_noise_multiplier(
    *, budget_epsilon: float, delta: float, releases: int, fraction: float
) -> float:
    """The noise multiplier of each of ``releases`` evaluation releases.

    The budget is split in zero-concentrated DP, where composition is a sum: ``budget_epsilon``
    at ``delta`` is worth ``rho`` with ``budget_epsilon = rho + 2 sqrt(rho log(1/delta))``
    (Bun and Steinke 2016, Proposition 1.3), the releases get ``fraction * rho`` together, and
    one Gaussian release of multiplier ``z`` costs ``1 / (2 z^2)``. So evaluation takes that
    fraction of the RDP curve the ledger composes with training (a standalone epsilon for the
    releases alone would overstate their share: the ``log(1/delta)`` term is paid once). The
    ledger's own accountant then does the accounting.
    """
    if not (budget_epsilon > 0 and 0 < delta < 1 and releases >= 1 and 0 < fraction <= 1):
        raise ValueError("budget_epsilon, delta, releases and fraction are out of range.")
    log_inv = math.log(1 / delta)
    rho = (math.sqrt(log_inv + budget_epsilon) - math.sqrt(log_inv)) ** 2
    return 1.0 / math.sqrt(2 * fraction * rho / releases)


def study_delta(
    ledger: PrivacyLedger, requested: float | None, *, num_train_samples: int, limits: SiteLimits
) -> float:
    """The delta a study is accounted at here: the ledger's, the run's, else ``1 / (10 N)``."""
    return ledger.delta or requested or min(default_delta(num_train_samples), limits.max_delta)


@dataclass(frozen=True)
class EvalRelease:
    """Noised evaluation counts and the site's spend after releasing them."""

    num_examples: int
    confusion: np.ndarray
    score_hist: np.ndarray
    std: float
    epsilon: float
    delta: float
    extra: np.ndarray | None = None
    """The noised ``extra`` counts (the fairness vector), negative values clipped to 0."""


def release_eval_sums(
    *,
    confusion: np.ndarray,
    score_hist: np.ndarray,
    planned_releases: int,
    budget_fraction: float,
    ledger: PrivacyLedger,
    limits: SiteLimits,
    target_epsilon: float,
    delta: float | None,
    accountant: str,
    num_train_samples: int,
    server_round: int,
    run_id: str,
    extra: np.ndarray | None = None,
    extra_l2_squared: float = 0.0,
) -> EvalRelease:
    """Noise a site's evaluation counts and record the release in its ledger first.

    ``extra`` counts (the site's fairness vector) travel in the same release: one record
    changes them by at most ``sqrt(extra_l2_squared)`` in L2, so the one Gaussian mechanism
    over all counts has sensitivity ``sqrt(l2^2 + extra_l2_squared)``, and the noise std
    grows with it while the privacy cost stays that of noise multiplier ``z``.

    Parameters
    ----------
    planned_releases, budget_fraction
        The run's planned evaluation releases and the site's ``eval-budget-fraction``: they
        give the noise (:func:`eval_noise_multiplier`).
    delta
        The run's delta, or None: the study's delta at this site, else ``1 / (10 N)`` within
        the site's ``max-delta`` (as DP-SGD chooses it).

    Raises
    ------
    PrivacyRefused
        If the run asks for more than the site's ceilings, or the study's ledger is at another
        delta or accountant.
    BudgetExhausted
        If the release would bring the study above ``min(target-epsilon, max-epsilon)``, or
        the site's total over all studies above ``max-total-epsilon``.
    """
    chosen = study_delta(ledger, delta, num_train_samples=num_train_samples, limits=limits)
    limits.check(epsilon=target_epsilon, delta=chosen)
    budget = min(target_epsilon, limits.max_epsilon)
    noise_multiplier = eval_noise_multiplier(
        budget_epsilon=budget, delta=chosen, releases=planned_releases, fraction=budget_fraction
    )
    entry = eval_entry(noise_multiplier)
    projected = ledger.projected_epsilon(
        entry, study_id=ledger.study_id, delta=chosen, accountant=accountant
    )
    if projected > budget:
        raise BudgetExhausted(
            f"Releasing evaluation sums would bring study '{ledger.study_id}' at this site to "
            f"epsilon {projected:.4f}, above min(target-epsilon {target_epsilon:g}, "
            f"max-epsilon {limits.max_epsilon:g}); this site evaluates this study no further.",
            spent=ledger.spent_epsilon,
            target=budget,
            projected=projected,
        )
    ledger.check_site_budget(projected=projected, limits=limits)  # allow-list, site total
    num_classes = int(confusion.shape[0])
    l2, _ = eval_sensitivity(num_classes)
    std = noise_multiplier * math.sqrt(l2**2 + (extra_l2_squared if extra is not None else 0.0))
    noisy_confusion = np.asarray(confusion, dtype=np.int64) + discrete_gaussian(
        std, int(confusion.size)
    ).reshape(confusion.shape)
    noisy_hist = np.asarray(score_hist, dtype=np.int64) + discrete_gaussian(
        std, int(score_hist.size)
    ).reshape(score_hist.shape)
    epsilon = ledger.record_round(
        server_round=server_round,
        run_id=run_id,
        history=[entry],
        delta=chosen,
        accountant=accountant,
    )
    noisy_extra = None
    if extra is not None:
        noisy_extra = np.maximum(
            np.asarray(extra, dtype=np.int64) + discrete_gaussian(std, int(np.size(extra))), 0
        )
    noisy_confusion = np.maximum(noisy_confusion, 0)
    return EvalRelease(
        num_examples=int(noisy_confusion.sum()),
        confusion=noisy_confusion,
        score_hist=np.maximum(noisy_hist, 0),
        std=std,
        epsilon=epsilon,
        delta=chosen,
        extra=noisy_extra,
    )
