"""Writing a run's audit trail: signed entries appended to ``RUN_DIR/audit.jsonl``.

The format and its verification are in :mod:`server.audit`. The round loop appends:

- ``run-start``: the run config, its SHA-256, the code digest and the package versions;
- ``round`` (after the round's checkpoint and metrics are written): the sites that trained and
  were evaluated, the model hashes as metrics.jsonl records them (``start-model-sha256`` of the
  weights, ``model-sha256`` of the checkpoint file), the aggregated metrics, each site's
  cumulative epsilon (and the client-level epsilon under distributed DP), the failures and the
  number of refusals. Quarantine counts stay at the sites, which never report them;
- ``resume``: after which round, the model it starts from, the config and code it runs with;
- ``run-end``: the summary (status, reason, rounds done, final metrics, last model hash).

Sites appear under keyed pseudonyms: ``anon-`` + the first 12 hex digits of
HMAC-SHA256(secret, site name), where the secret is HMAC-SHA256 keyed by the raw audit private
key over the hash of the chain's first entry. A site keeps its pseudonym across the resumes of
one run, gets another in the next run, and only the holder of the audit key can tell which site
is which. ``node-<id>`` labels (secure aggregation) are kept as they are.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import math
import os
import re
import shutil
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedrad.core.config import RunConfig
from fedrad.core.durable import write_atomic
from fedrad.core.errors import (
    ERROR_BUDGET,
    ERROR_PRIVACY_LIMIT,
    ERROR_REVEALING,
    ERROR_STUDY_NOT_ALLOWED,
)
from privacy.audit_key import AUDIT_PUBLIC_FILE, fingerprint, public_pem, run_signing_key
from server.audit import (
    AUDIT_FILE,
    EVENTS,
    GENESIS,
    AuditError,
    Verification,
    canonical,
    entry_hash,
    verify,
)
from server.rundir import MODEL_META, code_fingerprint, package_versions, read_json

__all__ = [
    "FORMAT",
    "AuditTrail",
    "open_run_trail",
    "resume_data",
    "run_end_data",
    "run_start_data",
]

FORMAT = 1
"""Version of the entry format, recorded in every run-start."""
_REFUSALS = frozenset({ERROR_REVEALING, ERROR_BUDGET, ERROR_PRIVACY_LIMIT, ERROR_STUDY_NOT_ALLOWED})
_NODE_LABEL = re.compile(r"(?P<name>.+) \(node \d+\)")
_NODE_ID = re.compile(r"node-\d+")
_NOT_SITES = frozenset({"aggregation"})

log = logging.getLogger(__name__)


def _plain(value: Any) -> Any:
    """``value`` as plain JSON: numpy scalars as numbers, tuples as lists, NaN and inf as null."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bool | str | None):
        return value
    if hasattr(value, "item"):  # numpy scalar
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, int | float):
        return value
    return str(value)


def _digest(value: Any) -> str:
    return hashlib.sha256(canonical(_plain(value))).hexdigest()


def run_start_data(config: RunConfig, *, resumed_after: int = 0) -> dict[str, Any]:
    """The ``run-start`` entry: config and its hash, code digest, versions.

    ``resumed_after`` is non-zero when the trail begins at a resume (a run started before
    fedrad kept one): its earlier rounds are not in this trail.
    """
    values = config.to_user_config()
    return {
        "format": FORMAT,
        "config": values,
        "config-sha256": _digest(values),
        "code": code_fingerprint(),
        "versions": package_versions(),
        "resumed-after-round": resumed_after,
    }


def resume_data(config: RunConfig, *, after_round: int, start_model: str) -> dict[str, Any]:
    """The ``resume`` entry: where the run goes on, with which config and code."""
    values = config.to_user_config()
    return {
        "after-round": after_round,
        "start-model-sha256": start_model,
        "config": values,
        "config-sha256": _digest(values),
        "code": code_fingerprint(),
    }


def run_end_data(summary: Mapping[str, Any], *, model: str | None) -> dict[str, Any]:
    """The ``run-end`` entry: status, rounds done, final metrics, the last model's hash."""
    final = summary.get("final-evaluation") or {}
    return {
        "status": summary.get("status"),
        "reason": summary.get("reason", ""),
        "rounds-completed": summary.get("rounds-completed"),
        "num-server-rounds": summary.get("num-server-rounds"),
        "validation": summary.get("validation", {}),
        "final-evaluation": final.get("aggregate", {}),
        "model-sha256": model,
    }


