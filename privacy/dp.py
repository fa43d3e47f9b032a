"""What a DP run asks for, what a site allows, and the plan a site trains under.

Sample-level DP-SGD: the coordinator sends a :class:`DPRequest`; each site holds its own
:class:`SiteLimits` (from its node config, never from the coordinator) and turns the two into a
:class:`DPPlan` with :func:`resolve_dp`, or refuses with :class:`PrivacyRefused`.

Client-level (distributed) DP for secure aggregation: :func:`clip_update` bounds a site's
update; ``privacy.distributed`` adds its integer noise share (``privacy.noise``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedrad.core.config import NodeConfig, RunConfig
from fedrad.core.errors import ConfigError
from privacy.accounting import (
    ACCOUNTANTS,
    HistoryEntry,
    PrivacyRefused,
    StudyNotAllowed,
    noise_multiplier_for,
)
from privacy.checks import check_count, check_identifier, check_positive, check_probability

__all__ = [
    "DPPlan",
    "DPRequest",
    "SiteLimits",
    "clip_update",
    "default_delta",
    "resolve_dp",
]


@dataclass(frozen=True)
class DPRequest:
    """The sample-level DP a run asks of every site (from the coordinator's run config).

    Parameters
    ----------
    study_id : str
        The study whose budget this run spends; budgets add up across runs of one study.
    target_epsilon : float
        Epsilon per site for the whole study.
    max_grad_norm : float
        Per-sample gradient clipping bound C.
    local_epochs : int
        Local epochs per round.
    planned_rounds : int | None
        Rounds this run plans; required to derive the noise multiplier.
    noise_multiplier : float | None
        Noise std over C; None derives it from the plan and the target epsilon.
    delta : float | None
        None: the study's delta at this site, or 1/(10 N) for a new study.
    accountant : str
        ``rdp`` or ``prv``.
    """

    study_id: str
    target_epsilon: float
    max_grad_norm: float
    local_epochs: int
    planned_rounds: int | None = None
    noise_multiplier: float | None = None
    delta: float | None = None
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        check_identifier("study-id", self.study_id)
        check_positive("target-epsilon", self.target_epsilon)
        check_positive("max-grad-norm", self.max_grad_norm)
        check_count("local-epochs", self.local_epochs)
        if self.planned_rounds is not None:
            check_count("num-server-rounds", self.planned_rounds)
        if self.noise_multiplier is not None:
            check_positive("noise-multiplier", self.noise_multiplier)
        elif self.planned_rounds is None:
            raise ConfigError(
                "Give either 'noise-multiplier' or the planned number of rounds "
                "('num-server-rounds') from which the noise multiplier is derived."
            )
        if self.delta is not None:
            check_probability("delta", self.delta)
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"'dp-accountant' must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}."
            )

    @classmethod
    def from_run_config(cls, config: RunConfig) -> DPRequest:
        """Build the request of a parsed run config.

        A ``noise-multiplier`` or ``delta`` of 0 means unset (None): derived from the plan and
        the target epsilon, or the study's / the site's default delta.
        """
        return cls(
            study_id=config.study_id,
            target_epsilon=config.target_epsilon,
            max_grad_norm=config.max_grad_norm,
            local_epochs=config.local_epochs,
            planned_rounds=config.num_server_rounds,
            noise_multiplier=config.noise_multiplier or None,
            delta=config.delta or None,
            accountant=config.dp_accountant,
        )


@dataclass(frozen=True)
class SiteLimits:
    """A site's own privacy ceilings (node config); the coordinator cannot raise them.

    Parameters
    ----------
    max_epsilon : float
        Largest study epsilon this site accepts.
    max_delta : float
        Largest delta this site accepts.
    max_total_epsilon : float
        Ceiling on the epsilon this site spends over all studies together (basic composition,
        see :func:`privacy.ledger.site_spend`); infinite only when built by hand (tests).
    allowed_studies : tuple[str, ...]
        The only study ids this site takes part in; empty: any study.
    """

    max_epsilon: float
    max_delta: float
    max_total_epsilon: float = math.inf
    allowed_studies: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_positive("max-epsilon", self.max_epsilon)
        check_probability("max-delta", self.max_delta)
        if not self.max_total_epsilon > 0:  # infinity allowed: a deliberately unbounded site
            raise ConfigError(
                f"'max-total-epsilon' must be a positive number, got {self.max_total_epsilon!r}."
            )

    @classmethod
    def from_node_config(cls, node: NodeConfig) -> SiteLimits:
        """The ceilings of a site's parsed node config.

        ``max-epsilon``, ``max-delta``, ``max-total-epsilon`` and ``allowed-studies``.
        """
        return cls(
            max_epsilon=node.max_epsilon,
            max_delta=node.max_delta,
            max_total_epsilon=node.max_total_epsilon,
            allowed_studies=node.allowed_study_ids,
        )

    def check_study(self, study_id: str) -> None:
        """Raise StudyNotAllowed if this site's non-empty ``allowed-studies`` lacks ``study_id``."""
        if self.allowed_studies and study_id not in self.allowed_studies:
            raise StudyNotAllowed(
                f"Study '{study_id}' is not in this site's allowed-studies "
                f"({', '.join(self.allowed_studies)}): the site takes no part in it. Only the "
                "site's operator can add a study to its node config."
            )

    def check(self, *, epsilon: float, delta: float) -> None:
        """Raise PrivacyRefused if ``(epsilon, delta)`` exceeds this site's ceilings."""
        if epsilon > self.max_epsilon:
            raise PrivacyRefused(
                f"The run asks for epsilon {epsilon:g}, above this site's max-epsilon "
                f"{self.max_epsilon:g}. Ask for target-epsilon <= {self.max_epsilon:g}; "
                "only the site can raise its own max-epsilon."
            )
        if delta > self.max_delta:
            raise PrivacyRefused(
                f"The run asks for delta {delta:g}, above this site's max-delta "
                f"{self.max_delta:g}. Ask for delta <= {self.max_delta:g} (or leave it unset)."
            )


@dataclass(frozen=True)
class DPPlan:
    """The resolved DP-SGD parameters a site trains one round under.

    ``sample_rate`` is Opacus' Poisson rate ``1 / ceil(N / batch_size)``: the rate its
    ``DPDataLoader`` samples with and its accountant records (``batch_size / N`` whenever
    ``batch_size`` divides N). Each epoch is ``steps_per_epoch = int(1 / sample_rate)`` steps
    whatever the batches, as Opacus' sampler takes them.
    """

    study_id: str
    accountant: str
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    target_epsilon: float
    sample_rate: float
    num_train_samples: int
    batch_size: int
    local_epochs: int
    steps_per_epoch: int
    steps_per_round: int
    max_total_epsilon: float = math.inf
    """The site's ceiling over all studies (``SiteLimits.max_total_epsilon``)."""

    @property
    def round_entry(self) -> HistoryEntry:
        """The accountant history entry one round under this plan adds."""
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round)


