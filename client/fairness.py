"""A site's fairness statistics: the global model's counts per patient subgroup, small cells cut.

:func:`site_vector` turns the model's scores on the site's validation split and the samples'
coarsened attributes (``client.disclosure.coarsen``) into the fixed-layout integer vector of
``fedrad.core.fairness``; :func:`suppress` zeroes every cell that is too small to publish, and
flags it, before anything leaves the site.

Suppression is complementary. Within every set of cells whose sum the coordinator learns
another way (all cells of one attribute sum to the example count; in an intersection
``a*b``, the cells of one value of ``a`` sum to that value's own count, and likewise for
``b``), the cells left out add up to 0 or to at least ``min-cell-count`` over at least two
non-empty cells: the smallest published cells of the set are left out as well until that
holds, or the whole set when nothing else is left. So no suppressed count can be recovered
by subtracting published ones from a total. Under DP the decision is taken on the noised
counts, which makes it post-processing of the DP release (no extra privacy cost).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from client.disclosure import coarsen
from fedrad.core.fairness import Cell, FairnessLayout
from fedrad.core.scores import score_bins

__all__ = ["site_vector", "suppress", "suppressed_labels"]


def site_vector(
    layout: FairnessLayout,
    scores: np.ndarray,
    labels: np.ndarray,
    attributes: Sequence[Mapping[str, str]],
) -> np.ndarray:
    """The fairness vector of one site's predictions (before suppression).

    ``scores`` are softmax scores ``(N, C)``, ``labels`` the true classes ``(N,)`` and
    ``attributes`` each sample's DICOM-derived attributes, in the same order.
    """
    if not (len(scores) == len(labels) == len(attributes)):
        raise ValueError("scores, labels and attributes must describe the same samples.")
    vector = layout.zeros()
    index = {(cell.family.name, cell.value): cell for cell in layout.cells}
    bins = score_bins(np.asarray(scores))
    predicted = np.asarray(scores).argmax(axis=1)
    for i, raw in enumerate(attributes):
        coarse = coarsen(raw)
        label = int(labels[i])
        for family in layout.families:
            cell = index[(family.name, tuple(coarse[a] for a in family.attributes))]
            vector[cell.offset] += 1
            if layout.confusion_size:
                layout.confusion(vector, cell)[label, int(predicted[i])] += 1
            hist = layout.histograms(vector, cell)
            for k_index, k in enumerate(layout.classes):
                hist[k_index, int(label == k), bins[i, k]] += 1
    return vector


def _groups(layout: FairnessLayout) -> list[list[Cell]]:
    """The sets of cells whose sums the coordinator may learn by other means."""
    groups: list[list[Cell]] = []
    for family in layout.families:
        cells = [c for c in layout.cells if c.family == family]
        groups.append(cells)  # every family sums to the example count
        if len(family.attributes) > 1:
            for position in range(len(family.attributes)):
                by_value: dict[str, list[Cell]] = {}
                for cell in cells:
                    by_value.setdefault(cell.value[position], []).append(cell)
                groups.extend(by_value.values())
    return groups


def _protect(counts: dict[Cell, int], left_out: set[Cell], group: Iterable[Cell], k: int) -> bool:
    """Leave out more of ``group`` until its left-out cells are safe; True if any changed."""
    members = list(group)
    changed = False
    while True:
        out = [counts[c] for c in members if c in left_out and counts[c] > 0]
        if not out or (len(out) >= 2 and sum(out) >= k):
            return changed
        published = sorted(
            (c for c in members if c not in left_out and counts[c] > 0), key=lambda c: counts[c]
        )
        if not published:
            return changed  # the whole set is out: its sum is the total, which is >= k or out
        left_out.add(published[0])
        changed = True


def suppress(vector: np.ndarray, layout: FairnessLayout, *, min_cell_count: int) -> np.ndarray:
    """A copy of ``vector`` with every unsafe cell zeroed and flagged as suppressed."""
    out = np.maximum(np.asarray(vector, dtype=np.int64), 0)
    counts = {cell: layout.count(out, cell) for cell in layout.cells}
    left_out = {cell for cell, n in counts.items() if 0 < n < min_cell_count}
    groups = _groups(layout)
    for _ in range(len(layout.cells) + 1):  # each pass leaves out at least one more cell
        if not any(_protect(counts, left_out, group, min_cell_count) for group in groups):
            break
    for cell in left_out:
        block = layout.block(out, cell)
        block[:] = 0
        block[1] = 1
    return out


def suppressed_labels(vector: np.ndarray, layout: FairnessLayout) -> list[str]:
    """The names of the cells a vector flags as suppressed."""
    return [cell.label for cell in layout.cells if layout.suppressed(vector, cell) > 0]
