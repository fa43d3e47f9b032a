"""Privacy costs: training step time with and without DP-SGD for each model.

Prints, per model, the median time of one optimizer step on a batch of 32 with plain SGD and
with Opacus DP-SGD (per-sample gradients, clipping, noise), and their ratio
(goal <= 2.5x, stretch 1.5x). Secure-aggregation round times follow in the same table once
measured by ``--secagg``.

    python bench/privacy.py [--threads 2] [--steps 8]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
from opacus import PrivacyEngine
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, TensorDataset

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table = Table(title=f"one training step, batch 32, {args.threads} thread(s), CPU")
    for column in ("model", "input", "plain ms", "DP-SGD ms", "DP / plain", "goal"):
        table.add_column(column, justify="right")
    for name, (dims, size) in SHAPES.items():
        plain, dp = measure(name, args.steps)
        table.add_row(name, "x".join(map(str, size)), f"{plain * 1e3:.0f}", f"{dp * 1e3:.0f}",
                      f"{dp / plain:.2f}x", "<= 2.5x")
    Console().print(table)


if __name__ == "__main__":
    main()
