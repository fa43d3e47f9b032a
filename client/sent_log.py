"""What left this site: one hash-chained JSON line per reply, written before the reply is sent.

The log is the site's own record for its IT and privacy officers; it never travels to the
coordinator. It lives beside the site's privacy ledgers, at
``<ledger root>/_sent-log/<site-id>.jsonl`` (the ledger root is node config ``ledger-dir``;
in simulation ``SITES_DIR/.fedrad-ledger``; no study id starts with ``_``), and is read by
``fedrad site log SITE_DIR``. Framework-free: :mod:`client.sent_reply` turns Flower's records
into the plain values used here.

One line per reply, a JSON object with the keys of :data:`LINE_KEYS`: ``v`` (1), ``seq`` (0, 1,
...), ``time`` (UTC, ISO 8601), ``run_id``, ``round`` (or null), ``kind`` (the message type,
``train``, ``evaluate``, ``train.secagg_keys`` ...; ``error`` for an error reply),
``message_type`` (the request's type), ``study`` (or ``""``), ``bytes`` (the size of the
reply's content as Flower serialises it, see :mod:`client.sent_reply`), ``sha256`` (its
content hash, :func:`canonical_content` or :func:`canonical_error`), ``epsilon`` (the study's
epsilon at this site after the reply, or null), ``suppressed`` (the statistics the reply
withheld, :func:`suppressed_statistics`), ``error_code`` (an error reply's code, never its
text; else null), ``prev`` and ``hash``.

The chain: ``hash`` is the SHA-256 (hex) of the line's JSON without its ``hash`` key, written
as ``json.dumps(entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True)`` in UTF-8;
``prev`` is the previous line's ``hash`` (:data:`GENESIS`, 64 zeros, for the first line) and
``seq`` its line index. So a changed field, a removed, inserted or reordered line, or a line
cut short shows (:func:`read_sent_log`). The chain holds no key: someone who rewrites a line
*and every line after it* is not caught by the chain alone, nor are whole lines removed from
the end; compare
the last hash with a copy kept elsewhere, or the content hashes with what the coordinator
received (they are recomputable from the replies).

Concurrent writers (the warm worker, simulation threads) each hold an exclusive ``flock`` on
the log while they read its last line and append theirs with one ``O_APPEND`` write, then
fsync; a write that fails raises :class:`SentLogError`, and the reply is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np

from client.fairness import suppressed_labels
from fedrad.core import keys
from fedrad.core.errors import FedradError
from fedrad.core.fairness import FairnessLayout

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the in-process lock still holds
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "GENESIS",
    "LINE_KEYS",
    "SENT_LOG_DIR",
    "Records",
    "SentLog",
    "SentLogError",
    "SentReply",
    "append_reply",
    "canonical_content",
    "canonical_error",
    "entry_hash",
    "read_sent_log",
    "sent_log_path",
    "suppressed_statistics",
]

SENT_LOG_DIR = "_sent-log"
"""Sub-folder of the ledger root holding one sent log per site."""
GENESIS = "0" * 64
"""The ``prev`` of the first line."""
VERSION = 1
LINE_KEYS = (
    "v",
    "seq",
    "time",
    "run_id",
    "round",
    "kind",
    "message_type",
    "study",
    "bytes",
    "sha256",
    "epsilon",
    "suppressed",
    "error_code",
    "prev",
    "hash",
)
"""The keys of every line, no more, no fewer."""

Records = Mapping[str, tuple[str, Mapping[str, Any]]]
"""A reply's content as plain values: record name -> (``array``, ``metric`` or ``config``, items).

Array items are numpy arrays; metric and config items are Flower's value types (bool, int,
float, str, bytes and lists of them).
"""

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_LOCK = threading.Lock()  # flock excludes other processes; this, threads without fcntl
_TAIL = 4096


class SentLogError(FedradError):
    """The sent log could not be written, or its last line cannot be read: nothing is sent."""


def sent_log_path(ledger_root: Path, *, site_id: str) -> Path:
    """The sent log of ``site_id`` under the site's ledger root."""
    name = site_id if _SAFE_NAME.fullmatch(site_id) else quote(site_id, safe="").replace(".", "%2E")
    return Path(ledger_root) / SENT_LOG_DIR / f"{name}.jsonl"


