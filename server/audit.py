"""The audit trail's format and its verification: ``RUN_DIR/audit.jsonl``.

An append-only, hash-chained JSON-lines log of a run (written by :mod:`server.audit_trail`), one
entry per event, one canonical JSON object a line::

    {"data":{...},"event":"round","hash":"<hex>","key":"SHA256:<hex>","prev":"<hex>",
     "seq":3,"signature":"<base64>","time":"2026-11-25T22:15:00.123+00:00"}

- ``seq`` counts from 1; ``prev`` is the previous entry's ``hash`` (64 zeros for the first);
  ``key`` is the signing key's fingerprint (:func:`privacy.audit_key.fingerprint`).
- ``hash`` is SHA-256 over the canonical JSON (sorted keys, no spaces, ASCII) of the entry
  without ``hash`` and ``signature``; ``signature`` is Ed25519 (``cryptography``) over the 32
  bytes of that hash, in base64.
- Events: ``run-start``, ``round``, ``resume``, ``run-end`` (their data: :mod:`server.audit_trail`).
- ``audit.pub`` beside the log is the public key (PEM); ``summary.json`` records under ``audit``
  the key's fingerprint, the entry count and the head hash when the run ends.

:func:`verify` names the first bad entry for every kind of edit: a changed field, a dropped,
reordered or repeated entry, a cut last line, entries removed from the end (against
summary.json), an entry appended after run-end, an entry or a whole log signed with another
key (against audit.pub, summary.json and a pinned key). What it cannot see on its own: a log
cut back together with summary.json by someone who also replaced audit.pub; an auditor who
pins the public key (``fedrad audit verify --public-key``) and keeps the head hash apart from
the run sees that too.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedrad.core.errors import ConfigError, RunDirError
from privacy.audit_key import AUDIT_PUBLIC_FILE, fingerprint, load_public_key
from server.rundir import SUMMARY_FILE

__all__ = [
    "AUDIT_FILE",
    "EVENTS",
    "FIELDS",
    "GENESIS",
    "AuditError",
    "Problem",
    "Verification",
    "canonical",
    "entry_hash",
    "verify",
]

AUDIT_FILE = "audit.jsonl"
GENESIS = "0" * 64
EVENTS = ("run-start", "round", "resume", "run-end")
FIELDS = frozenset({"seq", "time", "event", "data", "prev", "key", "hash", "signature"})
AFTER_END = ("resume", "run-start")
"""The events that may follow a run-end: the same run resumed, or a new run in the directory."""


class AuditError(RunDirError):
    """The audit trail cannot be written or continued; the run stops rather than go on unlogged."""


def canonical(value: Any) -> bytes:
    """Canonical JSON: sorted keys, no spaces, ASCII, no NaN; the bytes every hash is taken of."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def entry_hash(entry: Mapping[str, Any]) -> str:
    """Hex SHA-256 of the canonical JSON of ``entry`` without its ``hash`` and ``signature``."""
    body = {k: v for k, v in entry.items() if k not in ("hash", "signature")}
    return hashlib.sha256(canonical(body)).hexdigest()


@dataclass(frozen=True)
class Problem:
    """The first bad entry of a trail: its line in audit.jsonl, its seq where known, and what."""

    line: int | None
    seq: int | None
    reason: str

    def __str__(self) -> str:
        if self.line is None:
            return self.reason
        seq = f" (seq {self.seq})" if self.seq is not None else ""
        return f"line {self.line}{seq}: {self.reason}"


@dataclass(frozen=True)
class Verification:
    """What :func:`verify` found: the entries checked good, and the first problem (or None)."""

    path: Path
    entries: tuple[dict[str, Any], ...]
    problem: Problem | None
    key_fingerprint: str | None

    @property
    def ok(self) -> bool:
        """Whether the whole trail checked good."""
        return self.problem is None

    @property
    def count(self) -> int:
        """Entries checked good (all of them when ``ok``)."""
        return len(self.entries)

    @property
    def head(self) -> str:
        """Hash of the last good entry (GENESIS when none)."""
        return str(self.entries[-1]["hash"]) if self.entries else GENESIS

    def describe(self) -> str:
        """One line: OK with the entry count and head, or the first bad entry."""
        if self.problem is None:
            return (
                f"audit trail OK: {self.count} entries, head {self.head[:16]}, signed by "
                f"{self.key_fingerprint} ({self.path})"
            )
        return f"audit trail BAD: {self.problem} ({self.path})"