def _is_refusal(text: str) -> bool:
    found = re.match(r"error (\d+):", text)
    return found is not None and int(found.group(1)) in _REFUSALS


class AuditTrail:
    """Appends signed entries to one run's ``audit.jsonl`` (see the module docstring)."""

    def __init__(
        self, run_dir: Path, key: Ed25519PrivateKey, *, count: int, head: str, first: str | None
    ) -> None:
        self.path = run_dir / AUDIT_FILE
        self.key = key
        self.fingerprint = fingerprint(key.public_key())
        self.count = count
        self.head = head
        self._first = first
        self._names: set[str] = set()

    @classmethod
    def open(
        cls, run_dir: Path, key: Ed25519PrivateKey, *, continue_from: Path | None = None
    ) -> AuditTrail:
        """Continue the trail in ``run_dir`` (checked end to end first), or begin a new one.

        ``continue_from`` is the run directory a resumed run continues; when the run writes
        elsewhere, that run's trail is checked and copied here, so the chain goes on.
        """
        path = run_dir / AUDIT_FILE
        public = run_dir / AUDIT_PUBLIC_FILE
        try:
            if (
                continue_from is not None
                and not path.exists()
                and (continue_from / AUDIT_FILE).is_file()
                and continue_from.resolve() != run_dir.resolve()
            ):
                _check_continuable(continue_from, key)
                shutil.copyfile(continue_from / AUDIT_FILE, path)
            if path.exists() and not path.is_file():
                raise AuditError(f"{path} is not a file: the audit trail cannot be written there.")
            if path.is_file() and path.stat().st_size > 0:
                result = _check_continuable(run_dir, key)
                trail = cls(
                    run_dir,
                    key,
                    count=result.count,
                    head=result.head,
                    first=result.entries[0]["hash"],
                )
            else:
                trail = cls(run_dir, key, count=0, head=GENESIS, first=None)
            if trail.count == 0 or not public.is_file():
                write_atomic(public, public_pem(key.public_key()), mode=0o644)
        except OSError as exc:
            raise AuditError(f"cannot open the audit trail {path} ({exc}).") from None
        return trail

    def append(self, event: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """Sign and append one entry (fsynced); an entry that cannot be written is an AuditError."""
        if event not in EVENTS:
            raise ValueError(f"unknown audit event {event!r}; one of {', '.join(EVENTS)}")
        entry: dict[str, Any] = {
            "seq": self.count + 1,
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "event": event,
            "data": _plain(data),
            "prev": self.head,
            "key": self.fingerprint,
        }
        entry["hash"] = entry_hash(entry)
        signature = self.key.sign(bytes.fromhex(entry["hash"]))
        entry["signature"] = base64.b64encode(signature).decode("ascii")
        line = canonical(entry) + b"\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise AuditError(
                f"cannot append the {event} entry to the audit trail {self.path} ({exc}): the "
                "run stops, since a round missing from the trail must not count. Fix the disk "
                "or permissions, then resume the run."
            ) from None
        self.count += 1
        self.head = entry["hash"]
        self._first = self._first or entry["hash"]
        return entry

    def pseudonym(self, site: str) -> str:
        """The site's pseudonym in this run (keyed by the audit key and the chain's first entry)."""
        if self._first is None:
            raise AuditError("pseudonyms are keyed by the first entry: append run-start first.")
        raw = self.key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        secret = hmac.new(raw, b"fedrad audit pseudonyms\0" + self._first.encode(), "sha256")
        self._names.add(site)
        return "anon-" + hmac.new(secret.digest(), site.encode(), "sha256").hexdigest()[:12]

    def _label(self, label: str) -> str:
        """A report's site label (``NAME``, ``NAME (node N)``, ``node-N``) without the name."""
        found = _NODE_LABEL.fullmatch(label)
        if found:
            return self.pseudonym(found.group("name"))
        if _NODE_ID.fullmatch(label) or label in _NOT_SITES:
            return label
        return self.pseudonym(label)

    def _redact(self, text: str) -> str:
        """``text`` with every site name seen so far replaced by its pseudonym."""
        if not self._names:
            return text
        names = "|".join(re.escape(n) for n in sorted(self._names, key=len, reverse=True))
        return re.sub(rf"(?<![\w-])({names})(?![\w-])", lambda m: self.pseudonym(m[1]), text)

    def record_round(
        self, record: Mapping[str, Any], participants: Iterable[str]
    ) -> dict[str, Any]:
        """Append the ``round`` entry of one round record (as metrics.jsonl holds it)."""
        train = record.get("train") or {}
        evaluate = record.get("evaluate") or {}
        secure = train.get("secure-aggregation") or {}
        sites = sorted(self._label(s) for s in participants)
        evaluated = sorted(self._label(s) for s in evaluate.get("sites") or {})
        epsilon = {
            self._label(site): metrics["epsilon"]
            for site, metrics in (train.get("sites") or {}).items()
            if "epsilon" in metrics
        }
        failures = {
            stage: {
                self._label(label): self._redact(str(text))
                for label, text in (part.get("failures") or {}).items()
            }
            for stage, part in (("train", train), ("evaluate", evaluate))
        }
        data: dict[str, Any] = {
            "round": record.get("round"),
            "status": record.get("status"),
            "sites": sites,
            "evaluated-sites": evaluated,
            "start-model-sha256": record.get("start-model-sha256"),
            "model-sha256": record.get("model-sha256"),
            "metrics": evaluate.get("aggregate") or {},
            "epsilon": epsilon,
            "failures": failures,
            "refusals": sum(_is_refusal(t) for part in failures.values() for t in part.values()),
        }
        if secure:
            data["secure-aggregation"] = {
                "contributors": secure.get("contributors"),
                "dropped": len(secure.get("dropped") or ()),
            }
            if "client-level-epsilon" in secure:
                data["client-level-epsilon"] = secure["client-level-epsilon"]
        return self.append("round", data)

    def record_end(self, summary: Mapping[str, Any]) -> dict[str, Any]:
        """Append the ``run-end`` entry (site names in the reason replaced by pseudonyms)."""
        meta = self.path.parent / MODEL_META  # the latest global model, when a round completed
        model = str(read_json(meta).get("sha256")) if meta.is_file() else None
        data = run_end_data(summary, model=model)
        data["reason"] = self._redact(str(data["reason"]))
        return self.append("run-end", data)

    def summary_fields(self) -> dict[str, Any]:
        """What summary.json records under ``audit``: key fingerprint, entry count, head hash."""
        return {"key-fingerprint": self.fingerprint, "entries": self.count, "head": self.head}


