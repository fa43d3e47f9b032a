"""A retried round under DP gets the update the site already released, not a second release.

When the coordinator dies with a round in flight, each site has trained that round and charged
it to its ledger before its reply could arrive. The resumed study asks for the same round again,
from the same global model. Training again would be a second noised release of the same
round, charged again, and a study whose noise was planned for exactly its rounds would then
refuse the retry for want of budget. Sending the same bytes again costs nothing (the second
copy is a function of the first), so the site keeps its last DP training result and answers a
request for the same round of the same study from the same model with it:

- ``<ledger root>/_replays/<study>/<site>.safetensors`` holds the trained weights, and the
  ``.json`` beside it the round, the SHA-256 of the model it started from and the sums;
- only a request with the same study, round, starting model and run config (noise, clipping,
  epochs: every key the coordinator sends) is answered from it; any other request trains, and
  is charged, as usual. It is written after the ledger recorded the round and before the reply
  leaves.

The replayed weights are those already released, so a coordinator learns nothing from asking
twice. The files stay at the site, beside its ledgers.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from safetensors.numpy import load_file, save_file

from fedrad.core.digest import sha256_arrays as model_digest
from fedrad.core.durable import replace_atomically, write_atomic

__all__ = ["REPLAY_DIR", "Replay", "load_replay", "model_digest", "request_digest", "save_replay"]

log = logging.getLogger(__name__)

REPLAY_DIR = "_replays"


def request_digest(run_config: Mapping[str, Any]) -> str:
    """SHA-256 of a request's run config (sorted keys): a replay answers only the same request."""
    text = json.dumps(dict(run_config), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class Replay:
    """A released DP training result: the trained weights and the reply's sums."""

    arrays: dict[str, np.ndarray]
    sums: dict[str, Any]


def _paths(ledger_root: Path, study: str, site: str) -> tuple[Path, Path]:
    folder = Path(ledger_root) / REPLAY_DIR / quote(study, safe="")
    name = quote(site, safe="")
    return folder / f"{name}.safetensors", folder / f"{name}.json"


def save_replay(
    ledger_root: Path,
    *,
    study: str,
    site: str,
    server_round: int,
    start: str,
    request: str,
    arrays: Mapping[str, np.ndarray],
    sums: Mapping[str, Any],
) -> None:
    """Keep the round's released result (replacing the previous round's)."""
    weights, meta = _paths(ledger_root, study, site)
    weights.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    replace_atomically(weights, lambda tmp: save_file(tensors, str(tmp)))
    record = {
        "server-round": server_round,
        "start-model-sha256": start,
        "request-sha256": request,
        "weights-sha256": model_digest(tensors),
        "sums": dict(sums),
    }
    write_atomic(meta, (json.dumps(record, sort_keys=True) + "\n").encode())


def load_replay(
    ledger_root: Path, *, study: str, site: str, server_round: int, start: str, request: str
) -> Replay | None:
    """The released result of this round, model and request, if the site kept one."""
    weights, meta = _paths(ledger_root, study, site)
    try:
        record = json.loads(meta.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if (
        record.get("server-round") != server_round
        or record.get("start-model-sha256") != start
        or record.get("request-sha256") != request
    ):
        return None
    try:
        arrays = dict(load_file(str(weights)))
    except (OSError, ValueError) as exc:
        log.warning(
            "the kept result of round %d is unreadable (%s); training again", server_round, exc
        )
        return None
    if model_digest(arrays) != record.get("weights-sha256"):
        log.warning(
            "the kept result of round %d does not match its digest; training again", server_round
        )
        return None
    return Replay(arrays=arrays, sums=dict(record["sums"]))
