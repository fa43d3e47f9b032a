"""fedrad privacy package: DP accounting and budgets (this module), secure aggregation (``secagg``).

Only this package decides anything about epsilon: a site resolves the coordinator's
:class:`DPRequest` against its own :class:`SiteLimits` into a :class:`DPPlan`, checks and
records every round in its :class:`PrivacyLedger`, and refuses with :class:`PrivacyRefused`
(:class:`BudgetExhausted` when the study's budget is spent) or stops on :class:`LedgerError`.
Client-level DP resolves a :class:`ClientDPPlan` from the run config alone and keeps its own
client-level ledger (``PrivacyLedger.open(..., level="client")``).
"""

from privacy.accounting import (
    ACCOUNTANTS,
    BudgetExhausted,
    HistoryEntry,
    LedgerError,
    PrivacyRefused,
    StudyNotAllowed,
    client_level_epsilon,
    compute_epsilon,
    history_delta,
    merge_history,
    noise_multiplier_for,
)
from privacy.distributed import (
    CLIENT_LEVEL_ACCOUNTANT,
    CLIENT_LEVEL_DELTA,
    SITE_SAMPLE_RATE,
    ClientDPPlan,
    PrivateUpdate,
    check_client_round,
    client_noise_multiplier,
    planned_client_epsilon,
    privatize_update,
)
from privacy.dp import (
    DPPlan,
    DPRequest,
    SiteLimits,
    clip_update,
    default_delta,
    resolve_dp,
)
from privacy.ledger import LedgerRound, PrivacyLedger, SiteSpend, StudySpend, site_spend
from privacy.release import (
    EvalRelease,
    eval_entry,
    eval_noise_multiplier,
    release_eval_sums,
    study_delta,
)

__all__ = [
    "ACCOUNTANTS",
    "CLIENT_LEVEL_ACCOUNTANT",
    "CLIENT_LEVEL_DELTA",
    "SITE_SAMPLE_RATE",
    "BudgetExhausted",
    "ClientDPPlan",
    "DPPlan",
    "EvalRelease",
    "DPRequest",
    "HistoryEntry",
    "LedgerError",
    "LedgerRound",
    "PrivacyLedger",
    "PrivacyRefused",
    "PrivateUpdate",
    "SiteLimits",
    "SiteSpend",
    "StudyNotAllowed",
    "StudySpend",
    "check_client_round",
    "client_level_epsilon",
    "client_noise_multiplier",
    "clip_update",
    "compute_epsilon",
    "default_delta",
    "eval_entry",
    "eval_noise_multiplier",
    "history_delta",
    "merge_history",
    "noise_multiplier_for",
    "planned_client_epsilon",
    "privatize_update",
    "release_eval_sums",
    "resolve_dp",
    "site_spend",
    "study_delta",
]