# ----------------------------------------------------------------- the content hash


def _json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _plain(value: object) -> object:
    """One value of the canonical form (see :func:`canonical_content`)."""
    if isinstance(value, np.ndarray):
        data = np.ascontiguousarray(value).tobytes()
        return {
            "dtype": value.dtype.str,
            "shape": list(value.shape),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    if isinstance(value, bytes):
        return {"bytes": len(value), "sha256": hashlib.sha256(value).hexdigest()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)  # "nan", "inf", "-inf": JSON has no such numbers
    return value


def canonical_content(records: Records) -> bytes:
    """The canonical serialisation of a reply's content; its SHA-256 is the line's ``sha256``.

    ``{"content": {NAME: {"type": TYPE, "items": {KEY: VALUE}}}}`` for every record of the
    reply, TYPE ``array``, ``metric`` or ``config``, written as
    ``json.dumps(..., sort_keys=True, separators=(",", ":"), ensure_ascii=True)`` in UTF-8. An
    array VALUE is ``{"dtype": numpy dtype.str (e.g. "<f4"), "shape": [...], "sha256": SHA-256
    of its C-order bytes}``; a bytes VALUE is ``{"bytes": length, "sha256": SHA-256 of it}``;
    lists are lists of such values; a non-finite float is its ``repr`` (``"nan"``); bool, int,
    float and str are themselves.
    """
    document = {
        name: {"type": kind, "items": {k: _plain(v) for k, v in items.items()}}
        for name, (kind, items) in records.items()
    }
    return _json({"content": document})


def canonical_error(code: int, reason: str) -> bytes:
    """The canonical serialisation of an error reply: ``{"error": {"code": ..., "reason": ...}}``.

    Written as :func:`canonical_content` writes; the reason is the code's fixed sentence.
    """
    return _json({"error": {"code": int(code), "reason": reason}})


# ----------------------------------------------------------- what the reply withheld


def suppressed_statistics(
    records: Records, *, dp: str, layout: FairnessLayout | None = None
) -> list[str]:
    """The statistics a reply withheld, by name: the one place that decides what is listed.

    ``loss-sum`` when the reply carries evaluation or training sums under DP (``dp`` is the
    request's mode) without a loss sum, or with the zero that stands for a withheld one; and
    each subgroup cell the reply's fairness vector flags as suppressed (below the site's
    ``min-cell-count``, or left out to protect one that is), read with the run's ``layout``.
    """
    withheld: list[str] = []
    metrics = records.get(keys.METRICS)
    if metrics is not None and keys.NUM_EXAMPLES in metrics[1] and dp != "off":
        if metrics[1].get(keys.LOSS_SUM, 0.0) == 0.0:
            withheld.append(keys.LOSS_SUM)
    if metrics is not None and layout is not None and keys.FAIRNESS in metrics[1]:
        vector = np.asarray(metrics[1][keys.FAIRNESS], dtype=np.int64)
        if vector.shape == (layout.size,):
            withheld.extend(suppressed_labels(vector, layout))
    return withheld


# -------------------------------------------------------------------- writing a line


@dataclass(frozen=True)
class SentReply:
    """What the log says of one reply (see the module docstring for each field)."""

    run_id: int
    server_round: int | None
    kind: str
    message_type: str
    study: str
    size: int
    sha256: str
    epsilon: float | None = None
    suppressed: tuple[str, ...] = ()
    error_code: int | None = None
    time: datetime = field(default_factory=lambda: datetime.now(timezone.utc))


def entry_hash(entry: Mapping[str, object]) -> str:
    """The ``hash`` of a line: SHA-256 of its canonical JSON without the ``hash`` key."""
    return hashlib.sha256(_json({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def append_reply(path: Path, reply: SentReply) -> dict[str, object]:
    """Append the line of ``reply`` to the log at ``path``, chained to the last; return it.

    Raises
    ------
    SentLogError
        If the log cannot be written, or its last line is cut short or not a line of a log.
    """
    epsilon = reply.epsilon if reply.epsilon is not None and math.isfinite(reply.epsilon) else None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path) as fd:
            last = _last_entry(fd, path)
            entry: dict[str, object] = {
                "v": VERSION,
                "seq": 0 if last is None else int(last["seq"]) + 1,
                "time": reply.time.astimezone(timezone.utc).isoformat(timespec="milliseconds"),
                "run_id": int(reply.run_id),
                "round": reply.server_round,
                "kind": reply.kind,
                "message_type": reply.message_type,
                "study": reply.study,
                "bytes": int(reply.size),
                "sha256": reply.sha256,
                "epsilon": epsilon,
                "suppressed": list(reply.suppressed),
                "error_code": reply.error_code,
                "prev": GENESIS if last is None else str(last["hash"]),
            }
            entry["hash"] = entry_hash(entry)
            line = _json(entry) + b"\n"
            if os.write(fd, line) != len(line):
                raise OSError(f"a short write to {path}")
            os.fsync(fd)
    except OSError as err:
        raise SentLogError(
            f"Cannot write the site's sent log {path}: {err}. Nothing is sent until it can be "
            "written: free disk space or fix the folder's permissions."
        ) from err
    return entry


@contextmanager
def _locked(path: Path) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        with _LOCK:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield fd
            finally:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _last_entry(fd: int, path: Path) -> Mapping[str, Any] | None:
    """The log's last line, parsed; None for an empty log."""
    size = os.fstat(fd).st_size
    if size == 0:
        return None
    chunk = _TAIL
    while True:
        start = max(0, size - chunk)
        data = os.pread(fd, size - start, start)
        cut = data.rfind(b"\n", 0, len(data) - 1)
        if cut >= 0 or start == 0:
            break
        chunk *= 4
    line = data[cut + 1 :]
    try:
        entry = json.loads(line) if line.endswith(b"\n") else None
    except ValueError:
        entry = None
    if not isinstance(entry, dict) or not isinstance(entry.get("seq"), int):
        raise SentLogError(
            f"The last line of the site's sent log {path} is cut short or is not a line of a "
            "sent log. Nothing is sent until the site's operator has looked: check it with "
            "`fedrad site log`, keep a copy, and move the damaged log aside."
        )
    return entry


# -------------------------------------------------------------------- reading the log


@dataclass(frozen=True)
class SentLog:
    """A sent log as read: its lines, and whether the chain holds.

    ``problem`` is empty when it holds; otherwise it names the first bad line (1-based,
    ``bad_line``) and what is wrong with it. ``entries`` holds every line that parses.
    """

    path: Path
    entries: tuple[dict[str, Any], ...]
    problem: str = ""
    bad_line: int | None = None

    @property
    def intact(self) -> bool:
        """Whether every line is unchanged and in its place."""
        return not self.problem


def read_sent_log(path: Path) -> SentLog:
    """Read the log at ``path`` (empty when there is none) and check its chain."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return SentLog(path, ())
    except OSError as err:
        raise SentLogError(f"Cannot read the site's sent log {path}: {err}.") from err
    lines = data.split(b"\n")
    tail = lines.pop()  # after the last newline: empty unless the last line was cut
    entries: list[dict[str, Any]] = []
    problem, bad = "", None
    prev = GENESIS
    for number, raw in enumerate(lines, start=1):
        try:
            entry = json.loads(raw)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            problem, bad = problem or f"line {number} is not a JSON object", bad or number
            continue
        entries.append(entry)
        if not problem:
            problem = _check(entry, number, prev)
            bad = number if problem else None
            prev = str(entry.get("hash"))
    if tail and not problem:
        problem, bad = f"line {len(lines) + 1} is cut short (no newline at its end)", len(lines) + 1
    return SentLog(path, tuple(entries), problem, bad)


def _check(entry: Mapping[str, Any], number: int, prev: str) -> str:
    """What is wrong with line ``number`` (1-based) after a line whose hash was ``prev``."""
    if set(entry) != set(LINE_KEYS):
        return f"line {number} has other fields than a sent-log line: it was edited"
    if entry["hash"] != entry_hash(entry):
        return f"line {number} was edited: its hash does not match its content"
    if entry["prev"] != prev or entry["seq"] != number - 1:
        return (
            f"line {number} does not follow line {number - 1}: lines were removed, inserted or "
            "reordered there"
            if number > 1
            else "line 1 is not the first line of the log: lines before it were removed"
        )
    return ""
