"""The subgroup vocabulary and the fixed layout of the fairness statistics a site sends.

Patient attributes are coarsened at the site onto a closed vocabulary (sex, decade age band, a
normalised scanner vendor, modality), so a free-text header can never become something that
leaves the site. From the run config (``fairness-attributes``, ``fairness-intersections``)
every site and the coordinator build the same :class:`FairnessLayout`: one cell per value of
each reported attribute (and per pair of values of each intersection), each cell a fixed
block of integers. Every site's vector then has the same length and meaning, so the
coordinator may add them up element by element, in the clear or inside SecAgg+ (as counts).

The vector is ``[noise variance] + cells``. Each cell is::

    n | suppressed | confusion (C x C, only when C > 2) | histograms (K x 2 x SCORE_BINS)

``n`` is the number of evaluation samples in the cell, ``suppressed`` is 1 where the site
zeroed the cell (below its ``min-cell-count``, or to protect such a cell, see
``client.fairness``), so that summed over sites it counts the sites that left the cell out.
``confusion[t][p]`` counts the arg-max predictions (multi-class only). The histograms count,
for each class of interest ``k`` (the positive label of a binary task; every class of a
multi-class one, one-vs-rest), the samples with true class ``!= k`` (row 0) and ``== k``
(row 1) by the bin of their class-``k`` score: enough for any threshold on a bin edge, ROC
curves, AUC and calibration. The first slot carries the variance of the DP noise each
count of this vector holds, in units of ``1 / VARIANCE_SCALE`` (0 without DP); summed over
sites it is the variance of each summed count.
"""

from __future__ import annotations

import difflib
import itertools
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from fedrad.core.errors import ConfigError
from fedrad.core.keys import SCORE_BINS

__all__ = [
    "AGE_BANDS",
    "MODALITIES",
    "SEXES",
    "VARIANCE_SCALE",
    "VENDORS",
    "VOCABULARY",
    "Cell",
    "FairnessLayout",
    "Family",
    "parse_attributes",
    "parse_intersections",
]

SEXES = ("M", "F", "unknown")
AGE_BANDS = tuple(f"{d}-{d + 9}" for d in range(0, 90, 10)) + ("90+", "unknown")
VENDORS = (
    "agfa",
    "canon",
    "carestream",
    "fujifilm",
    "ge",
    "hologic",
    "konica",
    "philips",
    "samsung",
    "siemens",
    "other",
)
MODALITIES = ("CR", "DX", "MG", "US", "CT", "MR", "PT", "NM", "XA", "OT", "other")
VOCABULARY: dict[str, tuple[str, ...]] = {
    "sex": SEXES,
    "age-band": AGE_BANDS,
    "manufacturer": VENDORS,
    "modality": MODALITIES,
}
"""Every attribute a subgroup may be defined by, and its closed list of values."""

VARIANCE_SCALE = 1000
"""Fixed-point steps per unit of the noise variance in a fairness vector's first slot."""

_HEADER = 1


