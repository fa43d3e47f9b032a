"""Client-level (distributed) DP at a site: clip the round's update, add this site's noise share.

Each site clips its whole model update to L2 norm ``clip_norm`` and adds Gaussian noise of std
``noise_multiplier * clip_norm / sqrt(t)``; secure aggregation then masks it. Any ``t`` or more
shares summed carry at least the full noise ``noise_multiplier * clip_norm``, so the coordinator
never sees a sum with less than the full noise, and never sees an individual update at all.
Sites weigh equally (the guarantee bounds each site's contribution, not its sample count).

The noise multiplier is the run's ``noise-multiplier``, or, when that is 0, derived from the
run config alone (``target-epsilon``, ``delta``, ``num-server-rounds``) by Opacus' RDP
accountant, so that every site and the coordinator compute the same value: the noise shares
only add up to the full noise if every site draws its share at the same multiplier.

Each site records every round it contributes in its own client-level ledger (one
``(noise_multiplier, 1.0, 1)`` accountant entry per round) and refuses a round that would bring
its cumulative epsilon above ``min(target-epsilon, max-epsilon)``. The sample rate 1.0 claims
no amplification by the coordinator's choice of sites: a site can verify its own participation,
not that the choice was random, and Flower samples a fixed number of sites, not the Poisson
sampling that the accountant's amplification assumes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from fedrad.core.config import RunConfig
from privacy.accounting import (
    BudgetExhausted,
    HistoryEntry,
    PrivacyRefused,
    client_level_epsilon,
    noise_multiplier_for,
)
from privacy.checks import check_count, check_identifier, check_positive, check_probability
from privacy.dp import SiteLimits, clip_update, noise_share
from privacy.ledger import PrivacyLedger

__all__ = [
    "CLIENT_LEVEL_ACCOUNTANT",
    "CLIENT_LEVEL_DELTA",
    "SITE_SAMPLE_RATE",
    "ClientDPPlan",
    "PrivateUpdate",
    "check_client_round",
    "client_noise_multiplier",
    "planned_client_epsilon",
    "privatize_update",
]

CLIENT_LEVEL_DELTA = 1e-5
"""Delta of client-level DP when the run names none (consortia have far fewer than 1e5 sites)."""

CLIENT_LEVEL_ACCOUNTANT = "rdp"
"""Client-level DP is accounted with Opacus' RDP accountant (one step per round)."""

SITE_SAMPLE_RATE = 1.0
"""Sample rate of client-level accounting: no amplification by the choice of sites is claimed."""


@lru_cache(maxsize=256)
def client_noise_multiplier(*, target_epsilon: float, delta: float, rounds: int) -> float:
    """Smallest noise multiplier (to Opacus' tolerance) whose ``rounds`` stay within the target.

    Opacus' ``get_noise_multiplier`` for ``rounds`` steps at sample rate 1.0 (RDP): the value
    every site and the coordinator derive from the run config.

    Raises
    ------
    BudgetExhausted
        If no noise multiplier up to 1e6 fits.
    """
    return noise_multiplier_for(
        target_epsilon=target_epsilon,
        delta=delta,
        sample_rate=SITE_SAMPLE_RATE,
        steps=rounds,
        accountant=CLIENT_LEVEL_ACCOUNTANT,
    )


def planned_client_epsilon(*, noise_multiplier: float, rounds: int, delta: float) -> float:
    """Client-level epsilon after ``rounds`` rounds of one site (no amplification by sampling)."""
    return client_level_epsilon(
        noise_multiplier=noise_multiplier,
        site_sample_rate=SITE_SAMPLE_RATE,
        rounds=rounds,
        delta=delta,
    )


@dataclass(frozen=True)
class ClientDPPlan:
    """The client-level DP of one run, resolved from the run config alone.

    Parameters
    ----------
    study_id : str
        The study whose client-level budget the run spends at each site.
    target_epsilon : float
        Client-level epsilon per site for the whole study.
    delta : float
        Client-level delta.
    noise_multiplier : float
        Total noise std over ``clip_norm`` (each site adds ``1 / sqrt(t)`` of it).
    clip_norm : float
        L2 bound of one site's update (``max-grad-norm``).
    planned_rounds : int
        The run's ``num-server-rounds``.
    derived : bool
        True when ``noise_multiplier`` was derived from the target and the plan.
    """

    study_id: str
    target_epsilon: float
    delta: float
    noise_multiplier: float
    clip_norm: float
    planned_rounds: int
    derived: bool

    def __post_init__(self) -> None:
        check_identifier("study-id", self.study_id)
        check_positive("target-epsilon", self.target_epsilon)
        check_probability("delta", self.delta)
        check_positive("noise-multiplier", self.noise_multiplier)
        check_positive("max-grad-norm", self.clip_norm)
        check_count("num-server-rounds", self.planned_rounds)

    @property
    def round_entry(self) -> HistoryEntry:
        """The accountant history entry one contributed round adds."""
        return (self.noise_multiplier, SITE_SAMPLE_RATE, 1)

    @classmethod
    def from_run_config(cls, config: RunConfig) -> ClientDPPlan:
        """Resolve the plan of a parsed run config.

        A ``noise-multiplier`` of 0 derives the multiplier from ``target-epsilon``, ``delta``
        and ``num-server-rounds``; a ``delta`` of 0 means :data:`CLIENT_LEVEL_DELTA`.

        Raises
        ------
        ConfigError
            If a value is out of range.
        BudgetExhausted
            If no noise multiplier fits the target.
        """
        delta = config.delta or CLIENT_LEVEL_DELTA
        check_positive("target-epsilon", config.target_epsilon)
        check_probability("delta", delta)
        check_count("num-server-rounds", config.num_server_rounds)
        noise = config.noise_multiplier or client_noise_multiplier(
            target_epsilon=config.target_epsilon, delta=delta, rounds=config.num_server_rounds
        )
        return cls(
            study_id=config.study_id,
            target_epsilon=config.target_epsilon,
            delta=delta,
            noise_multiplier=noise,
            clip_norm=config.max_grad_norm,
            planned_rounds=config.num_server_rounds,
            derived=config.noise_multiplier == 0,
        )


