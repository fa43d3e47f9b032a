"""``fedrad site log SITE_DIR``: every reply this site sent, from its own hash-chained log.

The site writes one line per reply before sending it (:mod:`client.sent_log`); this command
lists them (round, kind, bytes, content hash, epsilon, what was withheld), checks the chain and
says plainly whether the log was edited (exit 1 when it was). ``--json`` prints every field,
the time of each reply included, for machines. Where the log is:

- a site folder from ``fedrad provision`` (with ``site.toml``): under its node config's
  ``ledger-dir`` (default ``~/.local/share/fedrad/ledger``);
- a folder of a simulated consortium (``fedrad synth``; its parent holds ``.fedrad-ledger``):
  under ``SITES_DIR/.fedrad-ledger``;
- any other data folder: under the default ledger folder.

``--ledger-dir`` and ``--site-id`` (the node-config keys of those names) override either.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from client.sent_log import SentLog, read_sent_log, sent_log_path
from client.site import resolve_site, simulation_ledger_root
from fedrad.commands.consortium import SiteFolder, read_site_settings
from fedrad.core.config import NodeConfig
from fedrad.core.errors import FedradError

__all__ = ["add_parser", "locate_sent_log", "run_site_log"]

out = Console()
err = Console(stderr=True)
SHOWN = 3  # withheld statistics named per table cell; --json has them all
HASH_SHOWN = 12


def add_parser(subparsers: Any) -> None:
    """Add ``log`` to the ``fedrad site`` group (made by :mod:`fedrad.commands.site_check`)."""
    site = subparsers.choices["site"]
    commands = next(a for a in site._actions if isinstance(a, argparse._SubParsersAction))
    log = commands.add_parser(
        "log",
        help="list every reply this site sent, from its local hash-chained log",
        description="List every reply the site sent (time, round, kind, bytes, content hash, "
        "epsilon after it, statistics withheld), from the log the site writes before each "
        "reply, and check the log's hash chain. Exit 0 when the log is intact (or empty), 1 "
        "when it was edited.",
    )
    log.add_argument(
        "site_dir",
        metavar="SITE_DIR",
        help="the site folder (site.toml), or a site's data folder (e.g. runs/demo/sites/site-1)",
    )
    log.add_argument("--json", action="store_true", help="print the log as JSON for machines")
    log.add_argument(
        "--ledger-dir", default="", help="the site's ledger folder (node config ledger-dir)"
    )
    log.add_argument("--site-id", default="", help="the site's name (node config site-id)")
    log.set_defaults(handler=run_site_log)


def locate_sent_log(site_dir: Path, *, ledger_dir: str = "", site_id: str = "") -> tuple[str, Path]:
    """The site id and sent log of ``site_dir``, found as the site's node finds its ledgers."""
    site_dir = site_dir.expanduser().resolve()
    if SiteFolder(site_dir).config.is_file():
        node = read_site_settings(site_dir).node_config
    elif simulation_ledger_root(site_dir.parent).is_dir():
        node = NodeConfig(
            data_dir=str(site_dir), ledger_dir=str(simulation_ledger_root(site_dir.parent))
        )
    elif site_dir.is_dir():
        node = NodeConfig(data_dir=str(site_dir))
    else:
        raise FedradError(
            f"{site_dir} is not a folder: give the site folder (with site.toml) or the site's "
            "data folder."
        )
    if ledger_dir:
        node = dataclasses.replace(node, ledger_dir=ledger_dir)
    if site_id:
        node = dataclasses.replace(node, site_id=site_id)
    site = resolve_site(node, sites_dir="")
    return site.site_id, sent_log_path(site.ledger_root, site_id=site.site_id)


def run_site_log(args: argparse.Namespace) -> int:
    """Handle ``fedrad site log``; return 0 when the log is intact, 1 when it was edited."""
    site_id, path = locate_sent_log(
        Path(args.site_dir), ledger_dir=args.ledger_dir, site_id=args.site_id
    )
    sent = read_sent_log(path)
    if args.json:
        sys.stdout.write(json.dumps(_document(site_id, sent), indent=2, sort_keys=True) + "\n")
    else:
        _print(site_id, sent)
    return 0 if sent.intact else 1


def _document(site_id: str, sent: SentLog) -> dict[str, object]:
    return {
        "site_id": site_id,
        "log": str(sent.path),
        "replies": list(sent.entries),
        "intact": sent.intact,
        "problem": sent.problem or None,
        "bad_line": sent.bad_line,
    }


def _print(site_id: str, sent: SentLog) -> None:
    if not sent.entries and sent.intact:
        out.print(f"{site_id} has sent no reply yet: no line in {sent.path}", soft_wrap=True)
        return
    table = Table(title=f"replies sent by {site_id}")
    for column in ("#", "round", "kind", "bytes", "sha256", "epsilon"):
        table.add_column(
            column,
            justify="right" if column in ("#", "round", "bytes") else "left",
            no_wrap=column != "kind",
            min_width=HASH_SHOWN if column == "sha256" else None,
        )
    table.add_column("suppressed", overflow="fold")
    for entry in sent.entries:
        table.add_row(*_row(entry))
    out.print(table)
    last = sent.entries[-1].get("hash") if sent.entries else ""
    if sent.intact:
        out.print(
            f"{len(sent.entries)} replies listed from {sent.path}; the hash chain is intact "
            f"(last hash {last})",
            soft_wrap=True,
        )
    else:
        out.print(
            f"[bold red]THE LOG WAS EDITED:[/] {sent.problem}. {len(sent.entries)} line(s) read "
            f"from {sent.path}; do not trust what it says from line {sent.bad_line} on.",
            soft_wrap=True,
        )


def _row(entry: dict[str, Any]) -> list[str]:
    kind = str(entry.get("kind", "?"))
    if entry.get("error_code") is not None:
        kind = f"error {entry['error_code']} ({entry.get('message_type', '?')})"
    epsilon = entry.get("epsilon")
    suppressed = entry.get("suppressed") or []
    return [
        str(entry.get("seq", "?")),
        "-" if entry.get("round") is None else str(entry["round"]),
        kind,
        str(entry.get("bytes", "?")),
        str(entry.get("sha256", ""))[:HASH_SHOWN],
        f"{epsilon:.4f}" if isinstance(epsilon, int | float) else "-",
        _short([str(s) for s in suppressed]) if isinstance(suppressed, list) else "?",
    ]


def _short(values: Sequence[str]) -> str:
    """``a, b, c +4 more``: a list for one table cell."""
    head = ", ".join(values[:SHOWN])
    return head + (f" +{len(values) - SHOWN} more" if len(values) > SHOWN else "") or "-"
