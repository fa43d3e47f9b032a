"""The run's fairness report: ``fairness.json`` for machines, ``report.html`` for reviewers.

Built only from what the run directory stores (``fairness/round-NNN.json``, see
:mod:`server.fairness`; ``metrics.jsonl``, ``summary.json`` and ``run.json``), so
``fedrad report RUN_DIR`` regenerates both at any time. Next to the last evaluation's full
subgroup report (``final``) and each evaluation's gaps and subgroup AUCs (``rounds``),
``fairness.json`` holds the run's header, the privacy each site spent and each site's pooled
performance over the rounds where the coordinator could tell the sites apart; ``left-out``
says which views are missing and why (secure aggregation hides single sites, DP noises every
count). The page is drawn by :mod:`server.report_page`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrad.core.durable import write_atomic
from server.fairness import read_counts, report_of_round
from server.report_page import render_page
from server.rundir import RUN_FILE, SUMMARY_FILE, RunDir, read_json, write_json

__all__ = [
    "FAIRNESS_FILE",
    "REPORT_FILE",
    "SITE_METRICS",
    "ReportFiles",
    "build_fairness",
    "privacy_spent",
    "site_performance",
    "write_report",
]

FAIRNESS_FILE = "fairness.json"
REPORT_FILE = "report.html"
SITE_METRICS = ("auc", "sensitivity", "specificity", "accuracy", "loss", "num-examples")
"""The pooled metrics of a site's evaluation that the report follows over the rounds."""

_CONFIG_SHOWN = (
    "model",
    "strategy",
    "study-id",
    "target-epsilon",
    "fairness-attributes",
    "fairness-intersections",
)


@dataclass(frozen=True)
class ReportFiles:
    """Where :func:`write_report` wrote the report."""

    fairness: Path
    html: Path


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return None if math.isnan(float(value)) else float(value)


def _read_optional(path: Path) -> dict[str, Any]:
    return dict(read_json(path)) if path.is_file() else {}


