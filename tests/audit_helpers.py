"""A small signed audit trail in a run directory, and the edits an attacker would make to it."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.audit_key import fingerprint
from server.audit import AUDIT_FILE, canonical, entry_hash
from server.audit_trail import AuditTrail
from server.rundir import RunDir

SITES = ("hospital-a", "hospital-b")


def model_hash(server_round: int) -> str:
    """A made-up global model hash of a round."""
    return hashlib.sha256(f"model after round {server_round}".encode()).hexdigest()


def round_record(server_round: int, *, epsilon: float | None = None) -> dict[str, Any]:
    """A round record as metrics.jsonl holds it: two sites trained, one evaluation failed."""
    train_site = {"num-examples": 8, "loss-sum": 4.0}
    if epsilon is not None:
        train_site["epsilon"] = epsilon * server_round
    return {
        "round": server_round,
        "status": "completed",
        "start-model-sha256": model_hash(server_round - 1),
        "model-sha256": model_hash(server_round),
        "train": {"sites": {s: dict(train_site) for s in SITES}, "failures": {}},
        "evaluate": {
            "sites": {s: {"auc": 0.7} for s in SITES},
            "aggregate": {"auc": 0.5 + server_round / 10, "loss": 0.6, "accuracy": 0.7},
            "failures": {
                "hospital-c (node 33)": "error 103: the site refused: its privacy budget..."
            },
        },
    }


def write_trail(
    run_dir: Path, key: Ed25519PrivateKey, *, rounds: int = 3, end: bool = True
) -> AuditTrail:
    """run-start, ``rounds`` rounds, and with ``end`` run-end and summary.json, as the loop."""
    run_dir.mkdir(parents=True, exist_ok=True)
    trail = AuditTrail.open(run_dir, key)
    trail.append("run-start", {"config": {"num-server-rounds": rounds}, "resumed-after-round": 0})
    for n in range(1, rounds + 1):
        trail.record_round(round_record(n, epsilon=0.5), participants=SITES)
    if end:
        summary: dict[str, Any] = {"status": "completed", "reason": "", "rounds-completed": rounds}
        trail.record_end(summary)
        RunDir(run_dir).write_summary({**summary, "audit": trail.summary_fields()})
    return trail


def read_lines(run_dir: Path) -> list[str]:
    return (run_dir / AUDIT_FILE).read_text().splitlines()


def write_lines(run_dir: Path, lines: list[str]) -> None:
    (run_dir / AUDIT_FILE).write_text("".join(line + "\n" for line in lines))


def sign(entry: dict[str, Any], key: Ed25519PrivateKey, *, claim: str | None = None) -> str:
    """``entry`` hashed and signed with ``key``, naming ``claim`` (default: key's fingerprint)."""
    entry = {k: v for k, v in entry.items() if k not in ("hash", "signature")}
    entry["key"] = claim or fingerprint(key.public_key())
    entry["hash"] = entry_hash(entry)
    entry["signature"] = base64.b64encode(key.sign(bytes.fromhex(entry["hash"]))).decode()
    return canonical(entry).decode()


def resign_all(lines: list[str], key: Ed25519PrivateKey) -> list[str]:
    """The whole chain re-signed with ``key`` (prev links recomputed): a consistent forgery."""
    out, prev = [], "0" * 64
    for line in lines:
        entry = json.loads(line)
        entry["prev"] = prev
        signed = sign(entry, key)
        prev = json.loads(signed)["hash"]
        out.append(signed)
    return out
