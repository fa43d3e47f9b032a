"""`flwr run .` from the repository root runs the same code as the fedrad command."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from helpers import fedrad_command, run_command

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(500)


def _stop_local_superlink(flwr_home: Path) -> None:
    """flwr run starts a detached SuperLink that outlives the run: stop ours by PID."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "flower-superlink" in cmdline and str(flwr_home) in cmdline:
            os.kill(int(proc.name), signal.SIGKILL)


@pytest.fixture
def flwr_home(tmp_path):
    home = tmp_path / "flwr-home"
    yield home
    _stop_local_superlink(home)


def test_flwr_run_and_fedrad_simulate_run_the_same_code(sites_2d, tmp_path, flwr_home):
    flwr = shutil.which("flwr", path=os.path.dirname(os.sys.executable))
    assert flwr, "the flwr command is installed with fedrad"
    flwr_run = tmp_path / "flwr-run"
    fedrad_run = tmp_path / "fedrad-run"
    overrides = (
        f"sites-dir='{sites_2d}' out-dir='{flwr_run}' num-server-rounds=1 "
        "image-size=32 batch-size=16"
    )

    by_flwr = run_command(
        [
            flwr,
            "run",
            ".",
            "--stream",
            "--federation-config",
            "num-supernodes=2 client-resources-num-cpus=1",
            "-c",
            overrides,
        ],
        timeout=400,
        cwd=ROOT,
        env={"FLWR_HOME": str(flwr_home), "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"},
    )
    by_fedrad = run_command(
        fedrad_command(
            "simulate",
            str(sites_2d),
            "--out",
            str(fedrad_run),
            "--num-server-rounds",
            "1",
            "--image-size",
            "32",
            "--batch-size",
            "16",
        ),
        timeout=300,
    )

    assert (flwr_run / "summary.json").is_file(), by_flwr.stdout[-4000:]
    assert by_fedrad.returncode == 0, by_fedrad.stdout[-4000:]
    flwr_record = json.loads((flwr_run / "run.json").read_text())
    fedrad_record = json.loads((fedrad_run / "run.json").read_text())
    assert json.loads((flwr_run / "summary.json").read_text())["status"] == "completed"
    # flwr run loads the app from its installed FAB copy, fedrad from the package itself
    assert str(flwr_home) in flwr_record["code"]["root"]
    assert flwr_record["code"]["sha256"] == fedrad_record["code"]["sha256"]
    assert flwr_record["config"] == {**fedrad_record["config"], "out-dir": str(flwr_run)}
    # --stream shows fedrad's own progress: the run directory and one line per round
    assert f"run directory: {flwr_run}" in by_flwr.stdout, by_flwr.stdout[-3000:]
    assert "round 1/1: 2 site(s)" in by_flwr.stdout

    # flwr run left its local SuperLink running; fedrad's command stops it by PID
    from fedrad.commands.local_superlink import find_local_superlinks

    assert find_local_superlinks(flwr_home), "flwr run leaves a local SuperLink behind"
    stop = run_command(
        fedrad_command("local-superlink", "stop"), timeout=60, env={"FLWR_HOME": str(flwr_home)}
    )
    assert "stopped the local simulation SuperLink" in stop.stdout, stop.stdout
    assert find_local_superlinks(flwr_home) == []
