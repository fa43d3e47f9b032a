"""What a DP run asks for, what a site allows, and the plan a site trains under.

Sample-level DP-SGD: the coordinator sends a :class:`DPRequest`; each site holds its own
:class:`SiteLimits` (from its node config, never from the coordinator) and turns the two into a
:class:`DPPlan` with :func:`resolve_dp`, or refuses with :class:`PrivacyRefused`.

Client-level (distributed) DP for secure aggregation: :func:`clip_update` bounds a site's
update and :func:`noise_share` draws that site's share of the Gaussian noise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from fedrad.core.errors import ConfigError
from privacy.accounting import (
    ACCOUNTANTS,
    HistoryEntry,
    PrivacyRefused,
    noise_multiplier_for,
)

__all__ = [
    "DPPlan",
    "DPRequest",
    "SiteLimits",
    "clip_update",
    "default_delta",
    "noise_share",
    "resolve_dp",
]

_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ConfigValue = bool | int | float | str


def check_identifier(what: str, value: str) -> None:
    """Raise ConfigError unless ``value`` is a safe study or site identifier (also a file name)."""
    if not isinstance(value, str) or not _ID_PATTERN.fullmatch(value):
        raise ConfigError(
            f"'{what}' must be 1 to 128 letters, digits, '.', '_' or '-' (starting with a letter "
            f"or digit), got {value!r}. Set '{what}' to a name such as 'chest-xray-2026'."
        )


def _positive(key: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"'{key}' must be a number, got {value!r}.")
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"'{key}' must be a positive finite number, got {value!r}.")


def _probability(key: str, value: float) -> None:
    _positive(key, value)
    if not value < 1:
        raise ConfigError(f"'{key}' must be below 1 (typically far below 1/N), got {value!r}.")


def _count(key: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"'{key}' must be a positive integer, got {value!r}.")


def _lookup(
    values: Mapping[str, ConfigValue],
    key: str,
    kind: type,
    where: str,
    default: ConfigValue | None = None,
) -> ConfigValue:
    if key not in values and default is None:
        raise ConfigError(f"'{key}' is required for differential privacy; set it in the {where}.")
    raw = values.get(key, default)
    try:
        return kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"'{key}' must be {kind.__name__}, got {raw!r}.") from None


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
        _positive("target-epsilon", self.target_epsilon)
        _positive("max-grad-norm", self.max_grad_norm)
        _count("local-epochs", self.local_epochs)
        if self.planned_rounds is not None:
            _count("num-server-rounds", self.planned_rounds)
        if self.noise_multiplier is not None:
            _positive("noise-multiplier", self.noise_multiplier)
        elif self.planned_rounds is None:
            raise ConfigError(
                "Give either 'noise-multiplier' or the planned number of rounds "
                "('num-server-rounds') from which the noise multiplier is derived."
            )
        if self.delta is not None:
            _probability("delta", self.delta)
        if self.accountant not in ACCOUNTANTS:
            raise ConfigError(
                f"'dp-accountant' must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}."
            )

    @classmethod
    def from_run_config(cls, values: Mapping[str, ConfigValue]) -> DPRequest:
        """Build a request from kebab-case run-config values.

        Reads ``study-id``, ``target-epsilon``, ``max-grad-norm``, ``local-epochs``,
        ``num-server-rounds``, and optionally ``noise-multiplier`` and ``delta`` (0 or absent:
        derive / default) and ``dp-accountant`` (default ``rdp``).
        """
        where = "run config ([tool.flwr.app.config] or flwr run -c)"
        noise = float(_lookup(values, "noise-multiplier", float, where, 0.0))
        delta = float(_lookup(values, "delta", float, where, 0.0))
        return cls(
            study_id=str(_lookup(values, "study-id", str, where)),
            target_epsilon=float(_lookup(values, "target-epsilon", float, where)),
            max_grad_norm=float(_lookup(values, "max-grad-norm", float, where)),
            local_epochs=int(_lookup(values, "local-epochs", int, where)),
            planned_rounds=int(_lookup(values, "num-server-rounds", int, where)),
            noise_multiplier=noise if noise > 0 else None,
            delta=delta if delta > 0 else None,
            accountant=str(_lookup(values, "dp-accountant", str, where, "rdp")),
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
    """

    max_epsilon: float
    max_delta: float

    def __post_init__(self) -> None:
        _positive("max-epsilon", self.max_epsilon)
        _probability("max-delta", self.max_delta)

    @classmethod
    def from_node_config(cls, values: Mapping[str, ConfigValue]) -> SiteLimits:
        """Read ``max-epsilon`` and ``max-delta`` from a site's node config; both are required."""
        where = "site's node config (--node-config or the site TOML file)"
        return cls(
            max_epsilon=float(_lookup(values, "max-epsilon", float, where)),
            max_delta=float(_lookup(values, "max-delta", float, where)),
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

    @property
    def round_entry(self) -> HistoryEntry:
        """The accountant history entry one round under this plan adds."""
        return (self.noise_multiplier, self.sample_rate, self.steps_per_round)


def default_delta(num_train_samples: int) -> float:
    """Return the default delta, 1 / (10 N): well below the 1/N at which DP means nothing."""
    _count("num_train_samples", num_train_samples)
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
        If the request asks for more epsilon or delta than the site allows.
    BudgetExhausted
        If a noise multiplier must be derived and no value fits what is left of the budget.
    """
    _count("num_train_samples", num_train_samples)
    _count("batch-size", batch_size)
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
    _positive("clip-norm", clip_norm)
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


def noise_share(
    shapes: Mapping[str, Sequence[int]],
    *,
    noise_multiplier: float,
    clip_norm: float,
    num_sites: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Draw one site's share of the Gaussian noise for distributed (client-level) DP.

    Each share has std ``noise_multiplier * clip_norm / sqrt(num_sites)``, so the sum of
    ``num_sites`` independent shares has std ``noise_multiplier * clip_norm``: the noise the
    accounting in :func:`privacy.accounting.client_level_epsilon` assumes. That holds only if
    at least ``num_sites`` shares reach the sum; with fewer the sum has less noise. Pass the
    minimum number of surviving sites that secure aggregation guarantees (its threshold t),
    not the number sampled: if n >= t shares arrive the sum has std ``z * C * sqrt(n / t)``,
    more noise than needed (a utility cost, never a privacy loss). The server must discard a
    round with fewer than t survivors. Draw ``rng`` from OS entropy
    (``np.random.default_rng()``): a seed the coordinator knows lets it remove the noise.

    Returns
    -------
    dict[str, np.ndarray]
        Float64 noise arrays with the given shapes, to add to the clipped update.
    """
    _positive("noise-multiplier", noise_multiplier)
    _positive("clip-norm", clip_norm)
    _count("num_sites", num_sites)
    std = noise_multiplier * clip_norm / math.sqrt(num_sites)
    return {name: rng.normal(0.0, std, size=tuple(shape)) for name, shape in shapes.items()}
