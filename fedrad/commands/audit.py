"""``fedrad audit verify|show``: check a run's signed audit trail, and summarize the study from it.

``verify RUN_DIR`` checks ``audit.jsonl`` end to end (hashes, signatures, the chain, the end
that summary.json records; :func:`server.audit.verify`) and exits 0 with one OK line, or 1
naming the first bad entry. ``--public-key FILE`` pins the coordinator's key as the auditor
holds it, so that a log re-signed with another key and given a new ``audit.pub`` is caught.
``show RUN_DIR`` prints the study as the trail records it: rounds, sites per round (their
pseudonyms), model hashes, the key metrics and each site's epsilon; it verifies first and
exits 1 when the trail does not check good.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table

from fedrad.commands.cli import out
from privacy.audit_key import load_public_key
from server.audit import Verification, verify

__all__ = ["add_parser", "round_table", "site_epsilon_table"]

_SHORT = 8
"""Hex digits of a hash shown in tables."""
_LISTED_SITES = 4
"""Up to this many sites a round row lists their pseudonyms (first hex digits), beyond it counts."""


def _number(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) else "-"


def _short(value: Any) -> str:
    return str(value)[:_SHORT] if value else "-"


def _sites(sites: list[str]) -> str:
    if len(sites) > _LISTED_SITES:
        return str(len(sites))
    return f"{len(sites)}: " + " ".join(s.removeprefix("anon-")[:4] for s in sites)


def round_table(result: Verification) -> Table:
    """One row per round entry: status, sites, model hash, AUC, accuracy, loss, epsilon."""
    table = Table(title=f"rounds of {result.path.parent}", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("round", "status", "sites", "model", "AUC", "acc.", "loss", "max ε", "fail."):
        left = column in ("status", "sites")
        table.add_column(column, justify="left" if left else "right", no_wrap=column != "sites")
    for entry in result.entries:
        data = entry["data"]
        if entry["event"] == "resume":
            table.add_row("", f"resumed after round {data.get('after-round')}")
            continue
        if entry["event"] != "round":
            continue
        metrics = data.get("metrics") or {}
        spent = [v for v in (data.get("epsilon") or {}).values() if isinstance(v, int | float)]
        if isinstance(data.get("client-level-epsilon"), int | float):
            spent.append(data["client-level-epsilon"])
        table.add_row(
            str(data.get("round")),
            str(data.get("status")),
            _sites(list(data.get("sites") or [])),
            _short(data.get("model-sha256")),
            _number(metrics.get("auc")),
            _number(metrics.get("accuracy")),
            _number(metrics.get("loss")),
            _number(max(spent), 2) if spent else "-",
            str(sum(len(part) for part in (data.get("failures") or {}).values())),
        )
    return table


def site_epsilon_table(result: Verification) -> Table | None:
    """Each site's latest cumulative epsilon and its rounds trained; None without any epsilon."""
    latest: dict[str, float] = {}
    rounds: dict[str, int] = {}
    for entry in result.entries:
        if entry["event"] != "round":
            continue
        for site in entry["data"].get("sites") or []:
            rounds[site] = rounds.get(site, 0) + 1
        for site, epsilon in (entry["data"].get("epsilon") or {}).items():
            latest[site] = epsilon
    if not latest:
        return None
    table = Table(title="epsilon per site (cumulative)", box=box.SIMPLE_HEAD)
    table.add_column("site (pseudonym)")
    table.add_column("ε", justify="right")
    table.add_column("rounds trained", justify="right")
    for site in sorted(latest):
        table.add_row(site, _number(latest[site], 4), str(rounds.get(site, 0)))
    return table


def _study_line(result: Verification) -> str:
    starts = [e for e in result.entries if e["event"] == "run-start"]
    if not starts:
        return "no run-start entry"
    data = starts[-1]["data"]
    config = data.get("config") or {}
    code = (data.get("code") or {}).get("sha256")
    ends = [e["data"] for e in result.entries if e["event"] == "run-end"]
    end = f"; ended {ends[-1].get('status')}" if ends else "; not ended"
    return (
        f"study {config.get('study-id') or '-'}: model {config.get('model')}, strategy "
        f"{config.get('strategy')}, dp {config.get('dp')}, secure aggregation "
        f"{config.get('secure-aggregation')}, {config.get('num-server-rounds')} rounds; config "
        f"{_short(data.get('config-sha256'))}, code {_short(code)}"
        f"; started {starts[0]['time']}{end}"
    )


def _public_key(args: argparse.Namespace) -> Any:
    return load_public_key(Path(args.public_key)) if args.public_key else None


def _cmd_verify(args: argparse.Namespace) -> int:
    result = verify(Path(args.run_dir), public_key=_public_key(args))
    out.print(result.describe(), markup=False, highlight=False, soft_wrap=True)
    return 0 if result.ok else 1


def _cmd_show(args: argparse.Namespace) -> int:
    result = verify(Path(args.run_dir), public_key=_public_key(args))
    out.print(_study_line(result), markup=False, highlight=False, soft_wrap=True)
    out.print(round_table(result))
    epsilon = site_epsilon_table(result)
    if epsilon is not None:
        out.print(epsilon)
    out.print(result.describe(), markup=False, highlight=False, soft_wrap=True)
    return 0 if result.ok else 1


def add_parser(sub: Any) -> None:
    """Register ``fedrad audit verify|show``."""
    parser = sub.add_parser(
        "audit",
        help="verify a run's signed audit trail, or summarize the study it records",
        description=__doc__.split("\n\n")[1],
    )
    commands = parser.add_subparsers(dest="audit_command", required=True, metavar="COMMAND")
    for name, handler, text in (
        ("verify", _cmd_verify, "check RUN_DIR/audit.jsonl; exit 1 naming the first bad entry"),
        ("show", _cmd_show, "a table of the study: rounds, sites, model hashes, metrics, epsilon"),
    ):
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument(
            "run_dir", metavar="RUN_DIR", help="run directory (simulate's, or a study's)"
        )
        command.add_argument(
            "--public-key",
            metavar="FILE",
            help="the coordinator's audit public key (PEM) to pin; default: RUN_DIR/audit.pub",
        )
        command.set_defaults(handler=handler)
