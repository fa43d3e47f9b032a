"""Scale: wall time per round and peak memory as the number of sites grows.

Prints one row per consortium size: on Flower's simulation engine (``fedrad simulate``, one CPU
per site, so two sites train at a time on a 2-core machine) with 10, 50 and 100 sites, and on
the deployment engine (a TLS SuperLink with node authentication and one SuperNode per site on
loopback, ``deploy/local.py``, each site with its warm worker) with 10 site nodes. Every site
trains the small workload (cnn at 32 px, one local epoch, 20 images per site) for 3 rounds.
Columns: rounds completed, median seconds of rounds 2..N (round 1 also decodes the data and
starts the engine), seconds per site of that round, the whole command's wall time, and the
peak PSS of all processes together (``bench/_memory.py``, sampled once a second). A closing
line fits round time and peak memory to ``a + b x sites`` over the simulated rows.

    python bench/scale.py [--sites 10 50 100] [--deployment-sites 10] [--rounds 3]
    python bench/scale.py --sites 2 --deployment-sites 0 --rounds 2   # a quick check
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from _deployment import Workload, measure_deployment  # bench/ is the script's folder
from _memory import PeakMemory
from rich.console import Console
from rich.table import Table

from fedrad.synth import SynthConfig, write_consortium

CONSOLE = Console(width=160)  # full tables also when piped to a file or CI log
SMALL = Workload(model="cnn", image_size=32, local_epochs=1, samples_per_site=20)


@dataclass(frozen=True)
class Row:
    engine: str
    sites: int
    rounds_done: int
    round_s: float
    wall_s: float
    peak_bytes: int


def simulate(sites: int, rounds: int, workload: Workload = SMALL) -> Row:
    """``fedrad simulate`` over ``sites`` synthetic sites; round times from ``metrics.jsonl``."""
    with tempfile.TemporaryDirectory(prefix="fedrad-bench-scale-") as tmp:
        sites_dir, run_dir = Path(tmp) / "sites", Path(tmp) / "run"
        write_consortium(
            sites_dir,
            SynthConfig(
                sites=sites,
                image_size=workload.image_size,
                samples_per_site=workload.samples_per_site,
            ),
        )
        command = [
            sys.executable,
            "-m",
            "fedrad.commands.cli",
            "simulate",
            str(sites_dir),
            "--out",
            str(run_dir),
            "--num-server-rounds",
            str(rounds),
            "--image-size",
            str(workload.image_size),
            "--local-epochs",
            str(workload.local_epochs),
            "--model",
            workload.model,
            "--min-sites",
            str(sites),
        ]
        started = time.monotonic()
        with PeakMemory(interval=1.0) as peak:
            done = subprocess.run(command, capture_output=True, text=True, timeout=3600)
        wall = time.monotonic() - started
        if done.returncode != 0:
            raise RuntimeError(
                f"fedrad simulate with {sites} sites exited {done.returncode}:\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
    timed = records[1:] or records
    return Row(
        "simulation",
        sites,
        len(records),
        statistics.median(r["seconds"] for r in timed),
        wall,
        peak.bytes,
    )


def deploy(sites: int, rounds: int, workload: Workload = SMALL) -> Row:
    """Plain rounds on the deployment engine with ``sites`` SuperNodes on loopback."""
    started = time.monotonic()
    result = measure_deployment(
        sites, workload, rounds=rounds, secure_modes=(False,), track_memory=True
    )
    # measure_deployment raises unless the run completed, so every round was done
    return Row(
        "deployment", sites, rounds, result.plain, time.monotonic() - started, result.peak_bytes
    )


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``a + b x``."""
    if len(xs) < 2:
        return ys[0], 0.0
    slope = statistics.covariance(xs, ys) / statistics.variance(xs)
    return statistics.mean(ys) - slope * statistics.mean(xs), slope


def table(rows: list[Row], rounds: int) -> Table:
    out = Table(
        title=(
            f"scale: {SMALL.model} {SMALL.image_size} px, {SMALL.local_epochs} epoch, "
            f"{SMALL.samples_per_site} images/site, {rounds} rounds; round s = median of "
            f"rounds 2-{rounds}"
        )
    )
    for column in ("engine", "sites", "rounds done", "round s", "s / site", "wall s", "peak GiB"):
        out.add_column(column, justify="right")
    for row in rows:
        out.add_row(
            row.engine,
            str(row.sites),
            f"{row.rounds_done}/{rounds}",
            f"{row.round_s:.2f}",
            f"{row.round_s / row.sites:.3f}",
            f"{row.wall_s:.0f}",
            f"{row.peak_bytes / 2**30:.2f}",
        )
    simulated = [r for r in rows if r.engine == "simulation"]
    if len(simulated) >= 2:
        xs = [float(r.sites) for r in simulated]
        a_t, b_t = _fit(xs, [r.round_s for r in simulated])
        a_m, b_m = _fit(xs, [r.peak_bytes / 2**30 for r in simulated])
        out.caption = (
            f"simulation fit: round s ~ {a_t:.2f} + {b_t:.3f} x sites; "
            f"peak GiB ~ {a_m:.2f} + {b_m:.4f} x sites"
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", nargs="*", type=int, default=[10, 50, 100])
    parser.add_argument(
        "--deployment-sites",
        nargs="*",
        type=int,
        default=[10],
        help="SuperNodes on loopback; 0 or none to skip the deployment engine",
    )
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 is not timed).")
    rows = [simulate(n, args.rounds) for n in args.sites]
    failed = []
    for n in (n for n in args.deployment_sites if n > 0):
        try:
            rows.append(deploy(n, args.rounds))
        except RuntimeError as exc:  # the simulated rows still print; the failure is shown
            failed.append(f"deployment with {n} site nodes failed: {str(exc)[-1500:]}")
    CONSOLE.print(table(rows, args.rounds))
    for line in failed:
        CONSOLE.print(line, markup=False)
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
