"""The score bins every histogram a site sends uses: fine in the middle, logarithmic in the tails.

A site bins each softmax score into one of :data:`fedrad.core.keys.SCORE_BINS` (100) bins, so
that the coordinator can add histograms across sites. The bins are not of equal width:

- 80 equal bins of width 0.01125 cover ``[0.05, 0.95)``, where operating thresholds and
  calibration live;
- 10 bins on each tail, with edges spaced geometrically from ``1e-6`` to ``0.05`` (and mirrored
  from ``0.95`` to ``1 - 1e-6``), keep apart scores that crowd near 0 or 1.

Equal-width bins of 0.01 put every score below 0.01 into one bin, so a model whose scores all
fall there (a federated model pulled towards one class by sites that hold only that class)
got a histogram AUC of exactly 0.5 whatever its ranking. With these bins scores from ``1e-6``
to ``0.05`` still fall into 10 bins, and :func:`server.metrics.auc_binning_error` states the
error that remains.
"""

from __future__ import annotations

import numpy as np

from fedrad.core.keys import SCORE_BINS

__all__ = ["SCORE_EDGES", "bin_centres", "edge_index", "score_bins"]

_TAIL = np.geomspace(1e-6, 0.05, 10)[:-1]
SCORE_EDGES: np.ndarray = np.concatenate(
    [[0.0], _TAIL, np.linspace(0.05, 0.95, 81), (1.0 - _TAIL)[::-1], [1.0]]
)
"""The ``SCORE_BINS + 1`` bin edges on [0, 1]; bin ``b`` holds ``[edges[b], edges[b+1])``."""
SCORE_EDGES.setflags(write=False)
if SCORE_EDGES.size != SCORE_BINS + 1 or not bool(np.all(np.diff(SCORE_EDGES) > 0)):
    raise RuntimeError("the score bin edges must be SCORE_BINS + 1 increasing values")


def score_bins(scores: np.ndarray) -> np.ndarray:
    """The bin index (int64, ``0..SCORE_BINS-1``) of each score; a score of 1 is in the last bin."""
    index = np.searchsorted(SCORE_EDGES, np.asarray(scores, dtype=np.float64), side="right") - 1
    return np.clip(index, 0, SCORE_BINS - 1).astype(np.int64)


def edge_index(threshold: float) -> int:
    """The index of the bin edge nearest ``threshold`` (operating thresholds are bin edges)."""
    return int(np.argmin(np.abs(SCORE_EDGES - float(threshold))))


def bin_centres() -> np.ndarray:
    """The middle of each bin (what a calibration plot takes as a bin's score)."""
    centres: np.ndarray = (SCORE_EDGES[:-1] + SCORE_EDGES[1:]) / 2
    return centres
