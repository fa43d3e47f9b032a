"""bench/scale.py: the memory sampler sees every process of a tree, and the script's table.

The figures themselves are the benchmark's to print (BENCHMARKS.md); here the script runs the
smallest consortium it accepts, and what it prints is checked against the run it made.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import _memory  # noqa: E402 - bench/ is a folder of scripts

pytestmark = pytest.mark.timeout(300)


def test_peak_memory_counts_a_child_that_holds_memory():
    # Prepare: a child that holds 200 MiB of touched memory for a moment
    hold = "b = bytearray(200 * 2**20); import time; time.sleep(2.0)"

    # Execute
    with _memory.PeakMemory(interval=0.1) as peak:
        baseline = _memory.tree_pss_bytes()
        child = subprocess.Popen([sys.executable, "-c", hold])
        child.wait(timeout=60)

    # Assert: the child's 200 MiB show on top of this process's own memory
    assert peak.bytes - baseline > 180 * 2**20
    assert peak.gib == peak.bytes / 2**30


def test_peak_memory_keeps_an_orphaned_grandchild_in_the_tree():
    # Prepare: a child that starts a grandchild in a new session and exits at once (as the
    # warm worker outlives its ClientApp process)
    spawn = (
        "import subprocess, sys; subprocess.Popen([sys.executable, '-c', "
        "'import time; time.sleep(3)'], start_new_session=True)"
    )

    # Execute
    with _memory.PeakMemory(interval=0.1):
        subprocess.run([sys.executable, "-c", spawn], check=True, timeout=60)
        time.sleep(0.5)
        tree = _memory._tree(os.getpid())

    # Assert: the grandchild was reparented to this (subreaper) process and is counted
    orphans = [pid for pid in tree if pid != os.getpid()]
    assert orphans, "the orphaned grandchild left the tree"
    for pid in orphans:
        os.waitpid(pid, 0)  # reap it (it ends by itself after 3 s)


def test_fit_recovers_a_line():
    import scale

    assert scale._fit([10.0, 50.0, 100.0], [2.0, 10.0, 20.0]) == pytest.approx((0.0, 0.2))


def test_scale_script_runs_a_small_federation_and_prints_its_rounds():
    # Execute: the script as a user runs it, the smallest useful size
    done = subprocess.run(
        [
            sys.executable,
            "bench/scale.py",
            "--sites",
            "2",
            "--deployment-sites",
            "0",
            "--rounds",
            "2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )

    # Assert: one simulation row with both rounds done, a round time and a peak memory
    assert done.returncode == 0, done.stderr[-3000:]
    row = re.search(
        r"simulation\s*│\s*2\s*│\s*2/2\s*│\s*([\d.]+)\s*│\s*([\d.]+)\s*│\s*\d+\s*│\s*([\d.]+)",
        done.stdout,
    )
    assert row, done.stdout
    round_s, per_site, peak_gib = (float(g) for g in row.groups())
    assert round_s > 0 and per_site == pytest.approx(round_s / 2, abs=0.006)  # both printed rounded
    assert 0.2 < peak_gib < 16  # torch and Ray are loaded; far below the machine's memory
