"""The run directory: what every run leaves on the coordinator's disk.

Layout (schema version ``fedrad.core.config.SCHEMA_VERSION``)::

    RUN_DIR/run.json                       resolved configuration, seed, package versions,
                                           the sites that took part so far
    RUN_DIR/metrics.jsonl                  one JSON line per round (per-site and aggregated)
    RUN_DIR/rounds/round-NNNN/model.safetensors   global model after round NNNN
    RUN_DIR/rounds/round-NNNN/model.json          model name, configuration, round, sha256
    RUN_DIR/rounds/round-NNNN/strategy.safetensors strategy state (e.g. FedAdam moments)
    RUN_DIR/initial-model.safetensors      the global model before round 1
    RUN_DIR/model.safetensors, model.json  the latest global model (copy of the last round)
    RUN_DIR/summary.json                   status, rounds done, final metrics, threshold

Every file is written atomically (temporary file, then rename), so a crash never leaves a
half-written checkpoint that a resume would trust.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from fedrad.core.config import SCHEMA_VERSION, RunConfig
from fedrad.core.durable import replace_atomically
from fedrad.core.errors import RunDirError

RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
MODEL_FILE = "model.safetensors"
MODEL_META = "model.json"
INITIAL_MODEL_FILE = "initial-model.safetensors"
STRATEGY_FILE = "strategy.safetensors"
ROUNDS_DIR = "rounds"
_PACKAGES = ("fedrad", "flwr", "torch", "monai", "opacus", "pydicom", "numpy", "cryptography")


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"

    def write(tmp: Path) -> None:
        tmp.write_text(text)

    replace_atomically(path, write)


def read_json(path: Path) -> Any:
    """Read a JSON file of the run directory, with a clear error when missing or broken."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing: is {path.parent} a fedrad run directory?") from None
    except json.JSONDecodeError as exc:
        raise RunDirError(
            f"{path} is not valid JSON ({exc}); the run directory is damaged."
        ) from None


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


CODE_PACKAGES = ("fedrad", "client", "server", "models", "privacy")


def code_fingerprint() -> dict[str, str]:
    """Where fedrad's code was loaded from and a digest of every source file there.

    ``flwr run .`` loads the app from its installed FAB copy, ``fedrad simulate`` from the
    package; equal digests prove that both ran the same code.
    """
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        for source in sorted((root / package).rglob("*.py")):
            digest.update(source.relative_to(root).as_posix().encode() + b"\0")
            digest.update(source.read_bytes() + b"\0")
    return {"root": str(root), "sha256": digest.hexdigest()}


def package_versions() -> dict[str, str]:
    """Versions of the packages that shape a run's result."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def new_run_dir(base: Path) -> Path:
    """A fresh, timestamped folder under ``base`` (``runs/20261125-221500``)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    candidate, n = base / stamp, 1
    while candidate.exists():
        n += 1
        candidate = base / f"{stamp}-{n}"
    candidate.mkdir(parents=True)
    return candidate


@dataclass(frozen=True)
class Checkpoint:
    """A round's saved global model and strategy state."""

    round: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray]
    model: dict[str, Any]
    model_sha256: str


