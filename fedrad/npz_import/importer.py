"""``import_npz``: one MedMNIST-format archive in, site folders and holdout folders out."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from fedrad.core.errors import ConfigError, DataError
from fedrad.core.sites import HOLDOUT
from fedrad.npz_import.archive import Archive, Split, load_archive
from fedrad.npz_import.dicom import IMPORT_MARKER, MODALITIES, FolderPlan, write_folder
from fedrad.npz_import.partition import assign_val, partition

logger = logging.getLogger(__name__)

MANIFEST_FILE = "import-npz.json"
"""Written last into OUT_DIR: the import's summary, for provenance."""
_OWN_NAME = re.compile(rf"site-[1-9][0-9]*|{HOLDOUT}")


@dataclass(frozen=True)
class FolderSummary:
    """What one written folder holds."""

    name: str
    folder: Path
    source_split: str
    n_files: int
    class_counts: tuple[int, ...]
    split_counts: tuple[tuple[str, int], ...]

    @property
    def n_samples(self) -> int:
        """Number of labelled samples (images or series)."""
        return sum(self.class_counts)

    def to_dict(self) -> dict[str, object]:
        """Plain, JSON-ready form (kebab-case keys; ``folder`` relative to OUT_DIR)."""
        return {
            "name": self.name,
            "folder": self.name,
            "source-split": self.source_split,
            "samples": self.n_samples,
            "files": self.n_files,
            "class-counts": list(self.class_counts),
            "splits": dict(self.split_counts),
        }


@dataclass(frozen=True)
class ImportSummary:
    """What ``import_npz`` wrote: per-site counts, and the holdout folders."""

    source: Path
    out_dir: Path
    kind: str
    split: str
    alpha: float
    seed: int
    modality: str
    num_classes: int
    sites: tuple[FolderSummary, ...]
    holdouts: tuple[FolderSummary, ...]

    @property
    def n_files(self) -> int:
        """DICOM files written over all folders."""
        return sum(f.n_files for f in (*self.sites, *self.holdouts))

    def to_dict(self) -> dict[str, object]:
        """Plain, JSON-ready form (kebab-case keys)."""
        return {
            "source": self.source.name,
            "out-dir": str(self.out_dir),
            "kind": self.kind,
            "split": self.split,
            "alpha": self.alpha,
            "seed": self.seed,
            "modality": self.modality,
            "num-classes": self.num_classes,
            "sites": [s.to_dict() for s in self.sites],
            "holdouts": [h.to_dict() for h in self.holdouts],
        }


def import_npz(
    path: Path,
    out_dir: Path,
    *,
    sites: int,
    split: str,
    alpha: float,
    seed: int,
    val_fraction: float = 0.2,
    kind: str | None = None,
    modality: str = "OT",
    overwrite: bool = False,
) -> ImportSummary:
    """Write ``out_dir/site-1..N`` (and ``out_dir/holdout/<split>``) from a MedMNIST archive.

    The rules (split routing, kind detection, partition schemes, modality) are those of the
    package docstring. The same archive, options and seed give the same files.

    Raises
    ------
    ConfigError
        For an option out of range, or an ``out_dir`` that is not empty (without
        ``overwrite``) or holds anything import-npz did not write.
    DataError
        For an archive that cannot be read or used, or too small for ``sites``.
    """
    modality = modality.upper()
    _check_modality(modality)
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val-fraction must be between 0 and 1 (exclusive), got {val_fraction}.")
    entries = _check_out_dir(out_dir, overwrite=overwrite)
    archive = load_archive(path, kind=kind)
    to_sites, holdouts = archive.splits[0], archive.splits[1:]
    if not len(to_sites):
        raise DataError(f"{path}: split '{to_sites.name}' is empty; nothing to give the sites.")
    parts = partition(
        to_sites.labels,
        sites=sites,
        scheme=split,
        alpha=alpha,
        rng=np.random.default_rng([seed, 1]),
    )
    for entry in entries:
        logger.info("Removing %s (earlier import-npz output)", entry)
        if entry.is_dir():
            shutil.rmtree(entry)
        else:
            entry.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    options = (sites, split, alpha, seed, val_fraction, archive.kind, modality)
    digest = hashlib.sha256(f"{archive.digest}{options!r}".encode()).hexdigest()[:32]
    site_plans = [
        FolderPlan(
            f"site-{i}",
            f"NPZ-site{i}",
            f"{path.name} {to_sites.name}",
            part,
            assign_val(
                to_sites.labels[part],
                val_fraction=val_fraction,
                rng=np.random.default_rng([seed, 2, i]),
            ),
        )
        for i, part in enumerate(parts, start=1)
    ]
    site_summaries = tuple(
        _write(out_dir, p, to_sites, archive, modality, digest) for p in site_plans
    )
    holdout_summaries = tuple(
        _write(
            out_dir,
            FolderPlan(
                f"{HOLDOUT}/{s.name}",
                f"NPZ-{HOLDOUT}-{s.name}",
                f"{path.name} {s.name}",
                np.arange(len(s)),
                ("test",) * len(s),
            ),
            s,
            archive,
            modality,
            digest,
        )
        for s in holdouts
        if len(s)
    )
    summary = ImportSummary(
        path,
        out_dir,
        archive.kind.label,
        split,
        alpha,
        seed,
        modality,
        archive.num_classes,
        site_summaries,
        holdout_summaries,
    )
    (out_dir / MANIFEST_FILE).write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    return summary


