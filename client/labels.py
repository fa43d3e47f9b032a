"""Reading a site's ``labels.csv``.

Format (documented in README): a header ``id,label`` with an optional ``split`` column.
``id`` is a path relative to the site folder, a SeriesInstanceUID or a StudyInstanceUID;
``label`` is a non-negative integer class; ``split`` is ``train``, ``val`` or ``test``.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

from fedrad.core.errors import DataError

LABELS_FILE = "labels.csv"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class LabelRow:
    """One row of labels.csv."""

    id: str
    label: int
    split: str | None
    line: int


def read_labels(site_dir: Path) -> list[LabelRow]:
    """Read and validate ``site_dir/labels.csv``.

    Raises
    ------
    DataError
        When the file is missing, lacks the required columns, or holds a malformed row.
    """
    path = site_dir / LABELS_FILE
    if not path.is_file():
        raise DataError(
            f"{path} not found: every site folder needs a labels.csv with columns "
            "'id,label' (optional 'split'); see the README section 'Site data and labels.csv'."
        )
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, [])
        columns = [c.strip() for c in header]
        missing = {"id", "label"} - set(columns)
        if missing:
            raise DataError(
                f"{path} lacks column(s) {', '.join(sorted(missing))}; the header must be "
                f"'id,label' or 'id,label,split', found '{','.join(columns)}'."
            )
        names: tuple[str, ...] = ("id", "label", "split")
        at = {name: columns.index(name) for name in names if name in columns}
        records = (r for r in reader if r)  # blank lines are skipped, like csv.DictReader does
        rows = [_parse_row(path, n, record, at) for n, record in enumerate(records, start=2)]
    seen: dict[str, int] = {}
    for row in rows:
        if row.id in seen:
            raise DataError(
                f"{path} line {row.line}: id '{row.id}' already labelled on line "
                f"{seen[row.id]}; keep one row per sample."
            )
        seen[row.id] = row.line
    if not rows:
        raise DataError(f"{path} has a header but no rows: label at least one sample.")
    return rows


def _parse_row(path: Path, line: int, record: list[str], at: dict[str, int]) -> LabelRow:
    """One row; ``at`` maps a column name to its position (a short row lacks the rest)."""
    values = [record[i].strip() if i < len(record) else "" for i in at.values()]
    sample_id, raw_label = values[0], values[1]
    raw_split = values[2].lower() if len(values) > 2 and values[2] else None
    if not sample_id:
        raise DataError(f"{path} line {line}: empty id; give a file path or a DICOM UID.")
    try:
        label = int(raw_label)
    except ValueError:
        raise DataError(
            f"{path} line {line}: label '{raw_label}' is not an integer class (0, 1, ...)."
        ) from None
    if label < 0:
        raise DataError(f"{path} line {line}: label {label} is negative; classes start at 0.")
    if raw_split is not None and raw_split not in SPLITS:
        raise DataError(
            f"{path} line {line}: split '{raw_split}' must be one of {', '.join(SPLITS)} or empty."
        )
    return LabelRow(id=sample_id, label=label, split=raw_split, line=line)


def assign_split(sample_id: str, *, val_fraction: float = 0.2) -> str:
    """Deterministically assign ``train`` or ``val`` to an id that has no split column."""
    digest = hashlib.sha256(sample_id.encode()).digest()
    return "val" if int.from_bytes(digest[:4], "big") / 2**32 < val_fraction else "train"
