"""Privacy costs: training step time with and without DP-SGD, and with and without SecAgg+.

Prints, per model, the median time of one optimizer step on a batch of 32 with plain SGD and
with Opacus DP-SGD (per-sample gradients, clipping, noise), and their ratio
(goal <= 2.5x, stretch 1.5x); then, with ``--secagg``, the median round time of a simulated
federation (``fedrad simulate``: train and evaluate, with SecAgg+ the evaluation sums go
through it too) with and without secure aggregation at 5 and 10 sites (goal <= 1.25x), for
the demo's workload and for a tiny one that shows the fixed cost of SecAgg+'s extra exchanges;
then, with ``--deployment``, the same on Flower's deployment engine: a TLS SuperLink with node
authentication and real SuperNodes on loopback (``deploy/local.py``), the tiny workload and 5
sites unless told otherwise (goal: SecAgg+ <= 1.25x the plain deployment round), and with
``--compare-simulation`` the simulated plain round of the same workload and sites beside it
(goal: deployment <= 1.5x simulation). Each site keeps a warm worker (``client.worker``), so
only the first message of a site pays for importing torch.

    python bench/privacy_speed.py [--threads 2] [--steps 8] [--secagg] [--deployment] [--skip-steps]
    python bench/privacy_speed.py --only-deployment [--deployment-sites 5 10]
    python bench/privacy_speed.py --only-deployment --deployment-workload demo --compare-simulation
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
from _deployment import Workload, measure_deployment  # bench/ is the script's folder
from opacus import PrivacyEngine
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, TensorDataset

from fedrad.synth import SynthConfig, write_consortium
from models import DP_GRAD_SAMPLE_MODES, build_model

SHAPES = {
    "cnn": (2, (64, 64)),
    "cnn-lstm": (3, (16, 64, 64)),
    "transformer": (2, (64, 64)),
}

CONSOLE = Console(width=160)  # full tables also when piped to a file or CI log


def _step_times(
    model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, steps: int
) -> float:
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
    plain = _step_times(
        model,
        DataLoader(data, batch_size=32, shuffle=True),
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        steps,
    )
    torch.manual_seed(0)
    model = build_model(name, spatial_dims=dims, in_channels=1, num_classes=2, image_size=size)
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=0.5, momentum=0.9
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, optimizer, loader = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=DataLoader(data, batch_size=32, shuffle=True),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            grad_sample_mode=DP_GRAD_SAMPLE_MODES[name],  # as the sites train it
        )
        dp = _step_times(private, loader, optimizer, steps)
    return plain, dp


WORKLOADS = {
    # name: (image size, local epochs, samples per site, model)
    "demo": (64, 3, 200, "cnn"),
    "tiny": (32, 1, 40, "cnn"),
}
"""``demo``: the demo's defaults (cnn at 64 px, 3 local epochs, 200 samples per site).
``tiny``: a minimal round, which shows the fixed cost of the extra exchanges."""


def _round_seconds(
    sites_dir: Path, run_dir: Path, *, secure: bool, rounds: int, workload: str
) -> float:
    """Median seconds per round after the first (which loads data and starts Ray)."""
    size, epochs, _, model = WORKLOADS[workload]
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
        str(size),
        "--local-epochs",
        str(epochs),
        "--model",
        model,
        "--min-sites",
        "3",
        "--secure-aggregation",
        "true" if secure else "false",
    ]
    subprocess.run(command, check=True, capture_output=True, timeout=1800)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["seconds"] for r in records[1:])


def _light_exchange_seconds(run_dir: Path) -> float:
    """Median over rounds 2.. of SecAgg+'s three exchanges after training (shares, mask, unmask).

    The protocol's own cost, read from the round records: it does not move with the machine's
    load during training, which makes whole-round ratios noisy on a shared host.
    """
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(
        sum(r["train"]["secure-aggregation"]["seconds"][k] for k in _LIGHT_EXCHANGES)
        for r in records[1:]
    )


_LIGHT_EXCHANGES = ("secagg_shares", "secagg_mask", "secagg_unmask")


def secagg_table(rounds: int, workloads: list[str]) -> Table:
    """Round time with and without SecAgg+ at 5 and 10 simulated sites."""
    table = Table(title=f"round time in simulation (train + evaluate), median of rounds 2-{rounds}")
    for column in (
        "workload",
        "sites",
        "plain s",
        "SecAgg+ s",
        "extra s",
        "SecAgg+ / plain",
        "goal",
        "shares+mask+unmask s",
    ):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory(prefix="fedrad-bench-") as tmp:
        for workload in workloads:
            size, epochs, samples, model = WORKLOADS[workload]
            for sites in (5, 10):
                sites_dir = Path(tmp) / f"{workload}-sites-{sites}"
                write_consortium(
                    sites_dir, SynthConfig(sites=sites, image_size=size, samples_per_site=samples)
                )
                times = {
                    secure: _round_seconds(
                        sites_dir,
                        Path(tmp) / f"{workload}-{sites}-{secure}",
                        secure=secure,
                        rounds=rounds,
                        workload=workload,
                    )
                    for secure in (False, True)
                }
                plain, secure_s = times[False], times[True]
                table.add_row(
                    f"{workload}: {model} {size} px, {epochs} ep, {samples}/site",
                    str(sites),
                    f"{plain:.2f}",
                    f"{secure_s:.2f}",
                    f"{secure_s - plain:+.2f}",
                    f"{secure_s / plain:.2f}x",
                    "<= 1.25x",
                    f"{_light_exchange_seconds(Path(tmp) / f'{workload}-{sites}-True'):.2f}",
                )
    return table


def _simulated_round(workload: str, sites: int, rounds: int) -> float:
    """Median plain round time in simulation of ``workload`` at ``sites`` sites."""
    size, _, samples, _ = WORKLOADS[workload]
    with tempfile.TemporaryDirectory(prefix="fedrad-bench-sim-") as tmp:
        sites_dir = Path(tmp) / "sites"
        write_consortium(
            sites_dir, SynthConfig(sites=sites, image_size=size, samples_per_site=samples)
        )
        return _round_seconds(
            sites_dir, Path(tmp) / "run", secure=False, rounds=rounds, workload=workload
        )


def deployment_table(
    site_counts: list[int],
    rounds: int,
    *,
    workload_name: str = "tiny",
    compare: bool = False,
    warm_worker: bool = True,
) -> Table:
    """Round time with and without SecAgg+ on the deployment engine.

    With ``compare``, also the plain round in simulation of the same workload and sites, and
    the goals of issue 11: deployment <= 1.5x simulation, SecAgg+ <= 1.25x plain deployment.
    """
    size, epochs, samples, model = WORKLOADS[workload_name]
    workload = Workload(model=model, image_size=size, local_epochs=epochs, samples_per_site=samples)
    table = Table(
        title=(
            f"round time on the deployment engine (TLS SuperLink, SuperNodes on loopback; "
            f"{workload_name}: {model} {size} px, {epochs} ep, {samples}/site), median of "
            f"rounds 2-{rounds}; warm worker {'on' if warm_worker else 'off'}"
        )
    )
    columns = ["sites", "plain s", "SecAgg+ s", "extra s", "SecAgg+ / plain (goal 1.25x)"]
    if compare:
        columns += ["simulation plain s", "deployment / simulation (goal 1.5x)"]
    for column in columns:
        table.add_column(column, justify="right")
    notes = []
    for sites in site_counts:
        result = measure_deployment(sites, workload, rounds=rounds, warm_worker=warm_worker)
        secure = result.secure
        assert secure is not None  # both modes were run
        row = [
            str(sites),
            f"{result.plain:.2f}",
            f"{secure:.2f}",
            f"{secure - result.plain:+.2f}",
            f"{secure / result.plain:.2f}x",
        ]
        if compare:
            simulated = _simulated_round(workload_name, sites, rounds)
            row += [f"{simulated:.2f}", f"{result.plain / simulated:.2f}x"]
        table.add_row(*row)
        exchanges = ", ".join(f"{name} {s:.2f}" for name, s in result.exchanges.items())
        notes.append(
            f"{sites} sites: SecAgg+ exchanges (s, median): {exchanges}; "
            f"both deployment runs took {result.wall:.0f} s"
        )
    table.caption = "\n".join(notes)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--secagg", action="store_true", help="also time simulated rounds")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--workloads",
        nargs="+",
        choices=sorted(WORKLOADS),
        default=["demo", "tiny"],
        help="simulated workloads for --secagg",
    )
    parser.add_argument(
        "--skip-steps", action="store_true", help="only the secure-aggregation table(s)"
    )
    parser.add_argument(
        "--deployment",
        action="store_true",
        help="also time rounds on the deployment engine (minutes)",
    )
    parser.add_argument(
        "--only-deployment", action="store_true", help="only the deployment-engine table"
    )
    parser.add_argument(
        "--deployment-sites",
        nargs="+",
        type=int,
        choices=(3, 5, 10),
        default=[5],
        help="SuperNodes for --deployment (default 5)",
    )
    parser.add_argument(
        "--deployment-workload",
        choices=sorted(WORKLOADS),
        default="tiny",
        help="workload of the deployment rounds (default tiny)",
    )
    parser.add_argument(
        "--compare-simulation",
        action="store_true",
        help="also time the plain round in simulation of the deployment's workload and sites",
    )
    parser.add_argument("--deployment-rounds", type=int, default=3)
    parser.add_argument(
        "--no-warm-worker",
        action="store_true",
        help="deployment: a fresh ClientApp process per message (node config warm-worker=false)",
    )
    args = parser.parse_args()
    if args.deployment_rounds < 2:
        parser.error("--deployment-rounds must be at least 2 (round 1 is not timed).")
    torch.set_num_threads(args.threads)
    deployment = {
        "workload_name": args.deployment_workload,
        "compare": args.compare_simulation,
        "warm_worker": not args.no_warm_worker,
    }
    if args.only_deployment:
        CONSOLE.print(deployment_table(args.deployment_sites, args.deployment_rounds, **deployment))
        return
    if args.skip_steps and (args.secagg or args.deployment):
        if args.secagg:
            CONSOLE.print(secagg_table(args.rounds, args.workloads))
        if args.deployment:
            CONSOLE.print(
                deployment_table(args.deployment_sites, args.deployment_rounds, **deployment)
            )
        return
    table = Table(title=f"one training step, batch 32, {args.threads} thread(s), CPU")
    for column in (
        "model",
        "input",
        "per-sample grads",
        "plain ms",
        "DP-SGD ms",
        "DP / plain",
        "goal",
    ):
        table.add_column(column, justify="right")
    for name, (_, size) in SHAPES.items():
        plain, dp = measure(name, args.steps)
        table.add_row(
            name,
            "x".join(map(str, size)),
            DP_GRAD_SAMPLE_MODES[name],
            f"{plain * 1e3:.0f}",
            f"{dp * 1e3:.0f}",
            f"{dp / plain:.2f}x",
            "<= 2.5x (1.5x)",
        )
    CONSOLE.print(table)
    if args.secagg:
        CONSOLE.print(secagg_table(args.rounds, args.workloads))
    if args.deployment:
        CONSOLE.print(deployment_table(args.deployment_sites, args.deployment_rounds, **deployment))


if __name__ == "__main__":
    main()
