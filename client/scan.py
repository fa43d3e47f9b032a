"""Checking every file of a site folder before it is trusted: accept, quarantine, or duplicate.

Each file is read once (size-capped before reading), hashed, parsed from memory (never
forced), checked (object type, required tags, burned-in annotation, transfer syntax, pixel
data length) and decoded, in worker processes that are killed when a file hangs
(``decode-timeout``) and replaced when one dies (``worker-crashed``). One bad file never stops
a scan. The result is deterministic: sorted by path relative to the site folder.

Policy on hostile files: a symbolic link is refused (``symbolic-link``), wherever it points,
and so is a file reached through a linked folder: the scan reads only what is stored in the
site folder. A deflated file may inflate to no more than the size cap (``inflated-too-large``),
decoded pixels may take at most ``client.dicom.decoded_cap`` of it (``too-large``), and each
worker's address space may grow by at most :func:`default_worker_memory` (``out-of-memory``).

Policy on objects: only image storage SOP classes (and private classes whose Modality is not
a known non-image one) are accepted. Segmentations (SEG) are refused like other derived
non-images: they are label maps, not images to learn from.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numpy as np

from client.dicom import (
    REASON_HELP,
    CheckedDicom,
    DicomRejected,
    decode_pixels,
    decoded_cap,
    header_attributes,
    modality_values,
    read_checked,
)
from client.labels import LABELS_FILE
from client.scan_worker import LostKind, memory_limit, quiet_worker, run_in_workers
from fedrad.core.errors import ConfigError, DataError

__all__ = [
    "QUARANTINE_REASONS",
    "REASON_HELP",
    "AcceptedFile",
    "QuarantinedFile",
    "ScanReport",
    "accept_dicom",
    "check_file",
    "check_worker_memory",
    "default_worker_memory",
    "list_site_files",
    "quarantine_lost",
    "quarantined",
    "scan_folder",
]

log = logging.getLogger(__name__)

QUARANTINE_REASONS: tuple[str, ...] = tuple(REASON_HELP)
"""The stable reason codes of a quarantined file; :data:`REASON_HELP` explains each."""
_LOST_REASONS: dict[LostKind, str] = {"timeout": "decode-timeout", "crash": "worker-crashed"}
DEFAULT_MAX_BYTES = 256 * 2**20
WORKER_MEMORY_BASE = 2**30


def default_worker_memory(max_bytes: int) -> int:
    """The memory a worker may add to what it starts with, under a size cap of ``max_bytes``.

    1 GiB, plus 4 times the size cap (the file, the parsed copy, an inflated one), plus 16
    times the decoded cap (the pixels, then float64 and float32 modality values of 8-bit
    pixels, and preprocessing); about 18 GiB under the default cap of 256 MiB, 1.3 GiB
    under 1 MiB.
    """
    return WORKER_MEMORY_BASE + 4 * max_bytes + 16 * decoded_cap(max_bytes)


@dataclass(frozen=True)
class AcceptedFile:
    """A file that decodes as declared; ``path`` is POSIX, relative to the site folder."""

    path: str
    sha256: str
    size: int
    mtime_ns: int
    modality: str
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    rows: int
    columns: int
    frames: int
    samples_per_pixel: int
    transfer_syntax: str
    position_z: float | None
    instance_number: int | None
    sex: str
    age_years: int | None
    manufacturer: str


@dataclass(frozen=True)
class QuarantinedFile:
    """A file that is not used: ``reason`` is a code of :data:`QUARANTINE_REASONS`."""

    path: str
    reason: str
    detail: str


CheckResult = AcceptedFile | QuarantinedFile


def _kebab(record: dict[str, Any]) -> dict[str, Any]:
    return {key.replace("_", "-"): value for key, value in record.items()}


@dataclass
class ScanReport:
    """Every file of a site folder, accepted, quarantined, or a duplicate of an accepted one."""

    site_dir: Path
    accepted: list[AcceptedFile]
    quarantined: list[QuarantinedFile]
    duplicates: list[tuple[str, str]]
    """(path, path of the accepted file it duplicates): same SOPInstanceUID or same bytes."""

    def to_dict(self) -> dict[str, Any]:
        """Return the report as JSON-ready data (kebab-case keys)."""
        return {
            "site-dir": str(self.site_dir),
            "counts": {
                "files": len(self.accepted) + len(self.quarantined) + len(self.duplicates),
                "accepted": len(self.accepted),
                "quarantined": len(self.quarantined),
                "duplicates": len(self.duplicates),
            },
            "accepted": [_kebab(asdict(f)) for f in self.accepted],
            "quarantined": [_kebab(asdict(f)) for f in self.quarantined],
            "duplicates": [{"path": p, "duplicate-of": o} for p, o in self.duplicates],
        }


Decode = Literal["none", "pixels", "values"]
"""How far :func:`accept_dicom` decodes: not at all, to pixels, or to modality values."""


def accept_dicom(
    path: Path, label: str, *, max_bytes: int, decode: Decode
) -> tuple[AcceptedFile, np.ndarray | None]:
    """Read, parse, check and decode one DICOM file into its accepted record.

    The one way a DICOM file is accepted, by the site scan (:func:`check_file`) and by the
    ingest pass (``client.ingest``) alike.

    Parameters
    ----------
    path
        The file; read once, refused unread when over ``max_bytes``, never through a link.
    label
        The record's ``path`` (POSIX, as reports show it).
    max_bytes
        Size cap of the file, and of a deflated file's inflated data; decoded pixels may
        take ``client.dicom.decoded_cap(max_bytes)``.
    decode
        ``"none"``: check the pixel data length only; ``"pixels"``: decode and check the
        pixels; ``"values"``: also apply the modality LUT (see ``client.dicom.modality_values``).

    Returns
    -------
    tuple of AcceptedFile and numpy.ndarray or None
        The record, and the decoded pixels or modality values (None for ``"none"``).

    Raises
    ------
    DicomRejected
        When the file fails a check; its ``code`` is one of :data:`QUARANTINE_REASONS`.
    """
    checked = read_checked(path, max_bytes=max_bytes)
    pixels = None
    if decode != "none":
        pixels = decode_pixels(checked.dataset, checked.geometry, path)
        if decode == "values":
            pixels = modality_values(pixels, checked.dataset, path)
    return _accepted(checked, label), pixels


def _accepted(checked: CheckedDicom, label: str) -> AcceptedFile:
    geometry, info = checked.geometry, checked.info
    return AcceptedFile(
        path=label,
        sha256=hashlib.sha256(checked.data).hexdigest(),
        size=info.st_size,
        mtime_ns=info.st_mtime_ns,
        rows=geometry.rows,
        columns=geometry.columns,
        frames=geometry.frames,
        samples_per_pixel=geometry.samples_per_pixel,
        transfer_syntax=str(geometry.transfer_syntax),
        **header_attributes(checked.dataset),  # type: ignore[arg-type]
    )


def check_file(path: Path, *, max_bytes: int, decode: bool = True) -> CheckResult:
    """Check one file and say whether it can be used; never raises.

    The reported path is ``path`` as given (POSIX). ``decode=False`` skips the final decode
    (the pixel data length is still checked).
    """
    label = path.as_posix()
    try:
        return accept_dicom(
            path, label, max_bytes=max_bytes, decode="pixels" if decode else "none"
        )[0]
    except (DicomRejected, MemoryError) as exc:
        return quarantined(label, exc)
    except Exception as exc:  # noqa: BLE001 - a file must never stop a scan
        log.debug("unexpected failure on %s", label, exc_info=True)
        return QuarantinedFile(label, "malformed", f"unexpected {exc.__class__.__name__}: {exc}")


def quarantined(label: str, exc: DicomRejected | MemoryError) -> QuarantinedFile:
    """The verdict on a file refused by a check, or whose check ran out of memory.

    An ``out-of-memory`` detail names the worker's memory limit, when it has one.
    """
    if isinstance(exc, DicomRejected) and exc.code != "out-of-memory":
        return QuarantinedFile(label, exc.code, exc.reason)
    reason = exc.reason if isinstance(exc, DicomRejected) else "ran out of memory while checking"
    limit = memory_limit()
    if limit is not None:
        reason += (
            f" (worker address-space limit {limit / 2**20:.0f} MiB: what the worker mapped at "
            "its start plus its memory budget)"
        )
    return QuarantinedFile(label, "out-of-memory", reason)


def list_site_files(site_dir: Path, skip: Callable[[Path], bool] | None = None) -> list[str]:
    """Return every candidate file under ``site_dir`` as sorted POSIX relative paths.

    Skips ``labels.csv``, hidden files and folders, and what ``skip`` says (it is asked about
    files and folders; a skipped folder is not entered). Links to folders are not followed
    (no loops); they, FIFOs and sub-folders that cannot be listed are returned so that the
    scan reports them (a link of any kind as ``symbolic-link``).
    """
    found: list[str] = []
    pending = [""]
    while pending:
        relative = pending.pop()
        try:
            entries = list(os.scandir(site_dir / relative if relative else site_dir))
        except OSError as exc:
            if not relative:
                raise DataError(f"Cannot list {site_dir}: {exc.strerror}.") from None
            found.append(relative)  # reported as unreadable
            continue
        for entry in entries:
            path = f"{relative}/{entry.name}" if relative else entry.name
            if entry.name.startswith(".") or (skip is not None and skip(site_dir / path)):
                continue
            if entry.is_dir(follow_symlinks=False):
                pending.append(path)
            elif entry.name != LABELS_FILE:
                found.append(path)
    return sorted(found)


def _check_relative(
    check: Callable[..., CheckResult], max_bytes: int, relative: str
) -> CheckResult:
    """Worker task: check a path relative to the working directory (the site folder)."""
    result = check(Path(relative), max_bytes=max_bytes)
    return result if result.path == relative else replace(result, path=relative)


def quarantine_lost(relative: str, kind: LostKind, detail: str) -> QuarantinedFile:
    """The verdict on a file whose worker timed out or died on it (``on_lost`` of a run)."""
    return QuarantinedFile(relative, _LOST_REASONS[kind], detail)


def scan_folder(
    site_dir: Path,
    *,
    workers: int = 1,
    timeout_s: float = 20.0,
    max_bytes: int = DEFAULT_MAX_BYTES,
    skip: Callable[[Path], bool] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    worker_memory_bytes: int | None = None,
    _check: Callable[..., CheckResult] = check_file,
) -> ScanReport:
    """Check every file under ``site_dir`` in ``workers`` processes.

    A file whose check runs past ``timeout_s`` is quarantined as ``decode-timeout``, one whose
    worker dies as ``worker-crashed``; the scan goes on. Files over ``max_bytes`` are refused
    unread. Each worker's memory may grow by ``worker_memory_bytes`` (None:
    :func:`default_worker_memory`); a file that needs more is ``out-of-memory``.
    ``skip(path)`` leaves files or folders out (see :func:`list_site_files`);
    ``on_progress(done, total)`` reports progress; ``_check`` replaces :func:`check_file`
    in tests.

    Raises
    ------
    DataError
        When ``site_dir`` is not a folder.
    ConfigError
        When ``workers``, ``timeout_s``, ``max_bytes`` or ``worker_memory_bytes`` is not
        positive.
    """
    if workers < 1 or not timeout_s > 0 or max_bytes < 1:
        raise ConfigError(
            f"workers ({workers}), timeout ({timeout_s} s) and size cap ({max_bytes} bytes) "
            "must be positive; e.g. --workers 2 --timeout 20 --max-mb 256."
        )
    memory = check_worker_memory(worker_memory_bytes, max_bytes)
    if not site_dir.is_dir():
        raise DataError(
            f"Site data folder {site_dir} does not exist or is not a folder; point to the "
            "folder holding the site's DICOM files and labels.csv."
        )
    paths = list_site_files(site_dir, skip)
    results = run_in_workers(
        partial(_check_relative, _check, max_bytes),
        paths,
        cwd=site_dir.resolve(),
        workers=workers,
        timeout_s=timeout_s,
        on_lost=quarantine_lost,
        initializer=quiet_worker,
        on_progress=on_progress,
        memory_limit_bytes=memory,
    )
    report = _report(site_dir, results)
    log.info(
        "%s: %d file(s) accepted, %d quarantined, %d duplicate(s)",
        site_dir,
        len(report.accepted),
        len(report.quarantined),
        len(report.duplicates),
    )
    return report


def check_worker_memory(worker_memory_bytes: int | None, max_bytes: int) -> int:
    """Return a worker's memory budget: as given (checked), or the default for ``max_bytes``.

    Raises
    ------
    ConfigError
        When ``worker_memory_bytes`` is not positive.
    """
    if worker_memory_bytes is None:
        return default_worker_memory(max_bytes)
    if worker_memory_bytes < 1:
        raise ConfigError(
            f"A worker's memory limit must be positive, not {worker_memory_bytes} bytes; leave "
            f"it unset for the default ({default_worker_memory(max_bytes) // 2**20} MiB)."
        )
    return worker_memory_bytes


def _report(site_dir: Path, results: list[CheckResult]) -> ScanReport:
    """Split results into accepted, quarantined and duplicates (first path in order wins)."""
    report = ScanReport(site_dir=site_dir, accepted=[], quarantined=[], duplicates=[])
    by_digest: dict[str, str] = {}
    by_instance: dict[str, str] = {}
    for result in sorted(results, key=lambda r: r.path):
        if isinstance(result, QuarantinedFile):
            report.quarantined.append(result)
            continue
        original = by_digest.get(result.sha256) or by_instance.get(result.sop_instance_uid)
        if original is not None:
            report.duplicates.append((result.path, original))
            continue
        by_digest[result.sha256] = by_instance[result.sop_instance_uid] = result.path
        report.accepted.append(result)
    return report
