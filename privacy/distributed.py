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

import math
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
from privacy.dp import SiteLimits, clip_update
from privacy.ledger import PrivacyLedger
from privacy.noise import discrete_gaussian, sigma_for

__all__ = [
    "CLIENT_LEVEL_ACCOUNTANT",
    "CLIENT_LEVEL_DELTA",
    "SITE_SAMPLE_RATE",
    "ClientDPPlan",
    "GridSensitivity",
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
    """What :func:`privatize_update` returns: the update to mask, its integer noise, the spend.

    Attributes
    ----------
    update
        The clipped update (float64, every value within the round's clipping range), named as
        the round's arrays; the secure-aggregation encoder quantises it.
    noise
        This site's discrete Gaussian noise share, one int64 per quantised value in the
        round's order, added on the integers (``RoundSetup.encode(..., noise=...)``).
    share_std
        The share's std on the quantisation grid.
    clipped_values
        Values clipped to the clipping range before the noise (kept in the site's log).
    norm_clipped
        Whether the update's L2 norm was above ``clip_norm`` and was scaled down.
    epsilon, delta
        The site's cumulative client-level spend after the round.
    """

    update: dict[str, np.ndarray]
    noise: np.ndarray
    share_std: float
    clipped_values: int
    norm_clipped: bool
    epsilon: float
    delta: float


@dataclass(frozen=True)
class GridSensitivity:
    """L2 / L1 sensitivity, on the quantisation grid, of one site's clipped update.

    A value ``x`` becomes ``rint((x + r) s)`` with ``s = (2^bits - 1) / (2 r)``. Against the
    zero update (the neighbouring input: the site sent nothing of its own), the vector moves
    by ``x s`` plus a rounding difference below 1 per value, so with ``||x||_2 <= C``:
    ``l2 = C s + sqrt(d)`` and ``l1 = sqrt(d) C s + d``.
    """

    l2: float
    l1: float
    dim: int

    @classmethod
    def of(cls, *, clip_norm: float, clipping_range: float, bits: int, dim: int) -> GridSensitivity:
        """The sensitivity of a ``dim``-value update at L2 bound ``clip_norm`` on a round's grid."""
        scale = ((1 << bits) - 1) / (2.0 * clipping_range)
        root = math.sqrt(dim)
        return cls(l2=clip_norm * scale + root, l1=root * clip_norm * scale + dim, dim=dim)


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
    threshold: int,
    min_threshold: int,
    clipping_range: float,
    quantisation_bits: int,
    extra: Mapping[str, np.ndarray] | None = None,
    limits: SiteLimits,
    ledger: PrivacyLedger,
    server_round: int,
    run_id: str,
) -> PrivateUpdate:
    """Clip this site's update and draw its integer noise share for a verified secure round.

    The noise is sized by ``threshold``, the ``t`` of the secure-aggregation round this site
    has verified: the coordinator can only unmask a sum of at least ``t`` sites' inputs, so
    ``t`` shares of std ``sigma`` carry the whole noise (Kairouz, Liu and Steinke 2021, see
    :mod:`privacy.noise`). ``threshold`` below the site's own ``min_threshold`` (node config
    ``secagg-min-threshold``) is refused, whatever the coordinator asks.

    The update is clipped to L2 norm ``clip_norm`` and then value by value to the round's
    clipping range (a contraction: the sensitivity does not grow). The round is checked against
    the site's budget before any noise is drawn and recorded in the site's client-level ledger
    before anything is returned, so nothing leaves the site unaccounted.

    Parameters
    ----------
    extra
        Entries of the round's vector that carry no data of this site's (the withheld loss,
        zeros); masked and noised with the update, counted in the sensitivity's dimension.

    Raises
    ------
    PrivacyRefused
        If the threshold is below ``min_threshold``, or the round exceeds the site's ceilings
        (:class:`BudgetExhausted` if its budget).
    LedgerError
        If the ledger cannot record the round.
    """
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, int)
        or threshold < max(2, min_threshold)
    ):
        raise PrivacyRefused(
            f"The secure-aggregation round's threshold {threshold} is below this site's "
            f"secagg-min-threshold {min_threshold}: its noise share would not add up to the "
            "full noise. The coordinator must raise the threshold."
        )
    check_client_round(plan=plan, limits=limits, ledger=ledger)
    update = {
        k: np.asarray(trained_arrays[k], dtype=np.float64) - np.asarray(v, dtype=np.float64)
        for k, v in global_arrays.items()
    }
    clipped, norm = clip_update(update, clip_norm=plan.clip_norm)
    out_of_range = sum(int(np.count_nonzero(np.abs(v) > clipping_range)) for v in clipped.values())
    boxed = {k: np.clip(v, -clipping_range, clipping_range) for k, v in clipped.items()}
    every = {**boxed, **{k: np.asarray(v, dtype=np.float64) for k, v in (extra or {}).items()}}
    dim = sum(int(v.size) for v in every.values())
    grid = GridSensitivity.of(
        clip_norm=plan.clip_norm, clipping_range=clipping_range, bits=quantisation_bits, dim=dim
    )
    share_std = sigma_for(
        plan.noise_multiplier, num_shares=threshold, l2=grid.l2, l1=grid.l1, dim=dim
    )
    noise = discrete_gaussian(share_std, dim)
    epsilon = ledger.record_round(
        server_round=server_round,
        run_id=run_id,
        history=[plan.round_entry],
        delta=plan.delta,
        accountant=CLIENT_LEVEL_ACCOUNTANT,
    )
    return PrivateUpdate(
        update=every,
        noise=noise,
        share_std=share_std,
        clipped_values=out_of_range,
        norm_clipped=norm > plan.clip_norm,
        epsilon=epsilon,
        delta=plan.delta,
    )
