"""Turning summed site statistics into AUC, accuracy, sensitivity and specificity.

Sites send sums (confusion counts, score histograms); the coordinator adds them and derives
every metric here. ``exact_auc`` serves ``fedrad evaluate``, which sees individual scores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedrad.core import keys
from fedrad.core.config import RunConfig
from fedrad.core.keys import SCORE_BINS
from fedrad.core.scores import SCORE_EDGES, edge_index


def histogram_auc(positive: np.ndarray, negative: np.ndarray) -> float:
    """AUC from score histograms of positives and negatives (ties within a bin count half)."""
    n_pos, n_neg = positive.sum(), negative.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    negatives_below = np.cumsum(negative) - negative
    wins = (positive * negatives_below).sum() + 0.5 * (positive * negative).sum()
    return float(wins / (n_pos * n_neg))


def auc_binning_error(positive: np.ndarray, negative: np.ndarray) -> float:
    """Largest possible difference between the histogram AUC and the AUC of the raw scores.

    Pairs of a positive and a negative in different bins are ordered exactly; a pair in the
    same bin counts a half, where the raw scores may order it either way, so the error is at
    most ``0.5 * sum_b pos_b neg_b / (P N)``. It is large when the scores crowd into few bins
    (all in one bin: 0.5, and the histogram AUC of 0.5 says nothing).
    """
    n_pos, n_neg = float(positive.sum()), float(negative.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float(0.5 * (positive * negative).sum() / (n_pos * n_neg))


def exact_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC of scores for binary labels (1 positive), with average ranks for ties."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    order = np.argsort(np.concatenate([pos, neg]), kind="mergesort")
    values = np.concatenate([pos, neg])[order]
    ranks = np.empty(len(values))
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and values[j + 1] == values[i]:
            j += 1
        ranks[i : j + 1] = (i + j) / 2 + 1
        i = j + 1
    rank_of = np.empty(len(values))
    rank_of[order] = ranks
    rank_sum = rank_of[: len(pos)].sum()
    return float((rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def youden_threshold(positive: np.ndarray, negative: np.ndarray) -> float:
    """Operating threshold (a bin edge of ``fedrad.core.scores``) maximising Youden's J."""
    n_pos, n_neg = max(positive.sum(), 1), max(negative.sum(), 1)
    best, best_j = 0.5, -1.0
    for b in range(1, SCORE_BINS):
        sensitivity = positive[b:].sum() / n_pos
        specificity = negative[:b].sum() / n_neg
        j = sensitivity + specificity - 1
        if j > best_j + 1e-12:
            best, best_j = float(SCORE_EDGES[b]), j
    return best


@dataclass(frozen=True)
class BinaryRates:
    """Sensitivity and specificity at a threshold."""

    sensitivity: float
    specificity: float
    accuracy: float


def rates_at(positive: np.ndarray, negative: np.ndarray, threshold: float) -> BinaryRates:
    """Rates when a score at or above ``threshold`` (a bin edge) predicts positive."""
    b = edge_index(threshold)
    tp, fn = positive[b:].sum(), positive[:b].sum()
    tn, fp = negative[:b].sum(), negative[b:].sum()
    total = tp + fn + tn + fp
    return BinaryRates(
        sensitivity=float(tp / (tp + fn)) if tp + fn else float("nan"),
        specificity=float(tn / (tn + fp)) if tn + fp else float("nan"),
        accuracy=float((tp + tn) / total) if total else float("nan"),
    )


def summarize(
    *,
    num_examples: int,
    loss_sum: float,
    confusion: np.ndarray,
    score_hist: np.ndarray,
    positive_label: int,
    threshold: float | None = None,
) -> dict[str, float]:
    """Metrics of summed evaluation statistics.

    Binary: AUC, and accuracy/sensitivity/specificity at ``threshold`` (default: the Youden
    threshold of these very sums, reported as ``threshold``). Multi-class: macro one-vs-rest
    AUC and accuracy of the arg-max prediction. Both report ``auc-binning-error``, the
    largest difference the score binning can make to the AUC (:func:`auc_binning_error`;
    the mean over classes for macro AUC).
    """
    num_classes = confusion.shape[0]
    out: dict[str, float] = {
        "num-examples": float(num_examples),
        "loss": loss_sum / num_examples if num_examples else float("nan"),
    }
    if num_classes == 2:
        hist = score_hist[positive_label]
        positive, negative = hist[positive_label], hist[1 - positive_label]
        chosen = youden_threshold(positive, negative) if threshold is None else threshold
        rates = rates_at(positive, negative, chosen)
        out.update(
            auc=histogram_auc(positive, negative),
            **{"auc-binning-error": auc_binning_error(positive, negative)},
            accuracy=rates.accuracy,
            sensitivity=rates.sensitivity,
            specificity=rates.specificity,
            threshold=chosen,
        )
    else:
        aucs = [
            histogram_auc(score_hist[c][c], score_hist[c].sum(axis=0) - score_hist[c][c])
            for c in range(num_classes)
        ]
        errors = [
            auc_binning_error(score_hist[c][c], score_hist[c].sum(axis=0) - score_hist[c][c])
            for c in range(num_classes)
        ]
        total = confusion.sum()
        out["auc-binning-error"] = (
            float(np.nanmean(errors)) if not np.all(np.isnan(errors)) else float("nan")
        )
        out.update(
            auc=float(np.nanmean(aucs)) if not np.all(np.isnan(aucs)) else float("nan"),
            accuracy=float(np.trace(confusion) / total) if total else float("nan"),
        )
    return out


def evaluation_metrics(totals: Mapping[str, Any], config: RunConfig) -> dict[str, float]:
    """Metrics of evaluation totals as sites send them (flat lists), shaped by the run config.

    Under DP the counts carry the sites' noise and the loss is withheld (NaN).
    """
    c = config.num_classes
    return summarize(
        num_examples=int(totals[keys.NUM_EXAMPLES]),
        # under DP the sites withhold the loss (see privacy.release): no value, not a zero
        loss_sum=float(totals[keys.LOSS_SUM]) if config.dp == "off" else float("nan"),
        confusion=np.asarray(totals[keys.CONFUSION], dtype=np.int64).reshape(c, c),
        score_hist=np.asarray(totals[keys.SCORE_HIST], dtype=np.int64).reshape(c, c, SCORE_BINS),
        positive_label=config.positive_label,
    )
