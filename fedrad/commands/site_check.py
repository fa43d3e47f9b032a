"""``fedrad site check DATA_DIR``: can a hospital folder join a federation, and what is in it.

Scans every file (:func:`client.scan.scan_folder`: accepted, quarantined with a reason,
duplicates), then matches ``labels.csv`` against the accepted files (label coverage), counts
classes over labelled usable samples and subgroups over accepted files. The terminal shows
summary tables; ``--json FILE`` holds every file. The report stays at the site: it holds paths,
UIDs and counts, never patient names or IDs.
"""

from __future__ import annotations

import argparse
import json
import os
import posixpath
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from client.labels import LABELS_FILE, LabelRow, assign_split, read_labels
from client.scan import (
    DEFAULT_MAX_BYTES,
    REASON_HELP,
    AcceptedFile,
    QuarantinedFile,
    ScanReport,
    scan_folder,
)
from fedrad.core.errors import DataError, FedradError

out = Console()
err = Console(stderr=True)
SHOWN = 3  # paths or ids shown per table cell; the JSON report has them all
REPORT_FORMAT = "fedrad-site-check/1"


@dataclass
class LabelCoverage:
    """How ``labels.csv`` matches the accepted files."""

    status: str  # "ok", "missing" or "invalid"
    message: str
    samples: list[tuple[LabelRow, list[AcceptedFile]]]
    without_images: list[LabelRow]
    quarantined: list[tuple[LabelRow, str]]  # a labelled path that was quarantined, and why
    images_without_labels: list[str]


def _positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def add_parser(subparsers: Any) -> None:
    """Add ``site`` with its ``check`` subcommand to the ``fedrad`` command's subparsers."""
    site = subparsers.add_parser(
        "site",
        help="inspect a hospital's data folder",
        description="Inspect a hospital's data folder before it joins a federation.",
    )
    commands = site.add_subparsers(dest="site_command", required=True, metavar="COMMAND")
    check = commands.add_parser(
        "check",
        help="scan DATA_DIR: usable and quarantined files, duplicates, labels",
        description="Scan every file of DATA_DIR: accepted files (by modality, shape, series), "
        "quarantined files with a reason, duplicates, label coverage, class balance and "
        "subgroup counts. Exit 0 when at least one labelled sample is usable, 2 otherwise.",
    )
    check.add_argument(
        "data_dir", metavar="DATA_DIR", help="site folder: DICOM files and labels.csv"
    )
    check.add_argument(
        "--json", metavar="FILE", help="also write the full report, every file, to FILE"
    )
    check.add_argument(
        "--workers",
        type=_positive(int),
        default=min(4, os.cpu_count() or 1),
        help="worker processes decoding files (default: CPUs, at most 4)",
    )
    check.add_argument(
        "--timeout",
        type=_positive(float),
        default=20.0,
        help="seconds one file may take before it is quarantined (default 20)",
    )
    check.add_argument(
        "--max-mb",
        type=_positive(float),
        default=DEFAULT_MAX_BYTES / 2**20,
        help="larger files are quarantined unread (default 256)",
    )
    check.set_defaults(handler=run_site_check)


def run_site_check(args: argparse.Namespace) -> int:
    """Handle ``fedrad site check``; return the exit code (0 usable, 2 not usable)."""
    try:
        return _site_check(args)
    except FedradError as exc:
        err.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        return 2


def _site_check(args: argparse.Namespace) -> int:
    site_dir = Path(args.data_dir)
    if not site_dir.is_dir():
        raise DataError(
            f"Site data folder {site_dir} does not exist or is not a folder; give the folder "
            "that holds the site's DICOM files and labels.csv (e.g. the PACS export)."
        )
    with Progress(console=err, transient=True, disable=not err.is_terminal) as progress:
        task = progress.add_task("checking files", total=None)
        scan = scan_folder(
            site_dir,
            workers=args.workers,
            timeout_s=args.timeout,
            max_bytes=int(args.max_mb * 2**20),
            on_progress=lambda done, total: progress.update(task, completed=done, total=total),
        )
    coverage = label_coverage(site_dir, scan)
    report = site_report(scan, coverage)
    _print_report(report)
    if args.json:
        target = Path(args.json)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    problem = _unusable(scan, coverage)
    if problem:
        err.print(f"[bold red]not usable:[/] {problem}", soft_wrap=True)
    out.print(_summary_line(site_dir, scan, coverage, args.json), soft_wrap=True)
    return 2 if problem else 0


