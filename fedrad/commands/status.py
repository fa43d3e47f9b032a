"""``fedrad status``: the consortium's sites and studies, as the coordinator sees them.

Sites are named from ``coordinator/state/nodes.json`` (node id to site name, written when their
keys were registered) and their connection from ``flwr supernode ls``: online or offline, and
when. Studies come from ``coordinator/studies/*/study.json`` and their run directories: status
(a running study whose ``flwr run`` is gone shows as interrupted, with its resume command),
the last completed round of the total, its validation metrics, the failures of the last round
by site, and the epsilon each site reported. That epsilon is what the sites told the
coordinator (sample-level DP: each site's cumulative spend in the study; under secure
aggregation the run's client-level epsilon); each site's own ledger is the authority.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.table import Table

from fedrad.commands.cli import out
from fedrad.commands.consortium import CONNECTION, Consortium
from fedrad.commands.study import (
    effective_status,
    list_studies,
    read_rounds,
    read_study,
    resume_command,
    round_line,
)
from fedrad.core.config import RunConfig
from fedrad.core.errors import FedradError

__all__ = ["add_parser", "consortium_status", "site_epsilons"]

_BIN = Path(sys.executable).parent


def _flower_nodes(consortium: Consortium) -> tuple[list[dict[str, Any]], str]:
    """``flwr supernode ls`` of the consortium's connection, or ([], why not)."""
    if not (consortium.flwr_home / "config.toml").is_file():
        return [], f"no {consortium.flwr_home / 'config.toml'} (coordinator never started)"
    try:
        answer = subprocess.run(
            [str(_BIN / "flwr"), "supernode", "ls", CONNECTION, "--format", "json"],
            capture_output=True,
            text=True,
            env={**os.environ, "FLWR_HOME": str(consortium.flwr_home)},
            timeout=60,
            check=False,
        ).stdout
        data = json.loads(answer[answer.index("{") :])
    except (ValueError, subprocess.TimeoutExpired) as exc:
        return [], f"the coordinator's SuperLink did not answer ({type(exc).__name__})"
    if not data.get("success", False):
        return [], f"the coordinator's SuperLink did not answer: {data.get('error-message')}"
    nodes = data.get("nodes")
    return (list(nodes) if isinstance(nodes, list) else []), ""


def _node_names(consortium: Consortium) -> dict[str, str]:
    if not consortium.node_names.is_file():
        return {}
    try:
        return {str(k): str(v) for k, v in json.loads(consortium.node_names.read_text()).items()}
    except (ValueError, AttributeError) as exc:
        raise FedradError(
            f"{consortium.node_names} is not a JSON object of node id to site name ({exc}); "
            f"restart the coordinator with `fedrad coordinator start {consortium.root}`."
        ) from None


