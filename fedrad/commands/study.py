"""``fedrad study start|stop``: run a study on a provisioned consortium's coordinator.

A study is one ``flwr run`` of the installed fedrad app over the consortium's connection
(``coordinator/flwr-home``), writing its run directory to ``coordinator/studies/STUDY-ID/``
on the coordinator host. Beside the run directory's own files the command keeps
``study.json``: the Flower run id, the status (running, completed, stopped, interrupted,
failed), when it started and the run config it was started with.

A SuperLink restart does not resume a ServerApp run. ``fedrad study start`` on a study whose
``study.json`` says running or interrupted (or stopped) therefore resumes it: it checks the
run directory (run record, metrics.jsonl, the last checkpoint against the digest metrics.jsonl
recorded for it), then starts a new Flower run with ``resume-from`` and ``out-dir`` both set to
the same run directory, so metrics.jsonl goes on from the last completed round. A damaged run
directory stops the command with the path and what to do; nothing is ever started over
silently. Sites keep their privacy ledgers themselves: a resume cannot lower what they spent.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fedrad.commands.cli import add_run_config_options, console, out, run_config_overrides
from fedrad.commands.consortium import CONNECTION, Consortium
from fedrad.commands.processes import alive, descendants, signal_tree, start
from fedrad.core.config import ConfigValue, RunConfig
from fedrad.core.errors import FedradError
from privacy.audit_key import load_private_key
from server.rundir import METRICS_FILE, SUMMARY_FILE, RunDir, read_json, write_json

__all__ = [
    "STUDY_FILE",
    "Study",
    "add_parser",
    "app_dir",
    "interrupted_studies",
    "list_studies",
    "read_rounds",
    "read_study",
    "resume_command",
    "start_study",
    "stop_study",
]

STUDY_FILE = "study.json"
RESUMABLE = ("running", "interrupted", "stopped")
"""study.json statuses that ``fedrad study start`` resumes from the last checkpoint."""
_NOT_FORWARDED = ("sites-dir", "out-dir", "resume-from", "node-names", "audit-key")
_RUN_ID = re.compile(r"Successfully started run (\d+)")
_BIN = Path(sys.executable).parent


def app_dir() -> Path:
    """The fedrad Flower app: the project folder whose pyproject.toml has ``[tool.flwr.app]``."""
    import fedrad

    root = Path(fedrad.__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or "[tool.flwr.app]" not in pyproject.read_text():
        raise FedradError(
            f"fedrad is installed from {root}, which holds no pyproject.toml with "
            "[tool.flwr.app]: `flwr run` needs the fedrad project folder itself. Install fedrad "
            "from its source checkout (`pip install -e /path/to/fedrad`) on the coordinator."
        )
    return root


@dataclass(frozen=True)
class Study:
    """One study of a consortium: its run directory and its ``study.json``."""

    consortium: Consortium
    study_id: str

    @property
    def folder(self) -> Path:
        """The run directory, ``coordinator/studies/STUDY-ID``."""
        return self.consortium.studies / self.study_id

    @property
    def file(self) -> Path:
        """``study.json`` in the run directory."""
        return self.folder / STUDY_FILE

    @property
    def log(self) -> Path:
        """The ``flwr run --stream`` output of the study."""
        return self.consortium.logs / f"study-{self.study_id}.log"


def read_study(study: Study) -> dict[str, Any]:
    """``study.json``; a missing or damaged file is a FedradError saying what to do."""
    if not study.file.is_file():
        raise FedradError(
            f"no study '{study.study_id}' in {study.consortium.root} ({study.file} does not "
            f"exist); start it with `fedrad study start {study.consortium.root} --study-id "
            f"{study.study_id} ...`."
        )
    try:
        data = json.loads(study.file.read_text())
    except ValueError as exc:
        raise FedradError(
            f"{study.file} is not valid JSON ({exc}): the study record is damaged. Restore it "
            "from a backup; its run directory is left as it is."
        ) from None
    if not isinstance(data, dict) or "status" not in data:
        raise FedradError(f"{study.file} is not a study record (no 'status'); restore it.")
    return data


def list_studies(consortium: Consortium) -> list[Study]:
    """Every study with a ``study.json``, by id."""
    if not consortium.studies.is_dir():
        return []
    return [
        Study(consortium, d.name)
        for d in sorted(consortium.studies.iterdir())
        if (d / STUDY_FILE).is_file()
    ]


def effective_status(record: dict[str, Any]) -> str:
    """The study's status: ``running`` whose ``flwr run`` process is gone is ``interrupted``."""
    status = str(record.get("status", "unknown"))
    pid = record.get("pid")
    if status == "running" and not (isinstance(pid, int) and alive(pid)):
        return "interrupted"
    return status