def label_coverage(site_dir: Path, scan: ScanReport) -> LabelCoverage:
    """Match each labels.csv id (path, SeriesInstanceUID or StudyInstanceUID) to accepted files.

    A study id stands for its largest series, as when the site's dataset is loaded.
    """
    try:
        rows = read_labels(site_dir)
    except DataError as exc:
        status = "invalid" if (site_dir / LABELS_FILE).is_file() else "missing"
        return LabelCoverage(status, str(exc), [], [], [], [a.path for a in scan.accepted])
    by_path = {a.path: a for a in scan.accepted}
    by_path.update({dup: by_path[original] for dup, original in scan.duplicates})
    quarantined = {q.path: q.reason for q in scan.quarantined}
    series, studies = _groups(scan.accepted)
    coverage = LabelCoverage("ok", f"{len(rows)} row(s)", [], [], [], [])
    for row in rows:
        key = posixpath.normpath(row.id.replace("\\", "/"))
        files = (
            [by_path[key]]
            if key in by_path
            else series.get(row.id) or _largest_series(studies.get(row.id, []))
        )
        if files:
            coverage.samples.append((row, files))
        elif key in quarantined:
            coverage.quarantined.append((row, quarantined[key]))
        else:
            coverage.without_images.append(row)
    used = {f.path for _, files in coverage.samples for f in files}
    coverage.images_without_labels = [a.path for a in scan.accepted if a.path not in used]
    return coverage


def _groups(
    accepted: Iterable[AcceptedFile],
) -> tuple[dict[str, list[AcceptedFile]], dict[str, list[AcceptedFile]]]:
    series: dict[str, list[AcceptedFile]] = defaultdict(list)
    studies: dict[str, list[AcceptedFile]] = defaultdict(list)
    for file in accepted:
        if file.series_uid:
            series[file.series_uid].append(file)
        if file.study_uid:
            studies[file.study_uid].append(file)
    return series, studies


def _largest_series(files: list[AcceptedFile]) -> list[AcceptedFile]:
    by_series: dict[str, list[AcceptedFile]] = defaultdict(list)
    for file in files:
        by_series[file.series_uid].append(file)
    return max(sorted(by_series.items()), key=lambda item: len(item[1]), default=("", []))[1]


def _shape(file: AcceptedFile) -> str:
    frames = [file.frames] if file.frames > 1 else []
    samples = [file.samples_per_pixel] if file.samples_per_pixel > 1 else []
    return "x".join(map(str, [*frames, file.rows, file.columns, *samples]))


def _age_band(age_years: int | None) -> str:
    from client.dataset import age_band  # imports torch: only when a report is built

    return age_band(age_years)


def _subgroups(accepted: list[AcceptedFile]) -> dict[str, dict[str, int]]:
    """Count accepted files per sex, age band, manufacturer and modality."""
    values: dict[str, Callable[[AcceptedFile], str]] = {
        "sex": lambda f: f.sex if f.sex in ("M", "F") else "unknown",
        "age-band": lambda f: _age_band(f.age_years),
        "manufacturer": lambda f: f.manufacturer or "unknown",
        "modality": lambda f: f.modality,
    }
    return {
        name: dict(sorted(Counter(map(value, accepted)).items())) for name, value in values.items()
    }