def site_epsilons(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """The latest epsilon each site reported in the study's round records.

    Sample-level DP: each site's reply carries its cumulative epsilon in the study. Under
    secure aggregation no per-site reply is seen; the round's client-level epsilon (the same
    for every contributing site) is given under ``client-level``.
    """
    spent: dict[str, float] = {}
    for record in rounds:
        train = record.get("train", {})
        for site, metrics in train.get("sites", {}).items():
            if isinstance(metrics, dict) and isinstance(metrics.get("epsilon"), int | float):
                spent[site] = float(metrics["epsilon"])
        secure = train.get("secure-aggregation") or {}
        if isinstance(secure.get("client-level-epsilon"), int | float):
            spent["client-level"] = float(secure["client-level-epsilon"])
    return spent


def consortium_status(consortium: Consortium) -> dict[str, Any]:
    """The sites and studies of ``consortium`` as one JSON-ready mapping."""
    consortium.read_manifest()
    names = _node_names(consortium)
    nodes, unreachable = _flower_nodes(consortium)
    sites: dict[str, dict[str, Any]] = {}
    for node_id, name in names.items():
        sites[name] = {"node-id": node_id, "status": "unknown" if unreachable else "offline"}
    for node in nodes:
        node_id = str(node.get("node-id"))
        if node.get("status") in ("unregistered",):
            continue
        name = names.get(node_id, f"node-{node_id}")
        seen = node.get("online-at") if node.get("status") == "online" else node.get("offline-at")
        sites[name] = {
            "node-id": node_id,
            "status": str(node.get("status")),
            "last-seen": seen or "",
        }
    if consortium.sites.is_dir():
        for folder in sorted(consortium.sites.iterdir()):
            if folder.is_dir() and folder.name not in sites:
                sites[folder.name] = {"node-id": "", "status": "not registered"}
    studies = []
    for study in list_studies(consortium):
        entry: dict[str, Any] = {"study-id": study.study_id, "run-dir": str(study.folder)}
        try:
            record = read_study(study)
        except FedradError as exc:
            entry.update({"status": "damaged", "error": str(exc)})
            studies.append(entry)
            continue
        rounds = read_rounds(study.folder)
        completed = [r for r in rounds if r.get("status") == "completed"]
        config = record.get("config", {})
        total = int(config.get("num-server-rounds", RunConfig().num_server_rounds))
        status = effective_status(record)
        last = rounds[-1] if rounds else {}
        entry.update(
            {
                "status": status,
                "run-id": record.get("run-id"),
                "round": completed[-1]["round"] if completed else 0,
                "num-server-rounds": total,
                "latest": last.get("evaluate", {}).get("aggregate", {}),
                "last-round": round_line(last, total) if last else "",
                "failures": last.get("train", {}).get("failures", {}),
                "epsilon": site_epsilons(rounds),
            }
        )
        if status == "interrupted":
            entry["resume"] = resume_command(study)
        studies.append(entry)
    return {
        "consortium": str(consortium.root),
        "coordinator": "unreachable: " + unreachable if unreachable else "online",
        "sites": sites,
        "studies": studies,
    }


def _cmd_status(args: argparse.Namespace) -> int:
    consortium = Consortium(Path(args.consortium_dir).expanduser().resolve())
    report = consortium_status(consortium)
    if args.json:
        out.print_json(json.dumps(report))
        return 0
    out.print(f"consortium {report['consortium']}: coordinator {report['coordinator']}")
    sites = Table(title="sites")
    for column in ("site", "node id", "status", "last seen"):
        sites.add_column(column)
    for name, site in sorted(report["sites"].items()):
        sites.add_row(name, site["node-id"], site["status"], site.get("last-seen", ""))
    out.print(sites)
    studies = Table(title="studies")
    for column in ("study", "status", "round", "val AUC", "val loss", "epsilon by site"):
        studies.add_column(column)
    for study in report["studies"]:
        latest = study.get("latest", {})
        studies.add_row(
            study["study-id"],
            study["status"],
            f"{study.get('round', 0)}/{study.get('num-server-rounds', '?')}",
            f"{latest['auc']:.3f}" if "auc" in latest else "",
            f"{latest['loss']:.4f}" if "loss" in latest else "",
            ", ".join(f"{k} {v:.2f}" for k, v in sorted(study.get("epsilon", {}).items())),
        )
    out.print(studies)
    for study in report["studies"]:
        if study.get("failures"):
            failures = "; ".join(f"{k}: {v}" for k, v in sorted(study["failures"].items()))
            out.print(f"{study['study-id']} last round failures: {failures}", soft_wrap=True)
        if study.get("resume"):
            out.print(
                f"{study['study-id']} was interrupted; resume it with `{study['resume']}`",
                soft_wrap=True,
            )
        if study.get("error"):
            out.print(f"{study['study-id']}: {study['error']}", soft_wrap=True)
    return 0


def add_parser(sub: Any) -> None:
    """Register ``fedrad status``."""
    parser = sub.add_parser(
        "status",
        help="sites (online/offline, last seen) and studies (round, metrics, epsilon by site)",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument(
        "consortium_dir", metavar="CONSORTIUM_DIR", help="the folder `fedrad provision` wrote"
    )
    parser.add_argument("--json", action="store_true", help="print the status as JSON")
    parser.set_defaults(handler=_cmd_status)
