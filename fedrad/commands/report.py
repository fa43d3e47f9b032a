"""``fedrad report RUN_DIR``: regenerate a run's fairness report from what the run stored.

Reads the summed subgroup counts of every evaluation (``RUN_DIR/fairness/round-NNN.json``),
``metrics.jsonl``, ``summary.json`` and ``run.json``, writes ``fairness.json`` and
``report.html`` again (:func:`server.report.write_report`), prints a table of the headline
gaps and a line saying where the files are.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedrad.core.errors import RunDirError
from server.fairness import COUNTS_DIR
from server.report import ReportFiles, write_report
from server.rundir import RUN_FILE

__all__ = ["add_parser", "headline_rows", "run_report"]

out = Console()
_GAPS = (
    ("demographic-parity-difference", "DP diff"),
    ("demographic-parity-ratio", "DP ratio"),
    ("equalized-odds-difference", "EOdds diff"),
    ("equal-opportunity-difference", "EOpp diff"),
)


def add_parser(subparsers: Any) -> None:
    """Add ``fedrad report`` to the command's subcommands."""
    parser = subparsers.add_parser(
        "report",
        help="(re)generate a run's fairness report: fairness.json and report.html",
        description="Regenerate RUN_DIR/fairness.json and RUN_DIR/report.html (one "
        "self-contained page: per-subgroup metrics with confidence intervals, gaps, ROC and "
        "calibration plots, per-site performance, privacy spent, suppressed cells) from the "
        "counts and metrics the run stored, and print the headline gaps.",
    )
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="run directory written by fedrad simulate or flwr run"
    )
    parser.set_defaults(handler=_cmd_report)


def run_report(run_dir: Path) -> ReportFiles:
    """Write the report of ``run_dir``.

    Raises
    ------
    RunDirError
        When ``run_dir`` is not a run directory or holds no fairness counts.
    """
    if not (run_dir / RUN_FILE).is_file():
        what = "does not exist" if not run_dir.exists() else f"has no {RUN_FILE}"
        raise RunDirError(
            f"{run_dir} {what}: it is not a fedrad run directory. Give the folder a run wrote "
            "(the --out of `fedrad simulate`, the out-dir of `flwr run`, e.g. runs/demo/run)."
        )
    files = write_report(run_dir)
    if files is None:
        raise RunDirError(
            f"{run_dir} holds no fairness counts ({run_dir / COUNTS_DIR}/round-NNN.json): no "
            "evaluation of this run returned subgroup counts (it stopped before the first "
            "evaluation, or an older fedrad wrote it). Run the study again with this fedrad "
            "to get a fairness report (README section 'Fairness report')."
        )
    return files


def headline_rows(body: Mapping[str, Any]) -> list[list[str]]:
    """One row per breakdown (and class): its gaps and its worst sensitivity."""
    final = body["final"]
    rows = []
    for family in final["families"]:
        for k, part in family["classes"].items():
            name = family["name"] if len(final["classes"]) == 1 else f"{family['name']} [{k}]"
            gaps = part["gaps"]
            worst = part["worst"].get("sensitivity")
            rows.append(
                [name, str(len(part["groups"]))]
                + ["–" if gaps[g] is None else f"{gaps[g]:.3f}" for g, _ in _GAPS]
                + [f"{worst['value']:.3f} {worst['cell']}" if worst else "–"]
            )
    return rows


def _cmd_report(args: argparse.Namespace) -> int:
    files = run_report(Path(args.run_dir))
    body = json.loads(files.fairness.read_text())
    table = Table(
        title=f"fairness gaps of round {body['final']['round']} (threshold "
        f"{body['final']['threshold']:.2f})"
    )
    for column in ("breakdown", "groups", *(t for _, t in _GAPS), "worst sensitivity"):
        table.add_column(column, justify="left" if column == "breakdown" else "right")
    for row in headline_rows(body):
        table.add_row(*row)
    out.print(table)
    for reason in body["left-out"]:
        out.print(f"left out: {reason}", soft_wrap=True)
    suppressed = len(body["final"]["suppressed"])
    out.print(
        f"wrote {files.fairness} and {files.html} ({suppressed} suppressed cell(s))",
        soft_wrap=True,
    )
    return 0