def _by_modality(accepted: list[AcceptedFile]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = {}
    for modality in sorted({f.modality for f in accepted}):
        files = [f for f in accepted if f.modality == modality]
        result[modality] = {
            "files": len(files),
            "series": len({f.series_uid for f in files}),
            "shapes": dict(Counter(map(_shape, files)).most_common()),
        }
    return result


def _by_reason(scan: ScanReport) -> dict[str, dict[str, Any]]:
    files: dict[str, list[QuarantinedFile]] = defaultdict(list)
    for file in scan.quarantined:
        files[file.reason].append(file)
    return {
        reason: {
            "files": len(files[reason]),
            "help": REASON_HELP[reason],
            "example": f"{files[reason][0].path}: {files[reason][0].detail}",
            "paths": [f.path for f in files[reason]],
        }
        for reason in sorted(files, key=lambda r: (-len(files[r]), r))
    }


def site_report(scan: ScanReport, coverage: LabelCoverage) -> dict[str, Any]:
    """Return the whole report as JSON-ready data: summaries first, then every file."""
    labelled = [row for row, _ in coverage.samples]
    files = scan.to_dict()
    return {
        "format": REPORT_FORMAT,
        "site-dir": files.pop("site-dir"),
        "counts": files.pop("counts"),
        "accepted-by-modality": _by_modality(scan.accepted),
        "quarantined-by-reason": _by_reason(scan),
        "labels": {
            "status": coverage.status,
            "message": coverage.message,
            "usable-samples": len(coverage.samples),
            "labels-without-images": [
                {"id": r.id, "line": r.line} for r in coverage.without_images
            ],
            "labelled-but-quarantined": [
                {"id": r.id, "line": r.line, "reason": reason} for r, reason in coverage.quarantined
            ],
            "images-without-labels": coverage.images_without_labels,
        },
        "class-balance": {str(k): v for k, v in sorted(Counter(r.label for r in labelled).items())},
        "splits": dict(sorted(Counter(r.split or assign_split(r.id) for r in labelled).items())),
        "subgroups": _subgroups(scan.accepted),
        **files,
    }


def _unusable(scan: ScanReport, coverage: LabelCoverage) -> str:
    """Say why the folder cannot be used for training, and how to fix it; '' when it can."""
    total = len(scan.accepted) + len(scan.quarantined) + len(scan.duplicates)
    if total == 0:
        return (
            f"{scan.site_dir} holds no files (hidden files and labels.csv are not scanned); "
            "copy the DICOM export into it."
        )
    if not scan.accepted:
        return (
            f"none of the {total} file(s) is usable; see the quarantine reasons above and "
            "re-export the images from the PACS as uncompressed or JPEG DICOM."
        )
    if coverage.status != "ok":
        return f"no labels: {coverage.message}"
    if not coverage.samples:
        return (
            f"no row of {LABELS_FILE} names an accepted file, series or study; fix the ids "
            "(paths relative to the folder, SeriesInstanceUIDs or StudyInstanceUIDs)."
        )
    return ""


def _summary_line(
    site_dir: Path, scan: ScanReport, coverage: LabelCoverage, json_path: str | None
) -> str:
    where = f"full report in {json_path}" if json_path else "add --json FILE for every file"
    return (
        f"site check of {site_dir}: {len(scan.accepted)} accepted, {len(scan.quarantined)} "
        f"quarantined, {len(scan.duplicates)} duplicate(s); {len(coverage.samples)} labelled "
        f"sample(s) usable; {where}"
    )


def _first(items: list[str]) -> str:
    more = f" (+{len(items) - SHOWN} more)" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def _table(title: str, columns: tuple[str, ...], rows: Iterable[tuple[object, ...]]) -> Table:
    table = Table(title=title, title_justify="left")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*map(str, row))
    return table


def _print_report(report: dict[str, Any]) -> None:
    """Print the summary tables (the JSON report has every file)."""
    counts = report["counts"]
    out.print(
        _table(
            f"files in {report['site-dir']}",
            ("files", "accepted", "quarantined", "duplicates"),
            [tuple(counts[k] for k in ("files", "accepted", "quarantined", "duplicates"))],
        )
    )
    out.print(
        _table(
            "accepted, by modality",
            ("modality", "files", "series", "shapes"),
            [
                (m, s["files"], s["series"], _first([f"{k} ({n})" for k, n in s["shapes"].items()]))
                for m, s in report["accepted-by-modality"].items()
            ],
        )
    )
    if report["quarantined-by-reason"]:
        out.print(
            _table(
                "quarantined, by reason",
                ("reason", "files", "first files", "example"),
                [
                    (reason, q["files"], _first(q["paths"]), q["example"])
                    for reason, q in report["quarantined-by-reason"].items()
                ],
            )
        )
    if report["duplicates"]:
        pairs = [f"{d['path']} = {d['duplicate-of']}" for d in report["duplicates"]]
        out.print(f"duplicates (counted once): {len(pairs)}: {_first(pairs)}", soft_wrap=True)
    labels = report["labels"]
    out.print(
        _table(
            f"labels ({LABELS_FILE}: {labels['status']})",
            ("check", "count", "first"),
            [
                ("usable labelled samples", labels["usable-samples"], ""),
                (
                    "labels without images",
                    len(labels["labels-without-images"]),
                    _first(
                        [f"{r['id']} (line {r['line']})" for r in labels["labels-without-images"]]
                    ),
                ),
                (
                    "labelled but quarantined",
                    len(labels["labelled-but-quarantined"]),
                    _first(
                        [f"{r['id']} ({r['reason']})" for r in labels["labelled-but-quarantined"]]
                    ),
                ),
                (
                    "images without labels",
                    len(labels["images-without-labels"]),
                    _first(labels["images-without-labels"]),
                ),
            ],
        )
    )
    total = sum(report["class-balance"].values()) or 1
    out.print(
        _table(
            "class balance (labelled usable samples)",
            ("label", "samples", "share"),
            [(label, n, f"{n / total:.0%}") for label, n in report["class-balance"].items()],
        )
    )
    out.print(
        _table(
            "subgroups (accepted files)",
            ("attribute", "value", "files"),
            [
                (name, value, n)
                for name, counts_ in report["subgroups"].items()
                for value, n in counts_.items()
            ],
        )
    )
