"""Privacy costs: training step time with and without DP-SGD for each model.

Prints, per model, the median time of one optimizer step on a batch of 32 with plain SGD and
with Opacus DP-SGD (per-sample gradients, clipping, noise), and their ratio
(goal <= 2.5x, stretch 1.5x); then, with ``--secagg``, the median round time of a simulated
federation (``fedrad simulate``, tiny CNN) with and without secure aggregation at 5 and 10
sites (goal <= 1.25x).

    python bench/privacy.py [--threads 2] [--steps 8] [--secagg]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from opacus import PrivacyEngine
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, TensorDataset

from fedrad.synth import SynthConfig, write_consortium
from models import build_model

SHAPES = {
    "cnn": (2, (64, 64)),
    "cnn-lstm": (3, (16, 64, 64)),
    "transformer": (2, (64, 64)),
}


def _step_times(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                steps: int) -> float:
    criterion = torch.nn.CrossEntropyLoss()
    times = []
    batches = iter(loader)
    for _ in range(steps + 2):
        try:
            x, y = next(batches)
        except StopIteration:
            batches = iter(loader)
            x, y = next(batches)
        start = time.perf_counter()
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])  # the first steps warm up allocators and hooks


def measure(name: str, steps: int) -> tuple[float, float]:
    dims, size = SHAPES[name]
    data = TensorDataset(torch.rand(256, 1, *size), torch.randint(0, 2, (256,)))
    torch.manual_seed(0)
    model = build_model(name, spatial_dims=dims, in_channels=1, num_classes=2, image_size=size)
    plain = _step_times(model, DataLoader(data, batch_size=32, shuffle=True),
                        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), steps)
    torch.manual_seed(0)
    model = build_model(name, spatial_dims=dims, in_channels=1, num_classes=2, image_size=size)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5,
                                momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, optimizer, loader = PrivacyEngine().make_private(
            module=model, optimizer=optimizer,
            data_loader=DataLoader(data, batch_size=32, shuffle=True),
            noise_multiplier=1.0, max_grad_norm=1.0,
        )
        dp = _step_times(private, loader, optimizer, steps)
    return plain, dp


def _round_seconds(sites_dir: Path, run_dir: Path, *, secure: bool, rounds: int) -> float:
    """Median seconds per round after the first (which loads data and starts Ray)."""
    command = [sys.executable, "-m", "fedrad.cli", "simulate", str(sites_dir), "--out",
               str(run_dir), "--num-server-rounds", str(rounds), "--image-size", "32",
               "--local-epochs", "1", "--min-sites", "3", "--secure-aggregation",
               "true" if secure else "false"]
    subprocess.run(command, check=True, capture_output=True, timeout=1200)
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return statistics.median(json.loads(line)["seconds"] for line in lines[1:])


def secagg_table(rounds: int) -> Table:
    """Round time with and without SecAgg+ at 5 and 10 simulated sites."""
    table = Table(title=f"round time, simulation, tiny CNN at 32 px, median of rounds 2-{rounds}")
    for column in ("sites", "plain s", "SecAgg+ s", "SecAgg+ / plain", "goal"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory(prefix="fedrad-bench-") as tmp:
        for sites in (5, 10):
            sites_dir = Path(tmp) / f"sites-{sites}"
            write_consortium(sites_dir, SynthConfig(sites=sites, image_size=32,
                                                    samples_per_site=40))
            plain = _round_seconds(sites_dir, Path(tmp) / f"plain-{sites}", secure=False,
                                   rounds=rounds)
            secure = _round_seconds(sites_dir, Path(tmp) / f"secure-{sites}", secure=True,
                                    rounds=rounds)
            table.add_row(str(sites), f"{plain:.2f}", f"{secure:.2f}", f"{secure / plain:.2f}x",
                          "<= 1.25x")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--secagg", action="store_true", help="also time simulated rounds")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table = Table(title=f"one training step, batch 32, {args.threads} thread(s), CPU")
    for column in ("model", "input", "plain ms", "DP-SGD ms", "DP / plain", "goal"):
        table.add_column(column, justify="right")
    for name, (_, size) in SHAPES.items():
        plain, dp = measure(name, args.steps)
        table.add_row(name, "x".join(map(str, size)), f"{plain * 1e3:.0f}", f"{dp * 1e3:.0f}",
                      f"{dp / plain:.2f}x", "<= 2.5x")
    Console().print(table)
    if args.secagg:
        Console().print(secagg_table(args.rounds))


if __name__ == "__main__":
    main()
