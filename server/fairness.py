"""Fairness metrics from summed subgroup counts: per-group rates with intervals, gaps, worst groups.

The sites send fairness vectors in the run's fixed layout (``fedrad.core.fairness``); the
coordinator adds them (in the clear, or inside SecAgg+) and computes here, per subgroup cell
and class of interest (the positive label, or every class one-vs-rest):

- sensitivity (TPR), specificity, FPR, PPV, selection rate and prevalence, each with a Wilson
  95% interval; under DP the interval is widened by the noise the counts carry (delta method:
  ``var(k/n) ~ (var_k + p^2 var_n) / n^2`` added in quadrature to the Wilson half-widths);
- AUC from the score histograms (ties within a bin count half) with a Hanley-McNeil interval
  and its binning error bound (below), and the expected calibration error (ECE, 10 groups of
  10 score bins of ``fedrad.core.scores``, each bin's score taken as its centre: within half
  a bin's width, at most 0.0175, of the ECE of the raw scores);
- per attribute (and intersection) the gaps with fairlearn's definitions, over the groups
  with data: demographic parity difference (max - min selection rate) and ratio (min / max),
  equalized odds difference (the larger of the TPR and FPR ranges), equal opportunity
  difference (TPR range); and the worst-group value of each metric, with its group.

Binning error of the histogram AUC: pairs of a positive and a negative in different bins
are ordered exactly; a pair in the same bin is counted as a half, where the raw scores may
order it either way. So ``|AUC_hist - AUC_raw| <= 0.5 * sum_b pos_b neg_b / (P N)``, which
:func:`auc_binning_error` computes from the histograms themselves: it is honest also when the
scores crowd into few bins (then it is large, and says so).

Binary decisions use the run's operating threshold (a bin edge): score >= threshold predicts
the positive label. Multi-class decisions are the arg-max (the cells' confusion counts).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedrad.core.durable import write_atomic
from fedrad.core.errors import RunDirError
from fedrad.core.fairness import Cell, FairnessLayout, Family
from fedrad.core.keys import SCORE_BINS
from fedrad.core.scores import bin_centres, edge_index
from server.metrics import auc_binning_error, histogram_auc

__all__ = [
    "COUNTS_DIR",
    "CALIBRATION_GROUPS",
    "read_counts",
    "report_of_round",
    "round_counts",
    "save_counts",
    "GAP_NAMES",
    "auc_binning_error",
    "cell_metrics",
    "fairness_report",
    "interval",
]

Z95 = 1.959963984540054
CALIBRATION_GROUPS = 10
NOISE_FLOOR = 3.0
"""Under DP, cells whose summed count is at most this many noise standard deviations are left
out of the groups (listed as ``noise-dominated``): their counts are mostly noise."""
"""Reliability-plot groups: SCORE_BINS / CALIBRATION_GROUPS score bins each."""

RATE_NAMES = ("sensitivity", "specificity", "fpr", "ppv", "selection-rate", "prevalence")
GAP_NAMES = (
    "demographic-parity-difference",
    "demographic-parity-ratio",
    "equalized-odds-difference",
    "equal-opportunity-difference",
)
_HIGHER_IS_BETTER = {"auc": True, "sensitivity": True, "specificity": True, "ppv": True}
_LOWER_IS_BETTER = {"fpr": True, "ece": True}


def interval(
    k: float, n: float, *, var_k: float = 0.0, var_n: float = 0.0
) -> dict[str, float | None]:
    """``k / n`` with its Wilson 95% interval, widened by count noise of variance var_k, var_n."""
    if n <= 0:
        return {"value": None, "low": None, "high": None, "numerator": k, "denominator": n}
    p = min(max(k / n, 0.0), 1.0)
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    low, high = centre - half, centre + half
    if var_k or var_n:
        noise = Z95 * math.sqrt(var_k + p * p * var_n) / n
        low = p - math.hypot(p - low, noise)
        high = p + math.hypot(high - p, noise)
    return {
        "value": p,
        "low": max(low, 0.0),
        "high": min(high, 1.0),
        "numerator": float(k),
        "denominator": float(n),
    }


def _auc(positive: np.ndarray, negative: np.ndarray) -> dict[str, float | None]:
    a = histogram_auc(positive, negative)
    n_pos, n_neg = float(positive.sum()), float(negative.sum())
    if math.isnan(a):
        return {"value": None, "low": None, "high": None, "binning-error": None}
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    var = (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (n_pos * n_neg)
    se = math.sqrt(max(var, 0.0))
    return {
        "value": a,
        "low": max(a - Z95 * se, 0.0),
        "high": min(a + Z95 * se, 1.0),
        "binning-error": auc_binning_error(positive, negative),
    }


def _calibration(
    positive: np.ndarray, negative: np.ndarray
) -> tuple[float | None, list[list[float]]]:
    """ECE and the reliability points ``[mean score, observed rate, count]`` per group."""
    centres = bin_centres()
    width = SCORE_BINS // CALIBRATION_GROUPS
    total = float(positive.sum() + negative.sum())
    if total <= 0:
        return None, []
    ece, points = 0.0, []
    for g in range(CALIBRATION_GROUPS):
        sl = slice(g * width, (g + 1) * width)
        pos, neg = positive[sl].astype(float), negative[sl].astype(float)
        n = float(pos.sum() + neg.sum())
        if n <= 0:
            continue
        confidence = float(((pos + neg) * centres[sl]).sum() / n)
        observed = float(pos.sum() / n)
        ece += n / total * abs(observed - confidence)
        points.append([confidence, observed, n])
    return ece, points


def _roc(positive: np.ndarray, negative: np.ndarray) -> list[list[float]]:
    """ROC points ``[FPR, TPR]`` at every bin edge, from threshold 1 down to 0."""
    n_pos, n_neg = float(positive.sum()), float(negative.sum())
    if n_pos == 0 or n_neg == 0:
        return []
    tp = np.concatenate([[0.0], np.cumsum(positive[::-1])]) / n_pos
    fp = np.concatenate([[0.0], np.cumsum(negative[::-1])]) / n_neg
    return [[round(float(f), 5), round(float(t), 5)] for f, t in zip(fp, tp, strict=True)]


@dataclass(frozen=True)
class _Decisions:
    tp: float
    fn: float
    fp: float
    tn: float
    var_tp: float
    var_fn: float
    var_fp: float
    var_tn: float


def _decisions(
    layout: FairnessLayout, vector: np.ndarray, cell: Cell, k_index: int, threshold: float
) -> _Decisions:
    variance = layout.noise_variance(vector)
    if layout.confusion_size:
        k = layout.classes[k_index]
        conf = layout.confusion(vector, cell).astype(float)
        tp = conf[k, k]
        fn = conf[k].sum() - tp
        fp = conf[:, k].sum() - tp
        tn = conf.sum() - tp - fn - fp
        c = layout.num_classes
        return _Decisions(
            tp,
            fn,
            fp,
            tn,
            variance,
            (c - 1) * variance,
            (c - 1) * variance,
            (c - 1) ** 2 * variance,
        )
    hist = layout.histograms(vector, cell)[k_index].astype(float)
    b = edge_index(threshold)
    neg, pos = hist[0], hist[1]
    above, below = SCORE_BINS - b, b
    return _Decisions(
        tp=pos[b:].sum(),
        fn=pos[:b].sum(),
        fp=neg[b:].sum(),
        tn=neg[:b].sum(),
        var_tp=above * variance,
        var_fn=below * variance,
        var_fp=above * variance,
        var_tn=below * variance,
    )


def cell_metrics(
    layout: FairnessLayout, vector: np.ndarray, cell: Cell, k_index: int, threshold: float
) -> dict[str, Any]:
    """Every metric of one cell for one class of interest (see the module docstring)."""
    d = _decisions(layout, vector, cell, k_index, threshold)
    hist = layout.histograms(vector, cell)[k_index]
    negative, positive = hist[0], hist[1]
    total = d.tp + d.fn + d.fp + d.tn
    var_total = d.var_tp + d.var_fn + d.var_fp + d.var_tn
    ece, reliability = _calibration(positive, negative)
    return {
        "cell": cell.label,
        "n": layout.count(vector, cell),
        "suppressed-at-sites": layout.suppressed(vector, cell),
        "auc": _auc(positive, negative),
        "sensitivity": interval(d.tp, d.tp + d.fn, var_k=d.var_tp, var_n=d.var_tp + d.var_fn),
        "specificity": interval(d.tn, d.tn + d.fp, var_k=d.var_tn, var_n=d.var_tn + d.var_fp),
        "fpr": interval(d.fp, d.tn + d.fp, var_k=d.var_fp, var_n=d.var_tn + d.var_fp),
        "ppv": interval(d.tp, d.tp + d.fp, var_k=d.var_tp, var_n=d.var_tp + d.var_fp),
        "selection-rate": interval(d.tp + d.fp, total, var_k=d.var_tp + d.var_fp, var_n=var_total),
        "prevalence": interval(d.tp + d.fn, total, var_k=d.var_tp + d.var_fn, var_n=var_total),
        "ece": ece,
        "roc": _roc(positive, negative),
        "reliability": reliability,
    }


def _value(metrics: Mapping[str, Any], name: str) -> float | None:
    entry = metrics[name]
    value = entry.get("value") if isinstance(entry, Mapping) else entry
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _range(groups: Sequence[Mapping[str, Any]], name: str) -> tuple[float, float] | None:
    values = [v for g in groups if (v := _value(g, name)) is not None]
    return (min(values), max(values)) if values else None


def _gaps(groups: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """The between-group gaps (fairlearn's definitions) over the groups with data."""
    sel, tpr, fpr = (_range(groups, n) for n in ("selection-rate", "sensitivity", "fpr"))
    tpr_gap = tpr[1] - tpr[0] if tpr else None
    fpr_gap = fpr[1] - fpr[0] if fpr else None
    odds = [g for g in (tpr_gap, fpr_gap) if g is not None]
    return {
        "demographic-parity-difference": sel[1] - sel[0] if sel else None,
        "demographic-parity-ratio": (sel[0] / sel[1] if sel[1] > 0 else None) if sel else None,
        "equalized-odds-difference": max(odds) if odds else None,
        "equal-opportunity-difference": tpr_gap,
    }


def _worst(groups: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The worst group of each metric (lowest AUC, sensitivity...; highest FPR, ECE)."""
    out: dict[str, dict[str, Any]] = {}
    for name in (*_HIGHER_IS_BETTER, *_LOWER_IS_BETTER):
        scored = [(v, g["cell"]) for g in groups if (v := _value(g, name)) is not None]
        if scored:
            value, cell = (min if name in _HIGHER_IS_BETTER else max)(scored)
            out[name] = {"value": value, "cell": cell}
    return out


def family_report(
    layout: FairnessLayout, vector: np.ndarray, family: Family, threshold: float
) -> dict[str, Any]:
    """Per-class groups, gaps and worst groups of one attribute or intersection."""
    cells = [c for c in layout.cells if c.family == family]
    # under DP an empty cell's noised count may pass a site's min-cell-count: a cell whose
    # count is within NOISE_FLOOR standard deviations of the noise is noise, not a group
    floor = NOISE_FLOOR * math.sqrt(layout.noise_variance(vector))
    reported = [c for c in cells if layout.count(vector, c) > floor]
    noisy = [c.label for c in cells if 0 < layout.count(vector, c) <= floor]
    classes: dict[str, Any] = {}
    for k_index, k in enumerate(layout.classes):
        groups = [cell_metrics(layout, vector, c, k_index, threshold) for c in reported]
        classes[str(k)] = {"groups": groups, "gaps": _gaps(groups), "worst": _worst(groups)}
    suppressed = [c.label for c in cells if layout.suppressed(vector, c) > 0]
    return {
        "name": family.name,
        "classes": classes,
        "suppressed": suppressed,
        "noise-dominated": noisy,
    }


def _site_spread(
    layout: FairnessLayout, per_site: Mapping[str, np.ndarray], threshold: float
) -> dict[str, Any]:
    """Per-site pooled metrics (from each site's vector, first family) and their spread."""
    if not per_site or not layout.families:
        return {}
    family = layout.families[0]
    cells = [c for c in layout.cells if c.family == family]
    sites: dict[str, Any] = {}
    for site, vector in sorted(per_site.items()):
        pooled = layout.zeros()
        for c in cells:  # the family's cells partition the site's samples
            pooled[cells[0].offset : cells[0].offset + layout.cell_size] += layout.block(vector, c)
        pooled[0] = vector[0]
        sites[site] = {
            str(k): cell_metrics(layout, pooled, cells[0], k_index, threshold)
            for k_index, k in enumerate(layout.classes)
        }
        for entry in sites[site].values():
            entry["cell"] = site
            entry.pop("roc"), entry.pop("reliability")
    spread: dict[str, Any] = {}
    for k in (str(k) for k in layout.classes):
        groups = [sites[s][k] for s in sites]
        spread[k] = {
            name: (r[1] - r[0]) if (r := _range(groups, name)) else None
            for name in ("auc", *RATE_NAMES, "ece")
        }
    return {"sites": sites, "spread": spread}


def fairness_report(
    layout: FairnessLayout,
    total: np.ndarray,
    *,
    threshold: float,
    per_site: Mapping[str, np.ndarray] | None = None,
    secure_aggregation: bool = False,
    dp: str = "off",
) -> dict[str, Any]:
    """The fairness report of one evaluation (``fairness.json``'s body).

    ``total`` is the sum of the sites' vectors; ``per_site`` their vectors where the
    coordinator saw them (no secure aggregation), for the per-site views.
    """
    vector = np.asarray(total, dtype=np.int64)
    layout.check(vector)
    left_out: list[str] = []
    if secure_aggregation:
        left_out.append(
            "per-site metrics and the spread across sites: under secure aggregation the "
            "coordinator receives only the sum over sites"
        )
    if dp != "off":
        left_out.append(
            "exact counts: under DP every count carries the sites' noise (variance "
            f"{layout.noise_variance(vector):.1f} per summed count); intervals include it"
        )
    families = [family_report(layout, vector, f, threshold) for f in layout.families]
    suppressed = sorted({label for f in families for label in f["suppressed"]})
    return {
        "threshold": threshold,
        "num-classes": layout.num_classes,
        "classes": list(layout.classes),
        "noise-variance": layout.noise_variance(vector),
        "families": families,
        "suppressed": suppressed,
        "per-site": _site_spread(layout, per_site or {}, threshold),
        "left-out": left_out,
    }


def layout_record(layout: FairnessLayout, config: Any) -> dict[str, Any]:
    """The run config's fairness layout as stored beside each round's counts."""
    return {
        "num-classes": layout.num_classes,
        "positive-label": layout.positive_label,
        "attributes": config.fairness_attributes,
        "intersections": config.fairness_intersections,
    }


def round_counts(
    config: Any,
    *,
    model_round: int,
    threshold: float,
    total: Sequence[int] | None,
    per_site: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any] | None:
    """What the run directory keeps of one evaluation's fairness counts (None: none arrived).

    ``config`` is the run's ``RunConfig``; ``total`` the summed vector, ``per_site`` each
    site's vector where the coordinator saw them.
    """
    if total is None:
        return None
    layout = config.fairness_layout
    vector = np.asarray(total, dtype=np.int64)
    layout.check(vector)
    return {
        "round": model_round,
        "threshold": threshold,
        "secure-aggregation": bool(config.secure_aggregation),
        "dp": config.dp,
        "layout": layout_record(layout, config),
        "total": [int(v) for v in vector],
        "sites": {site: [int(v) for v in values] for site, values in (per_site or {}).items()},
    }


def layout_of(stored: Mapping[str, Any]) -> FairnessLayout:
    """The layout a stored round's counts were sent in."""
    meta = stored["layout"]
    return FairnessLayout.from_config(
        num_classes=int(meta["num-classes"]),
        positive_label=int(meta["positive-label"]),
        attributes=str(meta["attributes"]),
        intersections=str(meta["intersections"]),
    )


def report_of_round(stored: Mapping[str, Any]) -> dict[str, Any]:
    """:func:`fairness_report` of a round as :func:`round_counts` stored it."""
    layout = layout_of(stored)
    body = fairness_report(
        layout,
        np.asarray(stored["total"], dtype=np.int64),
        threshold=float(stored["threshold"]),
        per_site={s: np.asarray(v, dtype=np.int64) for s, v in stored["sites"].items()},
        secure_aggregation=bool(stored["secure-aggregation"]),
        dp=str(stored["dp"]),
    )
    return {"round": int(stored["round"]), **body}


COUNTS_DIR = "fairness"
"""Folder of a run directory holding each evaluation's summed fairness counts."""


def save_counts(run_dir: Path, stored: Mapping[str, Any]) -> Path:
    """Keep one evaluation's counts (``fairness/round-NNN.json``), replacing an earlier copy."""
    path = Path(run_dir) / COUNTS_DIR / f"round-{int(stored['round']):03d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(stored, sort_keys=True, separators=(",", ":")) + "\n").encode())
    return path


def read_counts(run_dir: Path) -> list[dict[str, Any]]:
    """Every stored evaluation's counts, in round order (empty if the run kept none)."""
    out = []
    for path in sorted((Path(run_dir) / COUNTS_DIR).glob("round-*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise RunDirError(
                f"{path} is not valid JSON ({exc}); the run directory is damaged."
            ) from None
    return sorted(out, key=lambda s: int(s["round"]))


def cell_counts(layout: FairnessLayout, vector: Sequence[int]) -> dict[str, int]:
    """The published (non-empty, not suppressed) cells' ``n`` of one vector, by cell name."""
    values = np.asarray(vector, dtype=np.int64)
    return {
        c.label: layout.count(values, c)
        for c in layout.cells
        if layout.count(values, c) > 0 and layout.suppressed(values, c) == 0
    }
