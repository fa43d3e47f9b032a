"""The ``import-npz`` subcommand: options, and the rich summary it prints."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fedrad.npz_import.dicom import MODALITIES
from fedrad.npz_import.importer import MANIFEST_FILE, FolderSummary, ImportSummary, import_npz
from fedrad.npz_import.partition import SCHEMES


def add_parser(subparsers: Any) -> None:
    """Add ``import-npz`` to ``subparsers`` (from ``ArgumentParser.add_subparsers``)."""
    import fedrad.npz_import as package

    parser = subparsers.add_parser(
        "import-npz",
        help="turn a MedMNIST .npz archive into DICOM site folders",
        description=package.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", metavar="FILE.npz", help="MedMNIST-format archive")
    parser.add_argument(
        "out_dir", metavar="OUT_DIR", help="folder to write site-1..N and holdout/<split> into"
    )
    parser.add_argument("--sites", type=int, default=4, help="number of sites (default 4)")
    parser.add_argument(
        "--split",
        choices=SCHEMES,
        default="iid",
        help="how samples are divided over sites (default iid)",
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="Dirichlet concentration of dirichlet and size; smaller is more skewed (default 0.5)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed; same seed, same files")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="fraction of each site's samples marked val (default 0.2)",
    )
    parser.add_argument(
        "--kind",
        choices=("2d", "3d"),
        default=None,
        help="override the kind detected from the image shape",
    )
    parser.add_argument(
        "--modality",
        choices=MODALITIES,
        default="OT",
        type=str.upper,
        help="DICOM Modality written (default OT; CT is refused, see above)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier import-npz output in OUT_DIR"
    )
    parser.set_defaults(handler=run_import)


def run_import(args: argparse.Namespace) -> int:
    """Run ``import-npz`` from parsed arguments, print its summary; return the exit code."""
    started = time.perf_counter()
    summary = import_npz(
        Path(args.file),
        Path(args.out_dir),
        sites=args.sites,
        split=args.split,
        alpha=args.alpha,
        seed=args.seed,
        val_fraction=args.val_fraction,
        kind=args.kind,
        modality=args.modality,
        overwrite=args.overwrite,
    )
    print_summary(summary, seconds=time.perf_counter() - started, console=Console())
    return 0


def print_summary(summary: ImportSummary, *, seconds: float, console: Console) -> None:
    """Print one table row per folder and a one-line summary of what was written where."""
    table = Table(
        title=f"{summary.source.name} ({summary.kind}, split {summary.split}) in {summary.out_dir}"
    )
    for column in ("folder", "from", "samples", "train", "val", "test", "per class", "files"):
        table.add_column(column, justify="left" if column in ("folder", "from") else "right")
    for folder in (*summary.sites, *summary.holdouts):
        table.add_row(*_row(folder))
    console.print(table)
    samples = sum(s.n_samples for s in summary.sites)
    holdouts = ", ".join(f"{h.name} ({h.n_samples})" for h in summary.holdouts)
    console.print(
        f"wrote {len(summary.sites)} site folder(s) with {samples} samples"
        + (f" and holdout folder(s) {holdouts}" if holdouts else "")
        + f", {summary.n_files} DICOM files, to {summary.out_dir} in {seconds:.1f} s "
        f"(summary in {summary.out_dir / MANIFEST_FILE})",
        soft_wrap=True,
    )


def _row(folder: FolderSummary) -> tuple[str, ...]:
    splits = dict(folder.split_counts)
    classes = " ".join(f"{c}:{n}" for c, n in enumerate(folder.class_counts))
    return (
        folder.name,
        folder.source_split,
        str(folder.n_samples),
        *(str(splits.get(s, 0)) for s in ("train", "val", "test")),
        classes,
        str(folder.n_files),
    )