def verify(run_dir: Path, public_key: Ed25519PublicKey | None = None) -> Verification:
    """Check ``run_dir``'s audit trail end to end; name the first bad entry.

    Every entry must parse, carry exactly the entry fields, hash to its ``hash``, name and be
    signed by the audit key, follow the entry before it (``seq`` and ``prev``) and fit the
    event order (run-start first; after run-end only resume or a new run-start). The key is
    ``public_key`` when given (an auditor's pinned copy), else ``audit.pub``; both, and the
    fingerprint in summary.json, must agree. Where summary.json records the trail's end, the
    log must reach it (entry count and head hash) and end there with run-end, or go on with a
    resume.
    """
    path = run_dir / AUDIT_FILE
    references: list[tuple[str, str]] = []
    summary: dict[str, Any] = {}

    def bad(line: int | None, seq: int | None, reason: str, entries: list[Any]) -> Verification:
        fp = references[0][0] if references else None
        return Verification(path, tuple(entries), Problem(line, seq, reason), fp)

    if not path.is_file():
        return bad(None, None, f"no {AUDIT_FILE}: the run kept no audit trail", [])
    try:
        summary = _read_summary(run_dir)
        key = _reference_keys(run_dir, public_key, summary, references)
        raw = path.read_bytes()
    except (ConfigError, OSError) as exc:
        return bad(None, None, str(exc), [])
    entries: list[dict[str, Any]] = []
    lines = raw.split(b"\n")
    complete = raw.endswith(b"\n")
    if complete or not raw:
        lines.pop()
    if not lines:
        return bad(1, 1, "the log holds no entries (run-start is missing)", [])
    seqs = _seqs(lines)
    for number, line in enumerate(lines, start=1):
        entry, reason = _parse(line, last=number == len(lines) and not complete)
        if entry is None:
            return bad(number, None, reason, entries)
        reason = _check_entry(entry, number, entries, key, references, seqs)
        if reason:
            return bad(number, entry.get("seq"), reason, entries)
        entries.append(entry)
    problem = _check_end(entries, summary)
    if problem is not None:
        return bad(problem.line, problem.seq, problem.reason, entries)
    return Verification(path, tuple(entries), None, references[0][0])


def _read_summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / SUMMARY_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}): it cannot be checked.") from None
    return data if isinstance(data, dict) else {}


def _audit_fields(summary: Mapping[str, Any]) -> Mapping[str, Any]:
    audit = summary.get("audit")
    return audit if isinstance(audit, Mapping) else {}


def _reference_keys(
    run_dir: Path,
    public_key: Ed25519PublicKey | None,
    summary: Mapping[str, Any],
    references: list[tuple[str, str]],
) -> Ed25519PublicKey:
    """The key signatures are checked with; fills ``references`` with every fingerprint."""
    beside = run_dir / AUDIT_PUBLIC_FILE
    stored = load_public_key(beside) if beside.is_file() else None
    if public_key is not None:
        references.append((fingerprint(public_key), "the pinned public key"))
    if stored is not None:
        references.append((fingerprint(stored), AUDIT_PUBLIC_FILE))
    recorded = _audit_fields(summary).get("key-fingerprint")
    if recorded:
        references.append((str(recorded), SUMMARY_FILE))
    key = public_key or stored
    if key is None:
        raise ConfigError(
            f"{beside} is missing: the signatures cannot be checked; pass the coordinator's "
            "public key (--public-key FILE)."
        )
    return key


def _seqs(lines: list[bytes]) -> dict[int, int]:
    """The first line holding each seq: tells reordered entries from dropped ones."""
    found: dict[int, int] = {}
    for number, line in enumerate(lines, start=1):
        try:
            seq = json.loads(line).get("seq")
        except (ValueError, AttributeError):
            continue
        if isinstance(seq, int):
            found.setdefault(seq, number)
    return found


