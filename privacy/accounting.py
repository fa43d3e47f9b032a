"""Privacy accounting: the error tree, accountant histories and epsilon, on top of Opacus.

An accountant history is Opacus' own record of a DP-SGD run: a list of
``(noise_multiplier, sample_rate, num_steps)`` entries, consecutive steps with the same noise
and sample rate merged into one entry (as ``RDPAccountant.step`` does). It is independent of
the accountant that turns it into epsilon, so one history serves both ``rdp`` and ``prv``.
Epsilon is always computed by an Opacus accountant fed the whole history: it is cumulative.
Opacus (and with it torch) is imported on first use, so ``import privacy`` stays light.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np

from fedrad.core.errors import FedradError

__all__ = [
    "ACCOUNTANTS",
    "BudgetExhausted",
    "HistoryEntry",
    "LedgerError",
    "PrivacyRefused",
    "StudyNotAllowed",
    "client_level_epsilon",
    "compute_epsilon",
    "history_delta",
    "merge_history",
    "noise_multiplier_for",
    "validate_history_entry",
]

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
"""Opacus accountants a study may use; ``gdp`` is left out (an approximation, not a bound)."""

HistoryEntry = tuple[float, float, int]
"""One accountant history entry: ``(noise_multiplier, sample_rate, num_steps)``."""

_MAX_NOISE_MULTIPLIER = 1e6  # Opacus' MAX_SIGMA: beyond this the budget is "too low"
_EPSILON_TOLERANCE = 0.01  # Opacus' default binary-search tolerance in get_noise_multiplier


class PrivacyRefused(FedradError):
    """A site refuses a DP run: it asks for more than the site allows or has left."""


class BudgetExhausted(PrivacyRefused):
    """The study's privacy budget at this site cannot pay for the next round.

    Parameters
    ----------
    message : str
        What happened and what to do.
    spent : float
        Cumulative epsilon already spent by the study at this site.
    target : float
        The study's target epsilon.
    projected : float
        Cumulative epsilon the refused round(s) would have reached.
    """

    def __init__(self, message: str, *, spent: float, target: float, projected: float):
        super().__init__(message)
        self.spent = spent
        self.target = target
        self.projected = projected


class StudyNotAllowed(PrivacyRefused):
    """The study is not in the site's non-empty ``allowed-studies``: the site takes no part."""


class LedgerError(FedradError):
    """A privacy ledger is unreadable, inconsistent or changed underneath: training stops."""


def validate_history_entry(entry: Sequence[object]) -> HistoryEntry:
    """Return ``entry`` as a typed history entry, or raise ValueError saying what is wrong.

    Parameters
    ----------
    entry : Sequence[object]
        ``(noise_multiplier, sample_rate, num_steps)`` as found in Opacus or in JSON.

    Returns
    -------
    HistoryEntry
        ``(float, float, int)`` with noise > 0, sample rate in (0, 1] and steps >= 1.
    """
    if len(entry) != 3:
        raise ValueError(f"a history entry has 3 values (noise, sample rate, steps), got {entry!r}")
    noise, rate, steps = entry
    if isinstance(noise, bool) or not isinstance(noise, int | float):
        raise ValueError(f"noise multiplier must be a number, got {noise!r}")
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise ValueError(f"sample rate must be a number, got {rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int):
        raise ValueError(f"number of steps must be an integer, got {steps!r}")
    if not (math.isfinite(noise) and noise > 0):
        raise ValueError(f"noise multiplier must be positive and finite, got {noise!r}")
    if not 0 < rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {rate!r}")
    if steps < 1:
        raise ValueError(f"number of steps must be at least 1, got {steps!r}")
    return (float(noise), float(rate), int(steps))


def merge_history(entries: Iterable[Sequence[object]]) -> tuple[HistoryEntry, ...]:
    """Concatenate history entries, merging neighbours with equal noise and sample rate.

    This is the form ``RDPAccountant.step`` and ``PRVAccountant.step`` keep, so a history
    recorded over several rounds equals the history one accountant would have kept.
    """
    merged: list[HistoryEntry] = []
    for raw in entries:
        noise, rate, steps = validate_history_entry(raw)
        if merged and merged[-1][0] == noise and merged[-1][1] == rate:
            merged[-1] = (noise, rate, merged[-1][2] + steps)
        else:
            merged.append((noise, rate, steps))
    return tuple(merged)


def history_delta(
    prior: Sequence[Sequence[object]], current: Sequence[Sequence[object]]
) -> tuple[HistoryEntry, ...]:
    """Return the entries ``current`` added to ``prior`` (an accountant seeded with ``prior``).

    The accountant may have extended ``prior``'s last entry in place, so the first new entry
    can be the tail of that one.

    Raises
    ------
    LedgerError
        If ``current`` does not start with ``prior``: the history was rewritten.
    """
    old, new = merge_history(prior), merge_history(current)
    if not old:
        return new
    head_ok = len(new) >= len(old) and new[: len(old) - 1] == old[:-1]
    last_old, tail = old[-1], new[len(old) - 1 :] if len(new) >= len(old) else ()
    if not head_ok or not tail or tail[0][:2] != last_old[:2] or tail[0][2] < last_old[2]:
        raise LedgerError(
            "The accountant's history after training does not extend the ledger's history: "
            "something replaced the accountant's state. Nothing was recorded; report this bug."
        )
    extra = tail[0][2] - last_old[2]
    first = ((last_old[0], last_old[1], extra),) if extra else ()
    return first + tuple(tail[1:])


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}.")