class RunDir:
    """Reads and writes one run directory."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def round_dir(self, server_round: int) -> Path:
        """Folder of one round's checkpoint."""
        return self.path / ROUNDS_DIR / f"round-{server_round:04d}"

    def write_run_record(self, config: RunConfig, *, sites: list[str], resumed_from: int) -> None:
        """Record the resolved configuration, seed, versions and schema version.

        A run resumed into its own directory keeps its first start and the sites seen so far,
        and lists every resume in ``resumes`` (when, after which round).
        """
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        previous: dict[str, Any] = {}
        if resumed_from and (self.path / RUN_FILE).is_file():
            previous = dict(read_json(self.path / RUN_FILE))
        resumes = list(previous.get("resumes", []))
        if resumed_from:
            resumes.append({"at": now, "after-round": resumed_from})
        record = {
            "schema-version": SCHEMA_VERSION,
            "config": config.to_user_config(),
            "seed": config.seed,
            "versions": package_versions(),
            "code": code_fingerprint(),
            "sites": sorted(set(sites) | set(previous.get("sites", []))),
            "started": previous.get("started", now),
            "resumed-after-round": resumed_from,
            "resumes": resumes,
        }
        write_json(self.path / RUN_FILE, record)

    def record_sites(self, sites: list[str]) -> None:
        """Set the run record's ``sites``: the sites that took part so far.

        The coordinator learns who takes part from the replies, after the run record is first
        written: site names in the clear, ``node-<id>`` under secure aggregation.
        """
        record = read_json(self.path / RUN_FILE)
        record["sites"] = sites
        write_json(self.path / RUN_FILE, record)

    def save_initial(self, arrays: dict[str, np.ndarray]) -> None:
        """Save the initial global model (before round 1) for comparison and audit."""
        tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        replace_atomically(self.path / INITIAL_MODEL_FILE, lambda p: save_file(tensors, str(p)))

    def save_checkpoint(
        self,
        server_round: int,
        arrays: dict[str, np.ndarray],
        strategy_state: dict[str, np.ndarray],
        model: dict[str, Any],
    ) -> str:
        """Save a round's model and strategy state; update the run's latest model. Return sha256."""
        folder = self.round_dir(server_round)
        tensors = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        replace_atomically(folder / MODEL_FILE, lambda p: save_file(tensors, str(p)))
        state = {k: np.ascontiguousarray(v) for k, v in strategy_state.items()}
        replace_atomically(folder / STRATEGY_FILE, lambda p: save_file(state, str(p)))
        digest = sha256_file(folder / MODEL_FILE)
        meta = {
            "schema-version": SCHEMA_VERSION,
            "model": model,
            "round": server_round,
            "sha256": digest,
        }
        write_json(folder / MODEL_META, meta)

        def copy_model(tmp: Path) -> None:
            shutil.copyfile(folder / MODEL_FILE, tmp)

        replace_atomically(self.path / MODEL_FILE, copy_model)
        write_json(self.path / MODEL_META, meta)
        return digest

    def latest_round(self) -> int:
        """The last round with a complete checkpoint (0 when none)."""
        rounds = []
        for folder in (self.path / ROUNDS_DIR).glob("round-*"):
            if all((folder / f).is_file() for f in (MODEL_FILE, MODEL_META, STRATEGY_FILE)):
                rounds.append(int(folder.name.split("-")[1]))
        return max(rounds, default=0)

    def load_checkpoint(self, server_round: int | None = None) -> Checkpoint:
        """Load a round's checkpoint (default: the latest), verifying its hash."""
        chosen = self.latest_round() if server_round is None else server_round
        folder = self.round_dir(chosen)
        if chosen == 0 or not (folder / MODEL_META).is_file():
            which = "" if server_round is None else f" for round {server_round}"
            raise RunDirError(
                f"{self.path} holds no complete checkpoint{which}; "
                "start a new run instead of resuming."
            )
        meta = read_json(folder / MODEL_META)
        if meta.get("schema-version") != SCHEMA_VERSION:
            raise RunDirError(
                f"{folder / MODEL_META} has schema version {meta.get('schema-version')}, this "
                f"fedrad reads {SCHEMA_VERSION}."
            )
        digest = sha256_file(folder / MODEL_FILE)
        if digest != meta.get("sha256"):
            raise RunDirError(
                f"{folder / MODEL_FILE} does not match the sha256 recorded in "
                f"{folder / MODEL_META}: the checkpoint is damaged."
            )
        return Checkpoint(
            round=chosen,
            arrays=load_file(str(folder / MODEL_FILE)),
            strategy_state=load_file(str(folder / STRATEGY_FILE)),
            model=meta["model"],
            model_sha256=digest,
        )

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one round's metrics as a JSON line."""
        with (self.path / METRICS_FILE).open("a") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        """All round records written so far; a damaged line is a RunDirError naming it."""
        path = self.path / METRICS_FILE
        if not path.is_file():
            return []
        records = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise RunDirError(
                    f"{path} line {number} is not valid JSON ({exc}): the run directory is "
                    "damaged. Restore it from a backup, or start the study afresh under a new "
                    "study id (sites' privacy ledgers keep what was already spent)."
                ) from None
            if not isinstance(record, dict) or not isinstance(record.get("round"), int):
                raise RunDirError(
                    f"{path} line {number} is not a round record (no integer 'round'): the run "
                    "directory is damaged; restore it from a backup."
                )
            records.append(record)
        return records

    def resume_point(self) -> Checkpoint:
        """The checkpoint a resumed run continues from, after checking the whole directory.

        That is the last round both checkpointed and recorded as completed in metrics.jsonl (a
        round checkpointed but not yet recorded when the coordinator died is trained again).
        Its model must match the sha256 metrics.jsonl recorded for it, and the completed rounds
        must run 1, 2, ... without a gap. Anything else is a RunDirError naming the file and
        what to do: a damaged run is never silently started over.
        """
        damaged = (
            "The run directory is damaged: restore it from a backup, or start the study afresh "
            "under a new study id (sites' privacy ledgers keep what was already spent)."
        )
        if not self.path.is_dir():
            raise RunDirError(f"{self.path} does not exist: there is no run to resume.")
        read_json(self.path / RUN_FILE)
        completed = {r["round"]: r for r in self.read_metrics() if r.get("status") == "completed"}
        done = sorted(completed)
        if done != list(range(1, len(done) + 1)):
            raise RunDirError(
                f"{self.path / METRICS_FILE} records completed rounds {done}, not 1..{len(done)}. "
                + damaged
            )
        chosen = min(self.latest_round(), len(done))
        if chosen == 0:
            raise RunDirError(
                f"{self.path} holds no completed, checkpointed round to resume from; start the "
                "study again (no round was trained)."
            )
        try:
            checkpoint = self.load_checkpoint(chosen)
        except RunDirError as exc:
            raise RunDirError(f"{exc} {damaged}") from None
        except Exception as exc:  # a truncated or garbled safetensors file
            raise RunDirError(
                f"{self.round_dir(chosen)} cannot be read ({exc}). {damaged}"
            ) from None
        recorded = completed[chosen].get("model-sha256")
        if recorded != checkpoint.model_sha256:
            raise RunDirError(
                f"{self.round_dir(chosen) / MODEL_FILE} has sha256 {checkpoint.model_sha256} but "
                f"{self.path / METRICS_FILE} recorded {recorded} for round {chosen}. " + damaged
            )
        return checkpoint

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Write the run's final (or latest) summary."""
        write_json(self.path / SUMMARY_FILE, {"schema-version": SCHEMA_VERSION, **summary})

    def read_summary(self) -> dict[str, Any]:
        """Read the run's summary."""
        return dict(read_json(self.path / SUMMARY_FILE))

    def load_final_model(self) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Return the latest global model's metadata and weights, verifying the hash."""
        meta = read_json(self.path / MODEL_META)
        if meta.get("schema-version") != SCHEMA_VERSION:
            raise RunDirError(
                f"{self.path / MODEL_META} has schema version {meta.get('schema-version')}; "
                f"this fedrad reads {SCHEMA_VERSION}."
            )
        if sha256_file(self.path / MODEL_FILE) != meta["sha256"]:
            raise RunDirError(f"{self.path / MODEL_FILE} does not match its recorded sha256.")
        return meta, load_file(str(self.path / MODEL_FILE))