def resume_command(study: Study) -> str:
    """The command that resumes ``study`` from its last checkpoint."""
    return f"fedrad study start {study.consortium.root} --study-id {study.study_id}"


def interrupted_studies(consortium: Consortium) -> list[tuple[Study, str]]:
    """Studies left running or interrupted (e.g. by a coordinator restart).

    Each comes with its resume command; ``fedrad coordinator start`` prints them.
    """
    found = []
    for study in list_studies(consortium):
        try:
            record = read_study(study)
        except FedradError:
            continue  # fedrad status reports damaged records
        if effective_status(record) == "interrupted":
            found.append((study, resume_command(study)))
    return found


def _run_config_text(values: dict[str, ConfigValue]) -> str:
    """``-c`` text for ``flwr run``: strings quoted, booleans lower case."""
    parts = []
    for key, value in values.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            if "'" in str(value):
                raise FedradError(f"run-config value of '{key}' may not contain a quote: {value}")
            text = f"'{value}'"
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _flwr_env(consortium: Consortium) -> dict[str, str]:
    return {**os.environ, "FLWR_HOME": str(consortium.flwr_home)}


def start_study(
    consortium: Consortium, overrides: dict[str, ConfigValue], *, run_id_timeout: float = 180.0
) -> tuple[Study, dict[str, Any]]:
    """Start (or resume) the study named by ``overrides['study-id']``; return its record.

    Raises a FedradError before anything is started when the consortium is not provisioned,
    the study already completed, or the run directory to resume from is damaged.
    """
    consortium.read_manifest()
    if not (consortium.flwr_home / "config.toml").is_file():
        raise FedradError(
            f"{consortium.flwr_home / 'config.toml'} does not exist: start the coordinator "
            f"first with `fedrad coordinator start {consortium.root}`."
        )
    study_id = str(overrides.get("study-id") or "").strip()
    if not study_id or "/" in study_id or study_id.startswith("."):
        raise FedradError(
            "name the study with --study-id ID (letters, digits, dashes): each site keeps its "
            "privacy budget per study."
        )
    study = Study(consortium, study_id)
    forwarded = {k: v for k, v in overrides.items() if k not in _NOT_FORWARDED}
    resumed_after = 0
    history: list[dict[str, Any]] = []
    if study.file.is_file():
        previous = read_study(study)
        status = effective_status(previous)
        if status == "running":
            raise FedradError(
                f"study '{study_id}' is running (flwr run pid {previous.get('pid')}, run "
                f"{previous.get('run-id')}); follow it with `fedrad status {consortium.root}` "
                f"or stop it with `fedrad study stop {consortium.root} {study_id}`."
            )
        if status not in RESUMABLE:
            raise FedradError(
                f"study '{study_id}' is {status} ({study.file}); start a new study under "
                "another --study-id."
            )
        checkpoint = RunDir(study.folder).resume_point()  # loud when anything is damaged
        resumed_after = checkpoint.round
        forwarded = {**dict(previous.get("config", {})), **forwarded}
        history = list(previous.get("runs", []))
        forwarded["resume-from"] = str(study.folder.resolve())
    elif study.folder.exists() and any(study.folder.iterdir()):
        raise FedradError(
            f"{study.folder} exists without {STUDY_FILE}: it is not a study fedrad started. "
            "Move it away, or choose another --study-id."
        )
    config_values = {k: v for k, v in forwarded.items() if k != "resume-from"}
    values: dict[str, ConfigValue] = {
        **forwarded,
        "out-dir": str(study.folder.resolve()),
    }
    if consortium.node_names.is_file():
        values["node-names"] = str(consortium.node_names.resolve())
    if consortium.audit_key.is_file():  # the ServerApp signs the study's audit trail with it
        load_private_key(consortium.audit_key)  # an old P-384 key fails here, before Flower
        values["audit-key"] = str(consortium.audit_key.resolve())
    # a bad value fails here, before Flower starts; flwr gets each value with its own type
    typed = RunConfig.from_user_config(values).to_user_config()
    values = {k: typed[k] for k in values}
    config_values = {k: typed[k] for k in config_values}
    study.folder.mkdir(parents=True, exist_ok=True)
    app = app_dir()
    offset = study.log.stat().st_size if study.log.is_file() else 0
    launched = start(
        f"study-{study_id}",
        [
            str(_BIN / "flwr"),
            "run",
            str(app),
            CONNECTION,
            "--stream",
            "-c",
            _run_config_text(values),
        ],
        env=_flwr_env(consortium),
        log_dir=consortium.logs,
        cwd=app,
        append=True,
    )
    run_id = ""
    deadline = time.monotonic() + run_id_timeout
    while time.monotonic() < deadline and not run_id:
        found = _RUN_ID.findall(study.log.read_bytes()[offset:].decode(errors="replace"))
        if found:
            run_id = found[-1]
            break
        if launched.proc.poll() is not None:
            raise FedradError(
                f"flwr run exited ({launched.proc.returncode}) before the study started; its "
                f"output ({study.log}):\n{launched.output()[-3000:]}"
            )
        time.sleep(0.5)
    if not run_id:
        launched.stop()
        raise FedradError(
            f"flwr run gave no run id within {run_id_timeout:.0f} s; see {study.log}. Is the "
            f"coordinator running (`fedrad coordinator start {consortium.root}`)?"
        )
    history.append({"run-id": run_id, "started": _now(), "resumed-after-round": resumed_after})
    record = {
        "study-id": study_id,
        "run-id": run_id,
        "status": "running",
        "started": history[0]["started"],
        "config": config_values,
        "run-dir": str(study.folder.resolve()),
        "log": str(study.log),
        "pid": launched.proc.pid,
        "resumed-after-round": resumed_after,
        "runs": history,
    }
    write_json(study.file, record)
    return study, record


