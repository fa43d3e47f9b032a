"""No process fedrad starts sends Flower's usage events out of a hospital's network."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fedrad.commands.processes import start

pytestmark = pytest.mark.timeout(60)


def test_the_fedrad_command_turns_flower_telemetry_off_before_flower_loads():
    env = {k: v for k, v in os.environ.items() if k != "FLWR_TELEMETRY_ENABLED"}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import fedrad.commands.cli, flwr.supercore.telemetry as t; "
            "print(t.FLWR_TELEMETRY_ENABLED)",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=50,
        check=True,
    )
    assert out.stdout.strip() == "0"


def test_started_processes_have_telemetry_and_runtime_installs_off(tmp_path):
    launched = start(
        "env",
        ["env"],
        env={**os.environ, "FLWR_TELEMETRY_ENABLED": "1"},
        log_dir=tmp_path,
    )
    launched.proc.wait(timeout=30)
    lines = set(launched.output().splitlines())
    assert "FLWR_TELEMETRY_ENABLED=0" in lines
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in lines