def parse_attributes(text: str) -> tuple[str, ...]:
    """The attributes of ``fairness-attributes`` (comma-separated), in the given order.

    Raises
    ------
    ConfigError
        On an unknown attribute (with a did-you-mean hint) or one named twice.
    """
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    for name in names:
        if name not in VOCABULARY:
            close = difflib.get_close_matches(name, list(VOCABULARY), n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(
                f"'fairness-attributes' names an unknown attribute '{name}'.{hint} "
                f"Known attributes: {', '.join(VOCABULARY)}."
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"'fairness-attributes' names an attribute twice: {text!r}.")
    return names


def parse_intersections(text: str) -> tuple[tuple[str, str], ...]:
    """The attribute pairs of ``fairness-intersections`` (``'sex*age-band, sex*modality'``).

    Raises
    ------
    ConfigError
        On a malformed pair, an unknown attribute, a pair of one attribute with itself or a
        pair named twice.
    """
    pairs: list[tuple[str, str]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        names = tuple(n.strip() for n in part.split("*"))
        if len(names) != 2 or not all(names):
            raise ConfigError(
                f"'fairness-intersections' entry {part!r} must be two attributes joined by "
                "'*', e.g. 'sex*age-band'."
            )
        parse_attributes(",".join(names))
        if names[0] == names[1]:
            raise ConfigError(
                f"'fairness-intersections' entry {part!r} pairs an attribute with itself."
            )
        pair = (names[0], names[1])
        if pair in pairs or pair[::-1] in pairs:
            raise ConfigError(f"'fairness-intersections' names {part!r} twice.")
        pairs.append(pair)
    return tuple(pairs)


@dataclass(frozen=True)
class Family:
    """One breakdown of the patients: one attribute, or an intersection of two."""

    attributes: tuple[str, ...]

    @property
    def name(self) -> str:
        """``sex``, or ``sex*age-band`` for an intersection."""
        return "*".join(self.attributes)

    @property
    def values(self) -> list[tuple[str, ...]]:
        """Every combination of the attributes' values, in vocabulary order."""
        return list(itertools.product(*(VOCABULARY[a] for a in self.attributes)))

    def label(self, value: tuple[str, ...]) -> str:
        """The cell's name, e.g. ``sex=F`` or ``sex=F&age-band=40-49``."""
        return "&".join(f"{a}={v}" for a, v in zip(self.attributes, value, strict=True))


@dataclass(frozen=True)
class Cell:
    """One subgroup cell of the layout and where its block starts in the vector."""

    family: Family
    value: tuple[str, ...]
    offset: int

    @property
    def label(self) -> str:
        """The cell's name (see :meth:`Family.label`)."""
        return self.family.label(self.value)


@dataclass(frozen=True)
class FairnessLayout:
    """The fixed layout of a fairness vector (see the module docstring)."""

    num_classes: int
    positive_label: int
    families: tuple[Family, ...]

    @classmethod
    def from_config(
        cls, *, num_classes: int, positive_label: int, attributes: str, intersections: str
    ) -> FairnessLayout:
        """The layout of the run config's ``fairness-attributes`` and ``-intersections``."""
        names = parse_attributes(attributes)
        pairs = parse_intersections(intersections)  # may pair attributes not reported alone
        families = tuple(Family((a,)) for a in names) + tuple(Family(p) for p in pairs)
        return cls(num_classes=num_classes, positive_label=positive_label, families=families)

    @property
    def classes(self) -> tuple[int, ...]:
        """The classes of interest: the positive label (binary), else every class."""
        return (self.positive_label,) if self.num_classes == 2 else tuple(range(self.num_classes))

    @property
    def confusion_size(self) -> int:
        """Confusion counts per cell: ``C x C`` for multi-class, none for binary tasks."""
        return self.num_classes**2 if self.num_classes > 2 else 0

    @property
    def cell_size(self) -> int:
        """Integers per cell."""
        return 2 + self.confusion_size + len(self.classes) * 2 * SCORE_BINS

    @cached_property
    def cells(self) -> tuple[Cell, ...]:
        """Every cell, in vector order."""
        out: list[Cell] = []
        offset = _HEADER
        for family in self.families:
            for value in family.values:
                out.append(Cell(family, value, offset))
                offset += self.cell_size
        return tuple(out)

    @property
    def size(self) -> int:
        """Length of the vector."""
        return _HEADER + len(self.cells) * self.cell_size

    @property
    def record_l2_squared(self) -> float:
        """Squared L2 change of the vector when one record is added or removed.

        A record falls in exactly one cell of each family, where it adds 1 to ``n``, 1 to one
        confusion count (multi-class) and 1 to one bin of each class of interest's histograms.
        """
        per_family = 1 + (1 if self.num_classes > 2 else 0) + len(self.classes)
        return float(len(self.families) * per_family)

    def zeros(self) -> np.ndarray:
        """An empty vector of this layout."""
        return np.zeros(self.size, dtype=np.int64)

    def block(self, vector: np.ndarray, cell: Cell) -> np.ndarray:
        """The view of ``vector`` holding ``cell``'s integers."""
        return vector[cell.offset : cell.offset + self.cell_size]

    def count(self, vector: np.ndarray, cell: Cell) -> int:
        """The cell's ``n``."""
        return int(vector[cell.offset])

    def suppressed(self, vector: np.ndarray, cell: Cell) -> int:
        """The cell's suppressed flag (summed over sites: how many sites left it out)."""
        return int(vector[cell.offset + 1])

    def confusion(self, vector: np.ndarray, cell: Cell) -> np.ndarray:
        """The cell's confusion counts ``(C, C)`` (multi-class only)."""
        start = cell.offset + 2
        c = self.num_classes
        return vector[start : start + self.confusion_size].reshape(c, c)

    def histograms(self, vector: np.ndarray, cell: Cell) -> np.ndarray:
        """The cell's histograms ``(K, 2, SCORE_BINS)``: class of interest, is-class, bin."""
        start = cell.offset + 2 + self.confusion_size
        return vector[start : start + len(self.classes) * 2 * SCORE_BINS].reshape(
            len(self.classes), 2, SCORE_BINS
        )

    def noise_variance(self, vector: np.ndarray) -> float:
        """The DP noise variance each count of a (summed) vector holds."""
        return float(vector[0]) / VARIANCE_SCALE

    def check(self, vector: np.ndarray) -> None:
        """Raise ValueError unless ``vector`` is a non-negative integer vector of this layout."""
        if vector.shape != (self.size,):
            raise ValueError(
                f"the fairness vector holds {vector.size} values, the run config's layout "
                f"{self.size}: the site and the coordinator disagree on fairness-attributes."
            )
        if vector.size and int(vector.min()) < 0:
            raise ValueError("the fairness vector holds a negative count.")
