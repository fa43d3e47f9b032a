"""fedrad privacy package: DP accounting and budgets (this module), secure aggregation (``secagg``).

Only this package decides anything about epsilon: a site resolves the coordinator's
:class:`DPRequest` against its own :class:`SiteLimits` into a :class:`DPPlan`, checks and
records every round in its :class:`PrivacyLedger`, and refuses with :class:`PrivacyRefused`
(:class:`BudgetExhausted` when the study's budget is spent) or stops on :class:`LedgerError`.
"""

from privacy.accounting import (
    ACCOUNTANTS,
    BudgetExhausted,
    HistoryEntry,
    LedgerError,
    PrivacyRefused,
    client_level_epsilon,
    compute_epsilon,
    history_delta,
    merge_history,
    noise_multiplier_for,
)
from privacy.distributed import CLIENT_LEVEL_DELTA, planned_client_epsilon, privatize_update
from privacy.dp import (
    DPPlan,
    DPRequest,
    SiteLimits,
    clip_update,
    default_delta,
    noise_share,
    resolve_dp,
)
from privacy.ledger import LedgerRound, PrivacyLedger

__all__ = [
    "ACCOUNTANTS",
    "CLIENT_LEVEL_DELTA",
    "BudgetExhausted",
    "DPPlan",
    "DPRequest",
    "HistoryEntry",
    "LedgerError",
    "LedgerRound",
    "PrivacyLedger",
    "PrivacyRefused",
    "SiteLimits",
    "client_level_epsilon",
    "clip_update",
    "compute_epsilon",
    "default_delta",
    "history_delta",
    "merge_history",
    "noise_multiplier_for",
    "noise_share",
    "planned_client_epsilon",
    "privatize_update",
    "resolve_dp",
]