def compute_epsilon(history: Sequence[Sequence[object]], *, delta: float, accountant: str) -> float:
    """Cumulative epsilon of a whole history at ``delta``, by the named Opacus accountant.

    Parameters
    ----------
    history : Sequence[Sequence[object]]
        Accountant history entries; merged first, as Opacus' accountants keep them.
    delta : float
        Target delta, in (0, 1).
    accountant : str
        ``rdp`` or ``prv``.

    Returns
    -------
    float
        Epsilon; 0.0 for an empty history.
    """
    _check_accountant(accountant)
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}.")
    merged = merge_history(history)
    if not merged:
        return 0.0
    if accountant == "rdp":
        return _rdp_epsilon(merged, delta)
    from opacus.accountants import create_accountant

    engine = create_accountant(mechanism=accountant)
    engine.history = list(merged)
    return float(engine.get_epsilon(delta=delta))


@lru_cache(maxsize=1024)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one step at Opacus' default orders; computing it is most of RDP's cost."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    rdp: np.ndarray = rdp_analysis.compute_rdp(
        q=sample_rate,
        noise_multiplier=noise_multiplier,
        steps=1,
        orders=RDPAccountant.DEFAULT_ALPHAS,
    )
    rdp.setflags(write=False)
    return rdp


def _rdp_epsilon(history: tuple[HistoryEntry, ...], delta: float) -> float:
    """``RDPAccountant.get_epsilon`` bit for bit (same sums in the same order), cached per step.

    Ledgers recompute the epsilon after every recorded round when they open; with the
    per-step RDP cached that costs microseconds per round instead of a tenth of a second.
    """
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis import rdp as rdp_analysis

    rdp = sum([_rdp_per_step(noise, rate) * steps for noise, rate, steps in history])
    eps, _ = rdp_analysis.get_privacy_spent(
        orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta
    )
    return float(eps)


def noise_multiplier_for(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    prior_history: Sequence[Sequence[object]] = (),
) -> float:
    """Smallest noise multiplier (to Opacus' tolerance) whose ``steps`` stay within the target.

    Without a prior history this is Opacus' ``get_noise_multiplier``. With one (a study's
    earlier runs at this site), the same search runs over ``prior + (sigma, q, steps)`` so
    that the new run fits in what is left of the budget.

    Raises
    ------
    BudgetExhausted
        If no noise multiplier up to 1e6 fits (the prior history alone spends the budget).
    """
    _check_accountant(accountant)
    prior = merge_history(prior_history)
    if not prior:
        from opacus.accountants.utils import get_noise_multiplier

        try:
            return float(
                get_noise_multiplier(
                    target_epsilon=target_epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=accountant,
                )
            )
        except ValueError:
            spent = 0.0
    else:
        spent = compute_epsilon(prior, delta=delta, accountant=accountant)
        if spent < target_epsilon:
            found = _search_with_prior(prior, target_epsilon, delta, sample_rate, steps, accountant)
            if found is not None:
                return found
    raise BudgetExhausted(
        f"No noise multiplier fits {steps} more steps at sample rate {sample_rate:g} into the "
        f"target epsilon {target_epsilon:g} (delta {delta:g}); {spent:.4f} is already spent. "
        "Plan fewer rounds or epochs, or ask for a larger target epsilon within the site's "
        "max-epsilon.",
        spent=spent,
        target=target_epsilon,
        projected=math.inf,
    )


def _search_with_prior(
    prior: tuple[HistoryEntry, ...],
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
) -> float | None:
    """Opacus' doubling-then-bisection search, with the prior history composed in."""

    def epsilon_at(sigma: float) -> float:
        return compute_epsilon(
            prior + ((sigma, sample_rate, steps),), delta=delta, accountant=accountant
        )

    sigma_low, sigma_high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target_epsilon:
        sigma_high *= 2
        if sigma_high > _MAX_NOISE_MULTIPLIER:
            return None
        eps_high = epsilon_at(sigma_high)
    while target_epsilon - eps_high > _EPSILON_TOLERANCE:
        sigma = (sigma_low + sigma_high) / 2
        eps = epsilon_at(sigma)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high


def client_level_epsilon(
    *, noise_multiplier: float, site_sample_rate: float, rounds: int, delta: float
) -> float:
    """Client-level (whole-site) epsilon of distributed DP, by Opacus' RDP accountant.

    Each round the coordinator sums clipped site updates (L2 bound C) that carry Gaussian
    noise of total std ``noise_multiplier * C`` (see :func:`privacy.dp.noise_share`), with
    each site taking part with probability ``site_sample_rate``: a Poisson-subsampled
    Gaussian mechanism with sensitivity C per site, composed over ``rounds``.

    Amplification by sampling assumes the coordinator's choice of sites is random and not
    steered by an adversary; pass ``site_sample_rate=1.0`` to claim no amplification.
    A client-level epsilon also bounds each patient's (sample-level) epsilon at that site.
    """
    if not (math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise multiplier must be positive, got {noise_multiplier!r}.")
    if not 0 < site_sample_rate <= 1:
        raise ValueError(f"site sample rate must be in (0, 1], got {site_sample_rate!r}.")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}.")
    return compute_epsilon(
        [(noise_multiplier, site_sample_rate, rounds)], delta=delta, accountant="rdp"
    )
