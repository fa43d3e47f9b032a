"""deploy/compose.yaml's commands, run without Docker on loopback: TLS and node auth on.

The compose file's services use the host network, so its commands are exactly what runs here:
provision, synth, the coordinator, two hospitals, then the operator's study and status. Only
the volumes (``/consortium``, ``/data``) become temporary folders, and the ports become free
ones (the operator passes ``--port``; a hospital sets its own ``clientappio-port``).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import time
from pathlib import Path

import pytest
import yaml
from helpers import fedrad_command, run_command

from fedrad.commands.processes import Launched, free_port, start

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)


def _commands() -> dict[str, list[str]]:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    return {name: shlex.split(s["command"]) for name, s in compose["services"].items()}


def _local(args: list[str], volumes: dict[str, Path]) -> list[str]:
    out = []
    for arg in args:
        for volume, path in volumes.items():
            if arg == volume or arg.startswith(volume + "/"):
                arg = str(path) + arg[len(volume) :]
        out.append(arg)
    return out


def _wait(what: str, check, *, timeout: float, logs: list[Launched]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1.0)
    tails = "\n".join(f"--- {p.name}\n{p.output()[-3000:]}" for p in logs)
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{tails}")


def test_compose_commands_run_a_study_on_loopback_with_tls(tmp_path: Path) -> None:
    commands = _commands()
    volumes = {"/consortium": tmp_path / "consortium", "/data": tmp_path / "data"}
    port = free_port()
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    started: list[Launched] = []
    try:
        # one-shot services
        provision = _local(commands["provision"], volumes) + ["--port", str(port)]
        assert provision[:1] == ["provision"]
        result = run_command(fedrad_command(*provision), timeout=120)
        assert result.returncode == 0, result.stdout[-3000:]
        again = run_command(fedrad_command(*provision), timeout=120)  # compose re-runs it
        assert again.returncode == 0, again.stdout[-3000:]
        synth = _local(commands["synth"], volumes)
        result = run_command(fedrad_command(*synth), timeout=300)
        assert result.returncode == 0, result.stdout[-3000:]
        # a hospital picks its own local port for the SuperNode's ClientAppIo API
        for site_toml in (volumes["/consortium"] / "sites").glob("*/site.toml"):
            text = site_toml.read_text()
            text = re.sub(r"clientappio-port = \d+", f"clientappio-port = {free_port()}", text)
            text = re.sub(r"num-threads = \d+", "num-threads = 1", text)  # two sites, one host
            site_toml.write_text(text)

        # long-running services, in compose's dependency order
        coordinator = _local(commands["coordinator"], volumes)
        coordinator[coordinator.index("--port") + 1] = str(port)
        started.append(
            start("coordinator", fedrad_command(*coordinator), env=env, log_dir=tmp_path / "logs")
        )
        _wait(
            "the coordinator",
            lambda: (volumes["/consortium"] / "coordinator" / "state" / "nodes.json").is_file(),
            timeout=120,
            logs=started,
        )
        for site in ("hospital-a", "hospital-b"):
            args = _local(commands[site], volumes)
            started.append(start(site, fedrad_command(*args), env=env, log_dir=tmp_path / "logs"))

        # the operator: a short study, followed to its end, then the status table
        study = run_command(
            fedrad_command(
                "study",
                "start",
                str(volumes["/consortium"]),
                "--study-id",
                "tryout",
                "--num-server-rounds",
                "2",
                "--image-size",
                "32",
                "--batch-size",
                "16",
                "--min-sites",
                "2",
                "--local-epochs",
                "1",
            ),
            timeout=420,
        )
        status = run_command(
            fedrad_command("status", str(volumes["/consortium"]), "--json"), timeout=120
        )
    finally:
        for process in reversed(started):
            process.stop()

    run_dir = volumes["/consortium"] / "coordinator" / "studies" / "tryout"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert study.returncode == 0, study.stdout[-4000:]
    assert summary["status"] == "completed" and summary["rounds-completed"] == 2, summary
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sorted(rounds[-1]["train"]["sites"]) == ["hospital-a", "hospital-b"]
    assert status.returncode == 0, status.stdout[-3000:]
    assert "hospital-a" in status.stdout and "hospital-b" in status.stdout
    # TLS was on: the SuperLink was given the provisioned certificate, and node authentication
    link_log = (tmp_path / "logs" / "coordinator.log").read_text()
    assert "--insecure" not in link_log