def _check_modality(modality: str) -> None:
    if modality == "CT":
        raise ConfigError(
            "--modality CT is refused: MedMNIST pixels are 8-bit intensities (0..255), not "
            "Hounsfield units, and a CT Modality makes every site apply its HU window "
            "(-1000..400) to them, flattening the images. Import CT-derived archives (e.g. "
            "OrganMNIST3D) with the default --modality OT."
        )
    if modality not in MODALITIES:
        raise ConfigError(f"modality must be one of {', '.join(MODALITIES)}, got '{modality}'.")


def _write(
    out_dir: Path,
    plan: FolderPlan,
    split: Split,
    archive: Archive,
    modality: str,
    digest: str,
) -> FolderSummary:
    folder = out_dir / plan.name
    labels = split.labels[plan.indices]
    n_files = write_folder(
        folder,
        plan,
        split.images,
        split.labels,
        archive.kind,
        modality=modality,
        digest=digest,
        description=f"{archive.path.stem} {split.name}",
    )
    names, counts = np.unique(np.asarray(plan.splits), return_counts=True)
    logger.info(
        "Wrote %s: %d samples from split '%s', %d DICOM files",
        folder,
        plan.indices.size,
        split.name,
        n_files,
    )
    return FolderSummary(
        plan.name,
        folder,
        split.name,
        n_files,
        tuple(int(c) for c in np.bincount(labels, minlength=archive.num_classes)),
        tuple((str(n), int(c)) for n, c in zip(names, counts, strict=True)),
    )


def _check_out_dir(out_dir: Path, *, overwrite: bool) -> list[Path]:
    """Check ``out_dir`` can be written; return earlier import-npz entries to remove."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"OUT_DIR {out_dir} is a file: choose a directory path.")
    entries = sorted(out_dir.iterdir()) if out_dir.is_dir() else []
    if entries and not overwrite:
        raise ConfigError(
            f"OUT_DIR {out_dir} is not empty (it holds {_names(entries)}): choose a new or "
            "empty directory, or pass --overwrite to replace an earlier import-npz output."
        )
    foreign = [e for e in entries if not _is_own(e)]
    if foreign:
        raise ConfigError(
            f"OUT_DIR {out_dir} holds {_names(foreign)}, which import-npz did not write; "
            "--overwrite replaces only earlier import-npz output: choose another directory."
        )
    return entries


def _names(entries: list[Path]) -> str:
    shown = ", ".join(e.name for e in entries[:5])
    return shown + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")


def _is_own(entry: Path) -> bool:
    """Tell whether ``entry`` is the manifest, or a site/holdout folder that we wrote."""
    if entry.is_symlink():
        return False
    if entry.name == MANIFEST_FILE:
        return entry.is_file()
    if not (entry.is_dir() and _OWN_NAME.fullmatch(entry.name)):
        return False
    if next((p for p in entry.rglob("*") if p.is_file()), None) is None:
        return True
    sample = next(iter(entry.rglob("*.dcm")), None)
    if sample is None:
        return False
    try:
        ds = dcmread(sample, stop_before_pixels=True, specific_tags=["DeidentificationMethod"])
    except (InvalidDicomError, OSError):
        return False
    return bool(ds.get("DeidentificationMethod") == IMPORT_MARKER)
