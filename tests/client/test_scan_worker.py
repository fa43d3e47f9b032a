"""The optional per-chunk finishing step of run_in_workers: timeout and failures."""

import time
from pathlib import Path

import pytest

from client.scan_worker import run_in_workers

pytestmark = pytest.mark.timeout(60)


def _finish(results: list[str], mark) -> list[str]:
    """Finish each result in turn; hang on the one named for it."""
    out = []
    for position, result in enumerate(results):
        mark(position)
        if result == "HANG":
            time.sleep(120)
        out.append(f"{result}!")
    return out


def _finish_raising(results: list[str], mark) -> list[str]:
    raise RuntimeError("a bug")


def _lost(item: str, kind: str, detail: str) -> str:
    return f"lost {item} {kind}"


@pytest.mark.parametrize("workers", [1, 2])
def test_finishing_runs_in_the_worker_on_every_result(tmp_path: Path, workers):
    items = [f"f{i}" for i in range(300)]

    results = run_in_workers(
        str.upper, items, cwd=tmp_path, workers=workers, timeout_s=20, on_lost=_lost, finish=_finish
    )

    assert results == [f"F{i}!" for i in range(300)]


def test_a_finish_that_hangs_costs_the_path_it_is_on(tmp_path: Path):
    items = [f"f{i}" for i in range(40)]  # chunks of several paths
    items[12] = "hang"
    started = time.monotonic()

    results = run_in_workers(
        str.upper, items, cwd=tmp_path, workers=1, timeout_s=1.0, on_lost=_lost, finish=_finish
    )

    assert time.monotonic() - started < 15
    expected = [f"F{i}!" for i in range(40)]
    expected[12] = "lost hang timeout"
    assert results == expected


def test_a_finish_that_raises_loses_its_chunk_not_the_run(tmp_path: Path):
    results = run_in_workers(
        str.upper,
        ["a", "b"],
        cwd=tmp_path,
        workers=1,
        timeout_s=5.0,
        on_lost=_lost,
        finish=_finish_raising,
    )

    assert results == ["lost a crash", "lost b crash"]
