"""Where the consortium goes, and the checks that keep it from clobbering anything else."""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from fedrad.synth.dicom import SYNTH_MARKER
from fedrad.synth.identity import IDENTITY_FOLDER

logger = logging.getLogger(__name__)

HOLDOUT_FOLDER = "holdout"
LABELS_FILE = "labels.csv"
LABELS_HEADER = ("id", "label", "split")
_FOLDER_NAME = re.compile(r"site-[1-9][0-9]*|holdout")


def is_synth_folder(folder: Path) -> bool:
    """Return True if ``folder`` is a real directory holding no files or our DICOM files.

    One file is enough to tell: every file this package writes carries
    :data:`SYNTH_MARKER` as DeidentificationMethod, real data does not.
    """
    if folder.is_symlink() or not folder.is_dir():
        return False
    files = (p for p in folder.rglob("*") if p.is_file())
    if next(files, None) is None:
        return True  # empty, or only empty folders left by an interrupted run
    sample = next(iter(folder.rglob("*.dcm")), None)
    if sample is None:
        return False
    try:
        ds = dcmread(sample, stop_before_pixels=True, specific_tags=["DeidentificationMethod"])
    except (InvalidDicomError, OSError):
        return False
    return bool(ds.get("DeidentificationMethod") == SYNTH_MARKER)


def prepare_out_dir(out_dir: Path, names: Sequence[str], *, overwrite: bool) -> None:
    """Create ``out_dir`` or check it holds only earlier synth output; clear ``names``.

    Raises
    ------
    ValueError
        If ``out_dir`` is a file, holds anything but synthetic site folders, or
        already holds one of ``names`` while ``overwrite`` is False.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"OUT_DIR {out_dir} is a file: choose a directory path")
    entries = sorted(out_dir.iterdir()) if out_dir.is_dir() else []
    foreign = [
        e.name
        for e in entries
        if not (_FOLDER_NAME.fullmatch(e.name) and is_synth_folder(e))
        and not (e.name == IDENTITY_FOLDER and e.is_dir() and not e.is_symlink())
    ]
    if foreign:
        raise ValueError(
            f"OUT_DIR {out_dir} is not empty and does not look like fedrad synth output "
            f"(it holds {', '.join(foreign[:5])}): choose a new or empty directory"
        )
    existing = [e.name for e in entries if e.name in names]
    if existing and not overwrite:
        raise ValueError(
            f"OUT_DIR {out_dir} already holds {', '.join(existing)}: pass overwrite=True "
            "(--overwrite) to replace them, or choose another directory"
        )
    for name in existing:
        logger.info("Removing %s before rewriting it", out_dir / name)
        shutil.rmtree(out_dir / name)
    stale = [e.name for e in entries if e.name not in names and e.name != IDENTITY_FOLDER]
    if stale:
        logger.warning(
            "Leaving %s in %s as they were: this run does not write them", ", ".join(stale), out_dir
        )
    out_dir.mkdir(parents=True, exist_ok=True)


def write_labels(folder: Path, rows: Sequence[tuple[str, int, str]]) -> None:
    """Write ``labels.csv`` (``id,label,split``) with POSIX line endings."""
    lines = [",".join(LABELS_HEADER)] + [f"{id_},{label},{split}" for id_, label, split in rows]
    (folder / LABELS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8", newline="\n")
