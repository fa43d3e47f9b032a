"""Round time on Flower's deployment engine, for ``bench/privacy_speed.py --deployment``.

A real consortium on loopback: a TLS SuperLink with node authentication and one registered
SuperNode per site, started by ``deploy/local.py``'s :func:`launch` (credentials, free port,
registration; every process it starts is stopped by PID at the end), then ``flwr run .`` once
without and once with secure aggregation on the same consortium. The way a run is started, waited
for and read is the one ``tests/test_deployment.py`` uses.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any
from unittest import mock

from _memory import PeakMemory  # bench/ is the scripts' folder

from fedrad.core.sites import list_site_dirs
from fedrad.synth import SynthConfig, write_consortium

ROOT = Path(__file__).resolve().parents[1]


def _load_launcher() -> ModuleType:
    """``deploy/local.py`` as a module (``deploy/`` is a folder of scripts, not a package)."""
    path = ROOT / "deploy" / "local.py"
    spec = importlib.util.spec_from_file_location("fedrad_deploy_local", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class Workload:
    """What each site trains in a round (the simulation table's ``WORKLOADS`` entry)."""

    model: str
    image_size: int
    local_epochs: int
    samples_per_site: int


@dataclass(frozen=True)
class DeploymentTimes:
    """Median seconds of rounds 2..N without and with SecAgg+, and SecAgg+'s exchanges.

    ``secure`` is None and ``exchanges`` empty when only plain rounds were run; ``peak_bytes``
    is the highest PSS of all the processes of the consortium together (:mod:`_memory`).
    """

    sites: int
    plain: float
    secure: float | None
    exchanges: dict[str, float]
    wall: float
    peak_bytes: int = 0


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so that ``finally`` blocks stop the consortium."""

    def _raise(signum: int, _frame: FrameType | None) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut cleanup
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _tail(path: Path, chars: int = 3000) -> str:
    with contextlib.suppress(OSError):
        return f"--- {path}\n{path.read_text(errors='replace')[-chars:]}"
    return f"--- {path}: no log"


def _flwr_run(
    local: ModuleType,
    children: list[Any],
    link: Any,
    env: dict[str, str],
    run_dir: Path,
    run_config: str,
    *,
    timeout: float,
) -> list[dict[str, Any]]:
    """``flwr run . fedrad-local --stream``; wait for ``summary.json``; return the rounds."""
    flwr_run = local.start(
        f"flwr-run-{run_dir.name}",
        [
            str(local.BIN / "flwr"),
            "run",
            str(ROOT),
            local.CONNECTION,
            "--stream",
            "-c",
            f"{run_config} out-dir='{run_dir}'",
        ],
        env=env,
        log_dir=run_dir.parent / "logs",
    )
    children.append(flwr_run)
    summary = run_dir / "summary.json"
    deadline = time.monotonic() + timeout
    while not summary.is_file() and flwr_run.proc.poll() is None:
        if link.proc.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    with contextlib.suppress(subprocess.TimeoutExpired):
        flwr_run.proc.wait(timeout=30)
    flwr_run.stop()
    status = json.loads(summary.read_text()).get("status") if summary.is_file() else None
    if status != "completed":
        raise RuntimeError(
            f"the run in {run_dir} did not complete (status {status!r}, flwr exit "
            f"{flwr_run.proc.returncode})\n{_tail(flwr_run.log)}\n{_tail(link.log)}"
        )
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _run_config(workload: Workload, sites_dir: Path, *, rounds: int, secure: bool) -> str:
    # the keys and values the simulation table passes to ``fedrad simulate``
    return (
        f"num-server-rounds={rounds} image-size={workload.image_size} "
        f"local-epochs={workload.local_epochs} model='{workload.model}' min-sites=3 "
        f"secure-aggregation={'true' if secure else 'false'} sites-dir='{sites_dir}'"
    )


def _median_exchanges(rounds: list[dict[str, Any]]) -> dict[str, float]:
    """Median seconds of each SecAgg+ exchange, in protocol order (``keys`` includes training)."""
    per_round = [r["train"]["secure-aggregation"]["seconds"] for r in rounds]
    # metrics.jsonl sorts keys: put the exchanges back in protocol order
    order = ("secagg_keys", "secagg_shares", "secagg_mask", "secagg_unmask", "total")
    names = sorted(per_round[0], key=lambda n: order.index(n) if n in order else len(order))
    return {name: statistics.median(s[name] for s in per_round) for name in names}


def measure_deployment(
    sites: int,
    workload: Workload,
    *,
    rounds: int,
    timeout: float = 1800.0,
    secure_modes: tuple[bool, ...] = (False, True),
    warm_worker: bool = True,
    track_memory: bool = False,
) -> DeploymentTimes:
    """Round time without and with SecAgg+ on one consortium of ``sites`` SuperNodes.

    ``secure_modes`` picks the runs: ``(False,)`` for plain rounds only; ``warm_worker=False``
    runs each message in a fresh ClientApp process (the "before" of BENCHMARKS.md);
    ``track_memory`` samples the processes' memory once a second (``peak_bytes``; the sampling
    itself takes CPU, so round times are measured without it unless memory is asked for).
    """
    local = _load_launcher()
    started = time.monotonic()
    children: list[Any] = []
    with (
        tempfile.TemporaryDirectory(prefix="fedrad-bench-deploy-") as tmp,
        _sigterm_as_interrupt(),
        PeakMemory(interval=1.0) if track_memory else contextlib.nullcontext() as peak,
    ):
        work = Path(tmp)
        sites_dir = work / "sites"
        write_consortium(
            sites_dir,
            SynthConfig(
                sites=sites,
                image_size=workload.image_size,
                samples_per_site=workload.samples_per_site,
            ),
        )
        quiet = {"FLWR_TELEMETRY_ENABLED": "0"}  # as in tests/test_deployment.py
        try:
            with mock.patch.dict(os.environ, quiet):  # launch() hands os.environ to its children
                local.launch(
                    work / "consortium",
                    list_site_dirs(sites_dir),
                    children,
                    port=local.free_port(),
                    min_cell_count=1,
                    warm_worker=warm_worker,
                )
            env = {
                **os.environ,
                **quiet,
                "FLWR_HOME": str(work / "consortium" / "flwr-home"),
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            }
            runs = {
                secure: _flwr_run(
                    local,
                    children,
                    children[0],
                    env,
                    work / f"run-{'secure' if secure else 'plain'}",
                    _run_config(workload, sites_dir, rounds=rounds, secure=secure),
                    timeout=timeout,
                )
                for secure in secure_modes
            }
        finally:
            for child in reversed(children):
                child.stop()
    later = {secure: rs[1:] for secure, rs in runs.items()}  # round 1 loads data, warms caches
    return DeploymentTimes(
        sites=sites,
        plain=statistics.median(r["seconds"] for r in later[False]),
        secure=statistics.median(r["seconds"] for r in later[True]) if True in later else None,
        exchanges=_median_exchanges(later[True]) if True in later else {},
        wall=time.monotonic() - started,
        peak_bytes=peak.bytes if isinstance(peak, PeakMemory) else 0,
    )