def _summary_of_this_run(study: Study, record: dict[str, Any]) -> dict[str, Any] | None:
    """summary.json when it was written by the run ``record`` describes, else None."""
    path = study.folder / SUMMARY_FILE
    if not path.is_file():
        return None
    started = datetime.fromisoformat(str(record["runs"][-1]["started"])).timestamp()
    if path.stat().st_mtime + 1 < started:
        return None  # left by an earlier run of the study
    return dict(read_json(path))


def finish_study(study: Study) -> dict[str, Any]:
    """Once the study's ``flwr run`` ended: set study.json's final status; return the record."""
    record = read_study(study)
    if record.get("status") != "running":
        return record  # stopped by `fedrad study stop`, or already finished
    summary = _summary_of_this_run(study, record)
    if summary is None:
        record["status"] = "interrupted"
        record["reason"] = (
            "the run ended without a summary (coordinator stopped or lost); resume with "
            f"`{resume_command(study)}`"
        )
    else:
        record["status"] = "completed" if summary.get("status") == "completed" else "failed"
        record["reason"] = str(summary.get("reason", ""))
    record["ended"] = _now()
    write_json(study.file, record)
    return record


def stop_study(consortium: Consortium, study_id: str) -> dict[str, Any]:
    """Stop a running study (``flwr stop RUN_ID``), keeping its checkpoints for a resume."""
    study = Study(consortium, study_id)
    record = read_study(study)
    if record.get("status") != "running":
        raise FedradError(
            f"study '{study_id}' is {record.get('status')}, not running; nothing to stop."
        )
    answer = subprocess.run(
        [str(_BIN / "flwr"), "stop", str(record["run-id"]), CONNECTION, "--format", "json"],
        capture_output=True,
        text=True,
        env=_flwr_env(consortium),
        timeout=60,
        check=False,
    )
    pid = record.get("pid")
    if isinstance(pid, int) and alive(pid):
        import signal

        tree = [pid, *descendants(pid)]
        signal_tree(tree, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(alive(p) for p in tree):
            time.sleep(0.2)
        signal_tree([p for p in tree if alive(p)], signal.SIGKILL)
    record["status"] = "stopped"
    record["ended"] = _now()
    record["reason"] = "stopped by the operator (fedrad study stop)"
    record["flwr-stop"] = (answer.stdout or answer.stderr).strip()[-500:]
    write_json(study.file, record)
    return record


# ---------------------------------------------------------------- following a study


def read_rounds(folder: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's complete lines (a line being written is skipped)."""
    path = folder / METRICS_FILE
    if not path.is_file():
        return []
    rounds = []
    for line in path.read_text().splitlines():
        try:
            rounds.append(json.loads(line))
        except ValueError:
            continue
    return rounds


def round_line(record: dict[str, Any], total: int) -> str:
    """One round in words: loss/AUC, the sites that answered, failures by site name."""
    train = record.get("train", {})
    sites = sorted(train.get("sites", {}))
    aggregate = record.get("evaluate", {}).get("aggregate", {})
    parts = [f"round {record.get('round')}/{total} {record.get('status', '?')}"]
    if "auc" in aggregate:
        parts.append(f"val AUC {aggregate['auc']:.3f}")
    if "loss" in aggregate:
        parts.append(f"val loss {aggregate['loss']:.4f}")
    secure = train.get("secure-aggregation")
    if secure:
        parts.append(f"{secure.get('contributors', '?')} site(s) in secure aggregation")
    else:
        parts.append(f"sites: {', '.join(sites) or 'none'}")
    failures = {**train.get("failures", {}), **record.get("evaluate", {}).get("failures", {})}
    if failures:
        parts.append("failures: " + "; ".join(f"{k}: {v}" for k, v in sorted(failures.items())))
    return ", ".join(parts)


def follow_study(study: Study, *, poll: float = 1.0) -> dict[str, Any]:
    """Show the study's rounds as they complete until its ``flwr run`` ends; return the record."""
    from rich.live import Live
    from rich.table import Table

    record = read_study(study)
    total = int(record.get("config", {}).get("num-server-rounds", RunConfig().num_server_rounds))
    pid = int(record["pid"])

    def table() -> Table:
        grid = Table(title=f"study {study.study_id} (run {record['run-id']})", expand=False)
        grid.add_column("round")
        grid.add_column("progress")
        for r in read_rounds(study.folder):
            grid.add_row(f"{r.get('round')}/{total}", round_line(r, total))
        return grid

    with Live(table(), console=console, refresh_per_second=1, transient=False) as live:
        while alive(pid):
            time.sleep(poll)
            live.update(table())
        live.update(table())
    return finish_study(study)


def print_outcome(study: Study, record: dict[str, Any]) -> None:
    """The study's end in words; a model path only when a round was trained."""
    folder = study.folder
    summary = _summary_of_this_run(study, record) if record.get("runs") else None
    rounds = [r for r in read_rounds(folder) if r.get("status") == "completed"]
    model = folder / "model.safetensors"
    if not rounds or not model.is_file():
        out.print(f"study {study.study_id} {record['status']}: no model was trained.")
        failures: dict[str, str] = {}
        for r in read_rounds(folder):
            failures.update(r.get("train", {}).get("failures", {}))
        reason = (summary or {}).get("reason") or record.get("reason") or "no round was run"
        out.print(f"why: {reason}")
        for site, why in sorted(failures.items()):
            out.print(f"  {site}: {why}")
        return
    last = rounds[-1]
    aggregate = last.get("evaluate", {}).get("aggregate", {})
    auc = f"; validation AUC {aggregate['auc']:.3f}" if "auc" in aggregate else ""
    out.print(
        f"study {study.study_id} {record['status']}: {len(rounds)} round(s) trained{auc}; "
        f"global model {model}",
        soft_wrap=True,
    )
    if record.get("reason"):
        out.print(f"reason: {record['reason']}", soft_wrap=True)


# ---------------------------------------------------------------- the command


def _cmd_start(args: argparse.Namespace) -> int:
    consortium = Consortium(Path(args.consortium_dir).expanduser().resolve())
    study, record = start_study(consortium, run_config_overrides(args))
    resumed = record["resumed-after-round"]
    what = f"resumed after round {resumed}" if resumed else "started"
    out.print(
        f"study {study.study_id} {what}: Flower run {record['run-id']}, run directory "
        f"{study.folder}, log {study.log}",
        soft_wrap=True,
    )
    if args.detach:
        out.print(
            f"follow it with `fedrad status {consortium.root}`; stop it with "
            f"`fedrad study stop {consortium.root} {study.study_id}`",
            soft_wrap=True,
        )
        return 0
    try:
        record = follow_study(study)
    except KeyboardInterrupt:
        out.print(
            f"\nthe study goes on on the coordinator; follow it with `fedrad status "
            f"{consortium.root}`",
            soft_wrap=True,
        )
        return 130
    print_outcome(study, record)
    return 0 if record["status"] == "completed" else 1


def _cmd_stop(args: argparse.Namespace) -> int:
    consortium = Consortium(Path(args.consortium_dir).expanduser().resolve())
    record = stop_study(consortium, args.study_id)
    study = Study(consortium, args.study_id)
    done = RunDir(study.folder).latest_round()
    out.print(
        f"study {args.study_id} stopped after {done} checkpointed round(s); resume it with "
        f"`{resume_command(study)}`",
        soft_wrap=True,
    )
    return 0 if record["status"] == "stopped" else 1


def add_parser(sub: Any) -> None:
    """Register ``fedrad study start|stop``."""
    parser = sub.add_parser(
        "study",
        help="start, resume or stop a study on a provisioned consortium's coordinator",
        description=__doc__.split("\n\n")[1],
    )
    commands = parser.add_subparsers(dest="study_command", required=True)
    start_parser = commands.add_parser(
        "start",
        help="start a study (flwr run of the fedrad app), or resume an interrupted one",
        description=(
            "Start the study named by --study-id, writing coordinator/studies/STUDY-ID; a "
            "study that is running, interrupted or stopped resumes from its last checkpoint."
        ),
    )
    start_parser.add_argument(
        "consortium_dir", metavar="CONSORTIUM_DIR", help="the folder `fedrad provision` wrote"
    )
    start_parser.add_argument(
        "--detach", action="store_true", help="return once the run started instead of following"
    )
    add_run_config_options(start_parser, skip=_NOT_FORWARDED)
    start_parser.set_defaults(handler=_cmd_start)
    stop_parser = commands.add_parser(
        "stop",
        help="stop a running study (flwr stop), keeping its checkpoints for a later resume",
    )
    stop_parser.add_argument(
        "consortium_dir", metavar="CONSORTIUM_DIR", help="the folder `fedrad provision` wrote"
    )
    stop_parser.add_argument("study_id", metavar="STUDY_ID", help="the study's --study-id")
    stop_parser.set_defaults(handler=_cmd_stop)
