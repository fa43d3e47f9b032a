"""Record and metric keys exchanged between coordinator and sites: one place, no literals.

Everything a site sends leaves as one of these keys; ``ALLOWED_REPLY_METRICS`` is the
allow-list that the client checks before replying.
"""

from __future__ import annotations

# RecordDict keys
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
SITE = "site"
SUBGROUPS = "subgroups"
SECAGG = "secagg"
"""The one ConfigRecord a secure-aggregation message carries, in both directions."""

# ConfigRecord keys sent by the coordinator (beyond the run-config keys)
SERVER_ROUND = "server-round"
MODEL_SPEC = "model-spec"
SPLIT = "split"
PROXIMAL_MU = "proximal-mu"

# ConfigRecord keys in a reply
SITE_ID = "site-id"

# MetricRecord keys in a reply: sums only, so that they can be aggregated securely later
NUM_EXAMPLES = "num-examples"
LOSS_SUM = "loss-sum"
NUM_STEPS = "num-steps"
CONFUSION = "confusion"
SCORE_HIST = "score-hist"
FAIRNESS = "fairness"
"""The fairness vector: per-subgroup counts in the run's fixed layout (``fedrad.core.fairness``)."""

EPSILON = "epsilon"
DELTA = "delta"

TRAIN_METRICS = (NUM_EXAMPLES, LOSS_SUM, NUM_STEPS)
DP_TRAIN_METRICS = (EPSILON, DELTA)
EVALUATE_METRICS = (NUM_EXAMPLES, LOSS_SUM, CONFUSION, SCORE_HIST, FAIRNESS)
ALLOWED_REPLY_METRICS = frozenset(TRAIN_METRICS + DP_TRAIN_METRICS + EVALUATE_METRICS)
ALLOWED_REPLY_CONFIG = frozenset({SITE_ID})

SCORE_BINS = 100
"""Number of bins on [0, 1] of the score histograms sites send (edges: ``fedrad.core.scores``)."""
