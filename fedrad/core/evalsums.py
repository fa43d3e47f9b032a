"""Evaluation sums as exact integer counts: what a site adds to a secure-aggregation round.

A site's evaluation is additive (``num-examples``, ``loss-sum``, the confusion counts and the
score histogram, see ``client.train.EvalSums``), so under secure aggregation the coordinator can
take the sum over sites without seeing any one site's. SecAgg+ sums non-negative integers
exactly; the loss sum, the only real number, travels in fixed point with :data:`LOSS_SCALE`
steps per unit (an error of at most ``0.5 / LOSS_SCALE`` per site).

Count names carry a colon, which no PyTorch state-dict key holds, so they never clash with a
model array in the same round.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedrad.core import keys

LOSS_SCALE = 1024
"""Fixed-point steps per unit of the evaluation loss sum."""

MAX_COUNT = 1 << 40
"""Largest count one site may send (the loss sum in fixed point is the largest)."""

_PREFIX = "fedrad:eval:"
_FIELDS = (keys.NUM_EXAMPLES, keys.LOSS_SUM, keys.CONFUSION, keys.SCORE_HIST)
"""The pooled sums; the fairness vector follows when the run has one."""


def count_sizes(num_classes: int, fairness_size: int = 0) -> dict[str, int]:
    """Names and sizes of the evaluation counts of a ``num_classes`` model, in order.

    ``fairness_size`` is the length of the run's fairness vector (``RunConfig.fairness_layout``);
    0 leaves it out.
    """
    c = num_classes
    sizes = (1, 1, c * c, c * c * keys.SCORE_BINS)
    out = {_PREFIX + name: size for name, size in zip(_FIELDS, sizes, strict=True)}
    if fairness_size:
        out[_PREFIX + keys.FAIRNESS] = fairness_size
    return out


def to_counts(
    metrics: Mapping[str, Any], num_classes: int, fairness_size: int = 0
) -> dict[str, np.ndarray]:
    """A site's evaluation metrics (the plain evaluate reply's values) as integer counts.

    Raises
    ------
    ValueError
        If a value is negative, not finite or the wrong size for ``num_classes``.
    """
    loss_sum = float(metrics[keys.LOSS_SUM])
    if not (np.isfinite(loss_sum) and 0.0 <= loss_sum * LOSS_SCALE <= MAX_COUNT):
        raise ValueError(
            f"The evaluation loss sum {loss_sum} cannot be counted: it must be finite and in "
            f"[0, {MAX_COUNT / LOSS_SCALE:g}]."
        )
    values = {
        keys.NUM_EXAMPLES: np.array([int(metrics[keys.NUM_EXAMPLES])], dtype=np.int64),
        keys.LOSS_SUM: np.array([round(loss_sum * LOSS_SCALE)], dtype=np.int64),
        keys.CONFUSION: np.asarray(metrics[keys.CONFUSION], dtype=np.int64).ravel(),
        keys.SCORE_HIST: np.asarray(metrics[keys.SCORE_HIST], dtype=np.int64).ravel(),
    }
    if fairness_size:
        values[keys.FAIRNESS] = np.asarray(metrics[keys.FAIRNESS], dtype=np.int64).ravel()
    counts = {_PREFIX + name: value for name, value in values.items()}
    for name, size in count_sizes(num_classes, fairness_size).items():
        if counts[name].size != size:
            raise ValueError(f"{name} holds {counts[name].size} values, expected {size}.")
    return counts


def from_counts(counts: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Summed counts back as evaluation totals (read by ``server.metrics.evaluation_metrics``)."""
    values = {name: np.asarray(counts[_PREFIX + name], dtype=np.int64) for name in _FIELDS}
    out: dict[str, Any] = {
        keys.NUM_EXAMPLES: int(values[keys.NUM_EXAMPLES][0]),
        keys.LOSS_SUM: float(values[keys.LOSS_SUM][0]) / LOSS_SCALE,
        keys.CONFUSION: [int(v) for v in values[keys.CONFUSION]],
        keys.SCORE_HIST: [int(v) for v in values[keys.SCORE_HIST]],
    }
    if _PREFIX + keys.FAIRNESS in counts:
        out[keys.FAIRNESS] = [int(v) for v in np.asarray(counts[_PREFIX + keys.FAIRNESS])]
    return out