def _parse(line: bytes, *, last: bool) -> tuple[dict[str, Any] | None, str]:
    try:
        entry = json.loads(line)
    except ValueError as exc:
        if last:
            return None, "the last line is cut off (no complete entry): the log was truncated"
        return None, f"not a JSON entry ({exc}): the line was edited"
    if not isinstance(entry, dict):
        return None, "not a JSON object: the line was edited"
    return entry, ""


def _check_entry(
    entry: dict[str, Any],
    number: int,
    before: list[dict[str, Any]],
    key: Ed25519PublicKey,
    references: list[tuple[str, str]],
    seqs: Mapping[int, int],
) -> str:
    """Why ``entry`` (line ``number``, after the good entries ``before``) is bad, or ''."""
    if set(entry) != FIELDS:
        missing, extra = sorted(FIELDS - set(entry)), sorted(set(entry) - FIELDS)
        return f"fields missing {missing or 'none'}, unexpected {extra or 'none'}: edited"
    try:
        computed = entry_hash(entry)
    except ValueError:  # NaN or infinity: never written by fedrad
        return "holds a number JSON cannot hash (NaN or infinity): a field was changed"
    if computed != entry["hash"]:
        return "its content does not match its hash: a field was changed"
    for expected, where in references:
        if entry["key"] != expected:
            return f"names signing key {entry['key']}, but {where} is {expected}: re-signed"
    if not _signed(key, entry):
        return "its signature does not verify with the audit key: forged or re-signed"
    wanted, seq = number, entry["seq"]
    if seq != wanted:
        if wanted in seqs and seqs[wanted] > number:
            return (
                f"holds seq {seq} where {wanted} belongs (seq {wanted} is at line "
                f"{seqs[wanted]}): entries were reordered"
            )
        if isinstance(seq, int) and seq > wanted:
            gap = f"entry {wanted}" if seq == wanted + 1 else f"entries {wanted} to {seq - 1}"
            return f"holds seq {seq} where {wanted} belongs: {gap} dropped"
        return f"holds seq {seq} where {wanted} belongs: an entry was repeated or moved"
    previous = before[-1] if before else None
    if entry["prev"] != (previous["hash"] if previous else GENESIS):
        return "its prev is not the hash of the entry before it: the chain is broken"
    return _check_order(entry["event"], previous["event"] if previous else None)


def _signed(key: Ed25519PublicKey, entry: Mapping[str, Any]) -> bool:
    try:
        key.verify(
            base64.b64decode(entry["signature"], validate=True), bytes.fromhex(entry["hash"])
        )
    except (InvalidSignature, ValueError, TypeError, binascii.Error):
        return False
    return True


def _check_order(event: object, previous: str | None) -> str:
    if event not in EVENTS:
        return f"unknown event {event!r}"
    if previous is None and event != "run-start":
        return f"the first entry is {event!r}, not run-start: the start of the log is missing"
    if previous == "run-end" and event not in AFTER_END:
        return f"{event!r} follows run-end (only resume or run-start may): appended later"
    return ""


def _check_end(entries: list[dict[str, Any]], summary: Mapping[str, Any]) -> Problem | None:
    """Compare the log's end with what summary.json recorded when the run ended."""
    audit = _audit_fields(summary)
    if isinstance(audit.get("entries"), int) and audit.get("head"):
        count, head = int(audit["entries"]), str(audit["head"])
        if len(entries) < count:
            return Problem(
                len(entries) + 1,
                len(entries) + 1,
                f"missing: summary.json records {count} entries (head {head[:16]}) but the log "
                f"ends after seq {len(entries)}: entries were removed from the end",
            )
        ended = entries[count - 1]
        if ended["hash"] != head:
            return Problem(count, count, f"is not the head summary.json records ({head[:16]})")
        if ended["event"] != "run-end":
            return Problem(count, count, f"summary.json ends the run here, at {ended['event']!r}")
        if len(entries) > count and entries[count]["event"] not in AFTER_END:
            return Problem(
                count + 1,
                count + 1,
                f"appended after the run ended (summary.json records {count} entries)",
            )
        return None
    if summary.get("status") and entries[-1]["event"] != "run-end":
        last = len(entries)
        return Problem(
            last + 1,
            last + 1,
            f"missing: summary.json says the run ended ({summary['status']}) but the log ends "
            f"at seq {last} ({entries[-1]['event']}) without run-end: the log was cut",
        )
    return None