def _header(
    run_dir: Path, final: Mapping[str, Any], records: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Status, rounds, threshold, DP and secure aggregation of the run."""
    run = _read_optional(run_dir / RUN_FILE)
    config = dict(run.get("config") or {})
    summary = _read_optional(run_dir / SUMMARY_FILE)
    completed = sum(1 for r in records if r.get("status") == "completed")
    header: dict[str, Any] = {
        "run": run_dir.name,
        "status": summary.get("status", "running"),
        "reason": summary.get("reason", ""),
        "rounds-completed": summary.get("rounds-completed", completed),
        "num-server-rounds": summary.get("num-server-rounds", config.get("num-server-rounds")),
        "evaluated-round": final["round"],
        "threshold": final["threshold"],
        "dp": config.get("dp", final.get("dp", "off")),
        "secure-aggregation": bool(config.get("secure-aggregation", False)),
        "started": run.get("started"),
    }
    for key in _CONFIG_SHOWN:
        if key in config and (key != "target-epsilon" or header["dp"] != "off"):
            header[key] = config[key]
    return header


def privacy_spent(
    records: Sequence[Mapping[str, Any]], *, dp: str, secure_aggregation: bool, sites: Sequence[str]
) -> dict[str, Any]:
    """The epsilon each site spent, as the round records tell it.

    Sample-level DP: each site's training reply carries its cumulative epsilon in the study.
    Client-level DP (under SecAgg+): the planned client-level epsilon of the rounds so far,
    the same for every site that took part in each round (``sites``, from ``run.json``).
    """
    spent: dict[str, dict[str, Any]] = {}
    series: dict[str, list[list[float]]] = {}
    for record in records:
        server_round = int(record["round"])
        train = record.get("train") or {}
        for site, metrics in sorted((train.get("sites") or {}).items()):
            epsilon = _number(metrics.get("epsilon")) if isinstance(metrics, Mapping) else None
            if epsilon is None:
                continue
            spent[site] = {
                "epsilon": epsilon,
                "delta": _number(metrics.get("delta")),
                "round": server_round,
                "kind": "sample-level, cumulative in the study (reported by the site)",
            }
            series.setdefault(site, []).append([server_round, epsilon])
        secure = train.get("secure-aggregation") or {}
        client = _number(secure.get("client-level-epsilon"))
        if client is not None:
            for site in sites:
                spent[site] = {
                    "epsilon": client,
                    "delta": _number(secure.get("client-level-delta")),
                    "round": server_round,
                    "kind": "client-level, planned (a site in every round spends this)",
                }
                series.setdefault(site, []).append([server_round, client])
    left_out: list[str] = []
    if dp != "off" and not spent:
        left_out.append(
            "privacy spent per site: under secure aggregation the coordinator sees no single "
            "site's reply; each site's ledger holds its spend (`fedrad site log SITE_DIR`)"
            if secure_aggregation
            else "privacy spent per site: no site reported an epsilon (no DP round completed)"
        )
    return {"dp": dp, "sites": spent, "series": series, "left-out": left_out}


def _pooled_point(model_round: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
    point: dict[str, Any] = {"round": model_round}
    for key in SITE_METRICS:
        if (value := _number(metrics.get(key))) is not None:
            point[key] = value
    return point


def site_performance(
    records: Sequence[Mapping[str, Any]],
    *,
    dp: str,
    secure_aggregation: bool,
    final: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Each site's pooled evaluation over the rounds, and the pooled one of all sites.

    A point's ``round`` is the round of the model evaluated (a secure round evaluates the
    model it starts from). ``final`` is the summary's final secure evaluation, if any.
    """
    sites: dict[str, list[dict[str, Any]]] = {}
    pooled: list[dict[str, Any]] = []
    for record in records:
        evaluate = record.get("evaluate") or {}
        model_round = int(evaluate.get("model-round", record["round"]))
        if evaluate.get("aggregate"):
            pooled.append(_pooled_point(model_round, evaluate["aggregate"]))
        for site, metrics in sorted((evaluate.get("sites") or {}).items()):
            if isinstance(metrics, Mapping):
                sites.setdefault(site, []).append(_pooled_point(model_round, metrics))
    if final and final.get("aggregate") and isinstance(final.get("model-round"), int):
        if all(p["round"] != final["model-round"] for p in pooled):
            pooled.append(_pooled_point(final["model-round"], final["aggregate"]))
    left_out: list[str] = []
    if secure_aggregation:
        left_out.append(
            "per-site performance over rounds: under secure aggregation the coordinator "
            "receives only the sum of the sites' evaluation counts"
        )
    elif not sites:
        left_out.append("per-site performance over rounds: no round recorded a site's evaluation")
    notes = ["computed from noised evaluation counts (DP)"] if dp != "off" and sites else []
    return {"sites": sites, "pooled": pooled, "left-out": left_out, "notes": notes}


def build_fairness(run_dir: Path) -> dict[str, Any] | None:
    """The report's machine-readable body, or None when the run kept no fairness counts."""
    run_dir = Path(run_dir)
    stored = read_counts(run_dir)
    if not stored:
        return None
    rounds = [report_of_round(s) for s in stored]
    final = rounds[-1]
    records = RunDir(run_dir).read_metrics()
    header = _header(run_dir, {**final, "dp": stored[-1]["dp"]}, records)
    run_sites = list(_read_optional(run_dir / RUN_FILE).get("sites") or [])
    privacy = privacy_spent(
        records,
        dp=header["dp"],
        secure_aggregation=header["secure-aggregation"],
        sites=run_sites,
    )
    summary = _read_optional(run_dir / SUMMARY_FILE)
    performance = site_performance(
        records,
        dp=header["dp"],
        secure_aggregation=header["secure-aggregation"],
        final=summary.get("final-evaluation"),
    )
    return {
        "schema": 1,
        "run": header,
        "final": final,
        "rounds": [
            {
                "round": r["round"],
                "gaps": {
                    f["name"]: {k: body["gaps"] for k, body in f["classes"].items()}
                    for f in r["families"]
                },
                "auc": {
                    f["name"]: {
                        k: {g["cell"]: g["auc"]["value"] for g in body["groups"]}
                        for k, body in f["classes"].items()
                    }
                    for f in r["families"]
                },
            }
            for r in rounds
        ],
        "privacy": privacy,
        "site-performance": performance,
        "left-out": [*final["left-out"], *performance["left-out"], *privacy["left-out"]],
    }


def write_report(run_dir: Path) -> ReportFiles | None:
    """Write ``fairness.json`` and ``report.html`` into ``run_dir``; None: nothing to report."""
    run_dir = Path(run_dir)
    body = build_fairness(run_dir)
    if body is None:
        return None
    files = ReportFiles(fairness=run_dir / FAIRNESS_FILE, html=run_dir / REPORT_FILE)
    write_json(files.fairness, body)
    write_atomic(files.html, render_page(body).encode("utf-8"))
    return files