def _check_continuable(run_dir: Path, key: Ed25519PrivateKey) -> Verification:
    result = verify(run_dir, public_key=key.public_key())
    if result.problem is not None:
        raise AuditError(
            f"the audit trail {run_dir / AUDIT_FILE} cannot be continued: {result.problem}. "
            "Continue it with the audit key it was signed with (run-config audit-key), restore "
            "it from a backup, or write the run into a new directory."
        )
    return result


def open_run_trail(
    config: RunConfig, run_dir: Path, *, resumed_after: int, start_model: str
) -> AuditTrail:
    """Open a run's trail with its signing key and append run-start, or resume, or both.

    The key is the run config's ``audit-key``, else the one beside the runs folder
    (:func:`privacy.audit_key.run_signing_key`). A resumed run continues the trail of the run
    directory it resumes (``resume-from``); a trail that does not check good stops the run.
    """
    key, key_path = run_signing_key(config.audit_key, run_dir)
    source = Path(config.resume_from).expanduser() if resumed_after else None
    trail = AuditTrail.open(run_dir, key, continue_from=source)
    if not resumed_after or trail.count == 0:
        trail.append("run-start", run_start_data(config, resumed_after=resumed_after))
    if resumed_after:
        data = resume_data(config, after_round=resumed_after, start_model=start_model)
        trail.append("resume", data)
    log.info(
        "audit trail %s (%d entries), signed with %s (%s)",
        trail.path,
        trail.count,
        key_path,
        trail.fingerprint,
    )
    return trail
