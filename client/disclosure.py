"""What may be said about a site's patients: coarsened attributes, counted, small cells suppressed.

Patient attributes leave a site only as counts per subgroup, over a closed vocabulary (sex,
decade age band, a normalised scanner vendor, modality), and only for cells of at least the
site's ``min-cell-count`` patients. The vocabulary is closed so that a free-text header (a
manufacturer field holding a name, say) can never become a key that leaves the site.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping

SUBGROUP_ATTRIBUTES = ("sex", "age-band", "manufacturer", "modality")
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
    """Counts per subgroup cell, with every cell below ``min_cell_count`` left out."""
    counts: Counter[str] = Counter()
    for sample in attributes:
        for attribute, value in coarsen(sample).items():
            counts[cell_key(attribute, value)] += 1
    return {key: n for key, n in sorted(counts.items()) if n >= min_cell_count}


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