def default_delta(num_train_samples: int) -> float:
    """Return the default delta, 1 / (10 N): well below the 1/N at which DP means nothing."""
    check_count("num_train_samples", num_train_samples)
    return 1.0 / (10 * num_train_samples)


def _choose_delta(
    request: DPRequest, limits: SiteLimits, num_train_samples: int, study_delta: float | None
) -> float:
    if request.delta is not None and study_delta is not None and request.delta != study_delta:
        raise PrivacyRefused(
            f"Study '{request.study_id}' is accounted at delta {study_delta:g} at this site; this "
            f"run asks for delta {request.delta:g}. Run with delta {study_delta:g} (or unset)."
        )
    if request.delta is not None:
        delta = request.delta
    elif study_delta is not None:
        delta = study_delta
    else:  # a site may always choose a smaller delta than the default
        delta = min(default_delta(num_train_samples), limits.max_delta)
    if delta >= 1.0 / num_train_samples:
        raise PrivacyRefused(
            f"delta {delta:g} is not below 1/N = {1 / num_train_samples:g} for this site's "
            f"{num_train_samples} training samples: it would allow releasing a whole record. "
            "Ask for a smaller delta or leave it unset."
        )
    return delta


def resolve_dp(
    request: DPRequest,
    limits: SiteLimits,
    *,
    num_train_samples: int,
    batch_size: int,
    study_delta: float | None = None,
    prior_history: Sequence[HistoryEntry] = (),
) -> DPPlan:
    """Check a request against a site's ceilings and resolve the plan to train under.

    Parameters
    ----------
    request : DPRequest
        What the coordinator asks for.
    limits : SiteLimits
        The site's ceilings.
    num_train_samples : int
        N, the site's number of training samples.
    batch_size : int
        Configured batch size; Poisson sampling keeps it as the expected batch size.
    study_delta : float | None
        The delta the study's ledger is pinned to (``PrivacyLedger.delta``), if any.
    prior_history : Sequence[HistoryEntry]
        History the study spent before this run (``PrivacyLedger.history_before(run_id)``);
        a derived noise multiplier then fits the remaining budget, the same in every round.

    Returns
    -------
    DPPlan
        Noise multiplier, delta, sample rate and steps per round.

    Raises
    ------
    PrivacyRefused
        If the request asks for more epsilon or delta than the site allows
        (:class:`~privacy.accounting.StudyNotAllowed` for a study outside ``allowed-studies``).
    BudgetExhausted
        If a noise multiplier must be derived and no value fits what is left of the budget.
    """
    limits.check_study(request.study_id)  # before anything is computed
    check_count("num_train_samples", num_train_samples)
    check_count("batch-size", batch_size)
    delta = _choose_delta(request, limits, num_train_samples, study_delta)
    limits.check(epsilon=request.target_epsilon, delta=delta)
    sample_rate = 1.0 / math.ceil(num_train_samples / batch_size)  # 1 / len(DataLoader)
    # Opacus' Poisson sampler takes int(1 / q) batches per epoch: one fewer than
    # ceil(N / batch) when the division rounds down (ceil = 93, 99, 105, ...).
    steps_per_epoch = int(1 / sample_rate)
    steps_per_round = request.local_epochs * steps_per_epoch
    noise = request.noise_multiplier
    if noise is None:
        assert request.planned_rounds is not None  # guaranteed by DPRequest.__post_init__
        noise = noise_multiplier_for(
            target_epsilon=request.target_epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=request.planned_rounds * steps_per_round,
            accountant=request.accountant,
            prior_history=prior_history,
        )
    return DPPlan(
        study_id=request.study_id,
        accountant=request.accountant,
        noise_multiplier=noise,
        max_grad_norm=request.max_grad_norm,
        delta=delta,
        target_epsilon=request.target_epsilon,
        sample_rate=sample_rate,
        num_train_samples=num_train_samples,
        batch_size=batch_size,
        local_epochs=request.local_epochs,
        steps_per_epoch=steps_per_epoch,
        steps_per_round=steps_per_round,
        max_total_epsilon=limits.max_total_epsilon,
    )


def clip_update(
    update: Mapping[str, np.ndarray], *, clip_norm: float
) -> tuple[dict[str, np.ndarray], float]:
    """Scale a site's model update so that its L2 norm over all arrays is at most ``clip_norm``.

    Returns
    -------
    tuple[dict[str, np.ndarray], float]
        The clipped copies (float64) and the original norm (keep it local: it is not private).
    """
    check_positive("clip-norm", clip_norm)
    arrays = {}
    for name, value in update.items():
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(
                f"update '{name}' has dtype {array.dtype}; client-level DP clips floating-point "
                "updates only: leave integer buffers out of the update."
            )
        if not np.all(np.isfinite(array)):
            raise ValueError(f"update '{name}' holds NaN or infinite values; it cannot be clipped.")
        arrays[name] = array.astype(np.float64)
    norm = math.sqrt(sum(float(np.sum(np.square(a))) for a in arrays.values()))
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    return {name: a * scale for name, a in arrays.items()}, norm
