"""A site's index of every privacy ledger it has written, over all studies and both DP levels.

A coordinator can name a new ``study-id`` at will, and each study has its own ledger; the
index is what lets a site add up its spend over all of them and notice when one goes missing.
It lives beside the ledgers (``<root>/_site-index/<site-id>.json``; no study id starts with
``_``), is one JSON file replaced atomically, and holds one entry per ledger: its level, study,
round count, cumulative epsilon, delta and the sha256 of the ledger file as last written.

This module only reads, checks and writes the index and lists the ledger files on disk;
:mod:`privacy.ledger` opens the ledgers and decides what a mismatch means.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrad.core.durable import write_atomic
from privacy.accounting import LedgerError

__all__ = [
    "INDEX_DIR",
    "LEVEL_DIRS",
    "SITE_INDEX_SCHEMA",
    "IndexEntry",
    "index_path",
    "ledger_files",
    "ledger_path",
    "read_index",
    "write_index",
]

SITE_INDEX_SCHEMA = "fedrad-site-index"
"""Schema of a site index file."""
SITE_INDEX_VERSION = 1
INDEX_DIR = "_site-index"
LEVEL_DIRS: dict[str, str] = {"sample": "", "client": "_client-level"}
"""Sub-folder of the ledger root per DP level (sample-level ledgers sit at the top)."""
_TOP_KEYS = {"schema", "version", "site_id", "studies"}
_ENTRY_KEYS = {"level", "study_id", "rounds", "epsilon", "delta", "sha256"}

Key = tuple[str, str]
"""``(level, study_id)``: one ledger of a site."""


@dataclass(frozen=True)
class IndexEntry:
    """What the index remembers of one ledger: enough to tell a missing or rolled-back one."""

    level: str
    study_id: str
    rounds: int
    epsilon: float
    delta: float | None
    sha256: str

    @property
    def key(self) -> Key:
        """``(level, study_id)``."""
        return (self.level, self.study_id)


def ledger_path(root: Path, *, level: str, study_id: str, site_id: str) -> Path:
    """Where the ledger of ``study_id`` at ``site_id`` for DP ``level`` lives under ``root``."""
    folder = Path(root) / LEVEL_DIRS[level] if LEVEL_DIRS[level] else Path(root)
    return folder / study_id / f"{site_id}.json"


def index_path(root: Path, *, site_id: str) -> Path:
    """The site index file of ``site_id`` under the ledger root ``root``."""
    return Path(root) / INDEX_DIR / f"{site_id}.json"


def ledger_files(root: Path, *, site_id: str) -> dict[Key, Path]:
    """Every ledger file of ``site_id`` on disk under ``root``, by ``(level, study_id)``."""
    found: dict[Key, Path] = {}
    for level, sub in LEVEL_DIRS.items():
        folder = Path(root) / sub if sub else Path(root)
        if not folder.is_dir():
            continue
        for study in sorted(folder.iterdir()):
            if study.name.startswith("_") or not study.is_dir():
                continue  # '_client-level', '_site-index': never a study
            path = study / f"{site_id}.json"
            if path.exists() or path.is_symlink():
                found[(level, study.name)] = path
    return found


def read_index(root: Path, *, site_id: str) -> dict[Key, IndexEntry]:
    """The site index of ``site_id`` (empty when there is none yet).

    Raises
    ------
    LedgerError
        If the index file exists but cannot be read or does not match its schema.
    """
    path = index_path(root, site_id=site_id)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as err:
        raise LedgerError(f"Cannot read the site's privacy index {path}: {err}.") from err
    try:
        record = json.loads(data.decode("utf-8"))
        entries = _decode(record, site_id=site_id)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError, ValueError, TypeError) as err:
        raise LedgerError(
            f"The site's privacy index {path} is damaged ({err}). Training stops at this site: "
            "restore the index from a backup; do not delete it."
        ) from err
    return {e.key: e for e in entries}


def write_index(root: Path, *, site_id: str, entries: dict[Key, IndexEntry]) -> None:
    """Replace the site index atomically (temporary file, fsync, ``os.replace``).

    The caller holds the index lock (see :func:`privacy.ledger.site_spend`).

    Raises
    ------
    LedgerError
        If the index cannot be written.
    """
    path = index_path(root, site_id=site_id)
    record = {
        "schema": SITE_INDEX_SCHEMA,
        "version": SITE_INDEX_VERSION,
        "site_id": site_id,
        "studies": [
            {
                "level": e.level,
                "study_id": e.study_id,
                "rounds": e.rounds,
                "epsilon": e.epsilon,
                "delta": e.delta,
                "sha256": e.sha256,
            }
            for _, e in sorted(entries.items())
        ],
    }
    data = (json.dumps(record, indent=1, allow_nan=False) + "\n").encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data)
    except OSError as err:
        raise LedgerError(
            f"Could not write the site's privacy index {path}: {err}. The round is recorded in "
            "its study's ledger, but its result must not leave the site. Fix the disk and retry."
        ) from err


def _decode(record: Any, *, site_id: str) -> list[IndexEntry]:
    if not isinstance(record, dict) or set(record) != _TOP_KEYS:
        raise ValueError(f"expected a JSON object with keys {sorted(_TOP_KEYS)}")
    if record["schema"] != SITE_INDEX_SCHEMA or record["version"] != SITE_INDEX_VERSION:
        raise ValueError(f"schema {record['schema']!r} version {record['version']!r} is unknown")
    if record["site_id"] != site_id:
        raise ValueError(f"it belongs to site {record['site_id']!r}, not {site_id!r}")
    if not isinstance(record["studies"], list):
        raise ValueError("'studies' must be a list")
    entries = [_decode_entry(i, raw) for i, raw in enumerate(record["studies"])]
    if len({e.key for e in entries}) != len(entries):
        raise ValueError("a ledger is listed twice")
    return entries


def _decode_entry(index: int, raw: Any) -> IndexEntry:
    if not isinstance(raw, dict) or set(raw) != _ENTRY_KEYS:
        raise ValueError(f"entry {index} must have keys {sorted(_ENTRY_KEYS)}")
    level, study, rounds, epsilon = raw["level"], raw["study_id"], raw["rounds"], raw["epsilon"]
    delta, sha = raw["delta"], raw["sha256"]
    if level not in LEVEL_DIRS or not isinstance(study, str) or study.startswith("_"):
        raise ValueError(f"entry {index} names an unknown level or study: {level!r}, {study!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"entry {index} has an invalid round count {rounds!r}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, int | float):
        raise ValueError(f"entry {index} has a non-numeric epsilon {epsilon!r}")
    if not (math.isfinite(epsilon) and epsilon >= 0):
        raise ValueError(f"entry {index} has an invalid epsilon {epsilon!r}")
    if delta is not None and (isinstance(delta, bool) or not isinstance(delta, float)):
        raise ValueError(f"entry {index} has an invalid delta {delta!r}")
    if not (isinstance(sha, str) and len(sha) == 64):
        raise ValueError(f"entry {index} has an invalid sha256 {sha!r}")
    return IndexEntry(level, study, rounds, float(epsilon), delta, sha)