@dataclass(frozen=True)
class PrivateUpdate:
    """What :func:`privatize_update` returns: the weights to mask and the site's spend after."""

    arrays: dict[str, np.ndarray]
    epsilon: float
    delta: float


def check_client_round(*, plan: ClientDPPlan, limits: SiteLimits, ledger: PrivacyLedger) -> float:
    """Refuse the next round unless it fits this site's ceilings and the study's budget.

    Returns
    -------
    float
        The site's cumulative client-level epsilon after the round.

    Raises
    ------
    PrivacyRefused
        If the run asks for more than the site's ``max-epsilon`` or ``max-delta``, or the
        ledger is not a client-level one or is accounted at another delta.
    BudgetExhausted
        If the round would bring the cumulative epsilon above
        ``min(target-epsilon, max-epsilon)``.
    """
    if ledger.level != "client" or ledger.study_id != plan.study_id:
        raise PrivacyRefused(
            f"Client-level DP of study '{plan.study_id}' must spend that study's client-level "
            f"ledger, not the {ledger.level}-level ledger of study '{ledger.study_id}'."
        )
    limits.check(epsilon=plan.target_epsilon, delta=plan.delta)
    budget = min(plan.target_epsilon, limits.max_epsilon)
    spent = ledger.spent_epsilon
    projected = ledger.projected_epsilon(
        plan.round_entry,
        study_id=plan.study_id,
        delta=plan.delta,
        accountant=CLIENT_LEVEL_ACCOUNTANT,
    )
    ledger.check_site_budget(projected=projected, limits=limits)  # allow-list, site total
    if projected > budget:
        raise BudgetExhausted(
            f"Client-level privacy budget of study '{plan.study_id}' at site "
            f"'{ledger.site_id}' is exhausted: spent epsilon {spent:.4f} over "
            f"{len(ledger.rounds)} round(s); one more round at noise multiplier "
            f"{plan.noise_multiplier:g} would reach {projected:.4f}, above "
            f"min(target-epsilon {plan.target_epsilon:g}, this site's max-epsilon "
            f"{limits.max_epsilon:g}) (delta {plan.delta:g}). This site will not contribute "
            "to this study further: plan fewer rounds, more noise, or a larger target-epsilon "
            "within the site's max-epsilon. Spent budget is never reset.",
            spent=spent,
            target=budget,
            projected=projected,
        )
    return projected


def privatize_update(
    global_arrays: Mapping[str, np.ndarray],
    trained_arrays: Mapping[str, np.ndarray],
    *,
    plan: ClientDPPlan,
    noise_shares: int,
    limits: SiteLimits,
    ledger: PrivacyLedger,
    server_round: int,
    run_id: str,
) -> PrivateUpdate:
    """Return the weights to mask (global + clipped update + this site's noise share).

    The round is checked against the site's budget before any noise is drawn and recorded in
    the site's client-level ledger before the weights are returned, so nothing leaves the
    site unaccounted. Noise draws on OS randomness, never on a seed the coordinator knows.

    Raises
    ------
    PrivacyRefused
        If the round exceeds the site's ceilings (:class:`BudgetExhausted` if its budget).
    LedgerError
        If the ledger cannot record the round.
    """
    if noise_shares < 1:
        raise PrivacyRefused("client-level DP needs the secure-aggregation threshold (>= 1).")
    check_client_round(plan=plan, limits=limits, ledger=ledger)
    update = {
        k: np.asarray(trained_arrays[k], dtype=np.float64) - np.asarray(v, dtype=np.float64)
        for k, v in global_arrays.items()
    }
    clipped, _ = clip_update(update, clip_norm=plan.clip_norm)
    noise = noise_share(
        {k: v.shape for k, v in clipped.items()},
        noise_multiplier=plan.noise_multiplier,
        clip_norm=plan.clip_norm,
        num_sites=noise_shares,
        rng=np.random.default_rng(),
    )
    arrays = {
        k: (np.asarray(global_arrays[k], dtype=np.float64) + clipped[k] + noise[k]).astype(
            np.asarray(global_arrays[k]).dtype
        )
        for k in global_arrays
    }
    epsilon = ledger.record_round(
        server_round=server_round,
        run_id=run_id,
        history=[plan.round_entry],
        delta=plan.delta,
        accountant=CLIENT_LEVEL_ACCOUNTANT,
    )
    return PrivateUpdate(arrays=arrays, epsilon=epsilon, delta=plan.delta)
