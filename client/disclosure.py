"""What may be said about a site's patients: coarsened attributes, counted, small cells suppressed.

Patient attributes leave a site only as counts per subgroup, over a closed vocabulary (sex,
decade age band, a normalised scanner vendor, modality), and only for cells of at least the
site's ``min-cell-count`` patients. The vocabulary is closed so that a free-text header (a
manufacturer field holding a name, say) can never become a key that leaves the site.

Suppression is complementary: every attribute's cells add up to the number of samples, which
any fully published attribute (or the example count) gives away, so a lone suppressed cell
could be recovered by subtraction (12 M and 12 F of 25 leave 1). Within each attribute the
cells left out therefore always add up to 0 or to at least ``min-cell-count``, and hold at
least two non-empty cells whenever one of them is small; the smallest published cells are
suppressed as well until that holds.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

from fedrad.core.fairness import AGE_BANDS, MODALITIES, SEXES, VENDORS, VOCABULARY

_VENDOR_ALIASES = {"toshiba": "canon", "fuji": "fujifilm", "general electric": "ge", "gems": "ge"}


def vendor(manufacturer: str) -> str:
    """Map a free-text Manufacturer header onto the closed vendor vocabulary."""
    text = manufacturer.strip().lower()
    for alias, name in _VENDOR_ALIASES.items():
        if alias in text:
            return name
    for name in VENDORS[:-1]:
        if text == name or text.startswith(name + " ") or text.startswith(name + ","):
            return name
    return "other"


def coarsen(attributes: Mapping[str, str]) -> dict[str, str]:
    """A sample's attributes on the closed vocabulary (anything else becomes other/unknown)."""
    sex = attributes.get("sex", "unknown")
    band = attributes.get("age-band", "unknown")
    modality = attributes.get("modality", "other").upper()
    return {
        "sex": sex if sex in SEXES else "unknown",
        "age-band": band if band in AGE_BANDS else "unknown",
        "manufacturer": vendor(attributes.get("manufacturer", "")),
        "modality": modality if modality in MODALITIES else "other",
    }


def cell_key(attribute: str, value: str) -> str:
    """The record key of one subgroup cell, e.g. ``sex=F``."""
    return f"{attribute}={value}"


def subgroup_counts(
    attributes: Iterable[Mapping[str, str]], *, min_cell_count: int
) -> dict[str, int]:
    """Counts per subgroup cell, small cells and their complements left out.

    A cell below ``min_cell_count`` is left out (primary suppression), and so are the smallest
    other cells of the same attribute until what is left out adds up to at least
    ``min_cell_count`` over at least two non-empty cells (complementary suppression): no
    suppressed count can be derived from the published ones and the total.
    """
    per_attribute: dict[str, Counter[str]] = {attribute: Counter() for attribute in VOCABULARY}
    for sample in attributes:
        for attribute, value in coarsen(sample).items():
            per_attribute[attribute][value] += 1
    published: dict[str, int] = {}
    for attribute, counts in per_attribute.items():
        kept = _complementary_suppression(counts, min_cell_count=min_cell_count)
        published.update({cell_key(attribute, value): counts[value] for value in kept})
    return dict(sorted(published.items()))


def _complementary_suppression(counts: Counter[str], *, min_cell_count: int) -> list[str]:
    """The values of one attribute whose counts may be published."""
    kept = sorted((v for v, n in counts.items() if n >= min_cell_count), key=lambda v: counts[v])
    suppressed = [n for n in counts.values() if 0 < n < min_cell_count]
    if not suppressed:
        return kept
    # smallest published cells first: the least information given up to protect the others
    while kept and (len(suppressed) < 2 or sum(suppressed) < min_cell_count):
        suppressed.append(counts[kept.pop(0)])
    return kept


def is_allowed_cell(key: str, count: object, *, min_cell_count: int) -> bool:
    """Whether a subgroup cell may leave the site: known attribute and value, count large enough."""
    attribute, sep, value = key.partition("=")
    return (
        bool(sep)
        and value in VOCABULARY.get(attribute, ())
        and isinstance(count, int)
        and not isinstance(count, bool)
        and count >= min_cell_count
    )
