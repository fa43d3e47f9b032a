"""The operator's commands with real processes on loopback: provision, coordinator, sites.

``fedrad provision`` + ``fedrad coordinator start --detach`` + ``fedrad site start --detach``
bring two registered sites online over TLS with node authentication; a site with the wrong CA
or an unregistered key gets an operator-facing cause and fix; a damaged state database and
missing TLS files stop ``coordinator start`` before anything runs. Every process started is
stopped by PID in a finalizer.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedrad.commands.cli import main
from fedrad.commands.consortium import CONNECTION, Consortium
from fedrad.commands.processes import alive, descendants, free_port, signal_tree
from fedrad.commands.provision import provision
from privacy.certs import create_ca, create_node_key_pair

pytestmark = pytest.mark.timeout(150)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SITES = ["hospital-a", "hospital-b"]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
        "FLWR_TELEMETRY_ENABLED": "0",
    }


def fedrad(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run the ``fedrad`` command; on timeout SIGTERM it (it stops what it started) and fail."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedrad.commands.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        pytest.fail(f"fedrad {' '.join(argv)} ran past {timeout} s:\n{out[-3000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def _stop_tree(pid: int) -> None:
    tree = [pid, *descendants(pid)]
    signal_tree(tree, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in tree):
        time.sleep(0.1)
    signal_tree([p for p in tree if alive(p)], signal.SIGKILL)


def _stop_pid_file(path: Path, key: str | None = None) -> None:
    if not path.is_file():
        return
    text = path.read_text()
    pid = json.loads(text).get(key) if key else int(text)
    if isinstance(pid, int) and alive(pid):
        _stop_tree(pid)


def _nodes(consortium: Consortium) -> dict[str, str]:
    done = subprocess.run(
        [str(BIN / "flwr"), "supernode", "ls", CONNECTION, "--format", "json"],
        capture_output=True,
        text=True,
        env={**_env(), "FLWR_HOME": str(consortium.flwr_home)},
        timeout=60,
        check=False,
    )
    listing = json.loads(done.stdout[done.stdout.index("{") :])
    return {n["node-id"]: n["status"] for n in listing.get("nodes", [])}


def _free_site_ports(consortium: Consortium, names: list[str]) -> None:
    """Give each site a free ClientAppIo port (other tests may use 9094, 9095 on this host)."""
    for name in names:
        config = consortium.site(name).config
        lines = [
            f"clientappio-port = {free_port()}" if line.startswith("clientappio-port") else line
            for line in config.read_text().splitlines()
        ]
        config.write_text("\n".join(lines) + "\n")


@dataclass
class Coordinator:
    """A provisioned consortium whose coordinator runs (``coordinator start --detach``)."""

    consortium: Consortium
    port: int
    data: Path


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coordinator]:
    base = tmp_path_factory.mktemp("operator")
    consortium = Consortium(base / "consortium")
    port = free_port()
    made = fedrad(
        "provision",
        str(consortium.root),
        "--coordinator",
        "127.0.0.1,localhost",
        "--sites",
        ",".join(SITES),
        "--port",
        str(port),
    )
    assert made.returncode == 0, made.stdout
    _free_site_ports(consortium, SITES)
    data = base / "data"
    data.mkdir()
    try:
        started = fedrad(
            "coordinator", "start", str(consortium.root), "--host", "127.0.0.1", "--detach"
        )
        assert started.returncode == 0, started.stdout
        yield Coordinator(consortium, port, data)
    finally:
        for name in SITES:
            _stop_pid_file(consortium.site(name).root / "supernode.pid")
        fedrad("coordinator", "stop", str(consortium.root), timeout=60)
        _stop_pid_file(consortium.pids, "superlink")


def test_two_sites_come_online_and_nodes_json_names_them(coordinator: Coordinator) -> None:
    consortium = coordinator.consortium
    names = json.loads(consortium.node_names.read_text())
    assert sorted(names.values()) == SITES
    for name in SITES:
        started = fedrad(
            "site", "start", str(consortium.site(name).root), "--data-dir", str(coordinator.data),
            "--detach", "--settle", "5",
        )  # fmt: skip
        assert started.returncode == 0, started.stdout
        assert "connected to the coordinator" in started.stdout or "not yet" in started.stdout
        assert (consortium.site(name).root / "supernode.pid").is_file()
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        status = _nodes(consortium)
        if all(status.get(node) == "online" for node in names):
            break
        time.sleep(1)
    assert {node: status.get(node) for node in names} == dict.fromkeys(names, "online")


def _copy_site(coordinator: Coordinator, tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    shutil.copytree(coordinator.consortium.site("hospital-b").root, folder)
    for leftover in ("supernode.pid", "supernode.log"):
        (folder / leftover).unlink(missing_ok=True)
    config = folder / "site.toml"
    config.write_text(
        "\n".join(
            f"clientappio-port = {free_port()}" if line.startswith("clientappio-port") else line
            for line in config.read_text().splitlines()
        )
        + "\n"
    )
    return folder


def test_a_site_with_the_wrong_ca_is_told_to_get_the_consortium_ca(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    folder = _copy_site(coordinator, tmp_path, "wrong-ca")
    other = create_ca(tmp_path / "other-ca")
    shutil.copy(other.cert, folder / "ca.pem")

    result = fedrad("site", "start", str(folder), "--data-dir", str(coordinator.data))

    assert result.returncode == 1, result.stdout[-3000:]
    assert "CERTIFICATE_VERIFY_FAILED" in result.stdout  # Flower's own words, kept
    assert f"ca.pem in {folder} is not the CA that signed" in result.stdout, result.stdout[-3000:]


def test_a_site_with_an_unregistered_key_is_told_to_ask_the_operator(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    folder = _copy_site(coordinator, tmp_path, "rogue")
    create_node_key_pair(folder, "site")  # a valid key the coordinator never registered

    result = fedrad("site", "start", str(folder), "--data-dir", str(coordinator.data))

    assert result.returncode == 1, result.stdout[-3000:]
    assert "Exit Code: 305" in result.stdout
    assert "the coordinator does not know this site's key" in result.stdout, result.stdout[-3000:]
    assert "fedrad provision add-site" in result.stdout


def test_a_damaged_state_database_stops_coordinator_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "c"
    assert provision(root, hosts=["127.0.0.1"], sites=["a"])
    database = Consortium(root).database
    database.write_bytes(b"SQLite format 3\x00" + b"\x13" * 4096)  # header, then garbage

    # in-process: the check fails before any process starts
    code = main(["coordinator", "start", str(root), "--port", str(free_port()), "--detach"])

    said = " ".join(capsys.readouterr().err.split())
    assert code == 2, said
    assert f"the SuperLink state database {database} is damaged" in said
    assert f"mv {database} {database}.damaged" in said
    assert not Consortium(root).pids.exists()


def test_coordinator_without_tls_files_refuses_unless_insecure_for_testing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "bare"
    root.mkdir()
    port = free_port()

    refused = main(["coordinator", "start", str(root), "--port", str(port), "--detach"])

    said = " ".join(capsys.readouterr().err.split())
    assert refused == 2, said
    assert "missing TLS file(s)" in said and "--insecure-for-testing" in said
    try:
        started = fedrad(
            "coordinator", "start", str(root), "--port", str(port), "--host", "127.0.0.1",
            "--detach", "--insecure-for-testing",
        )  # fmt: skip
        assert started.returncode == 0, started.stdout
        assert "INSECURE" in started.stdout
        pid = json.loads(Consortium(root).pids.read_text())["superlink"]
        assert alive(pid)
        stopped = fedrad("coordinator", "stop", str(root))
        assert f"stopped the coordinator (pid {pid})" in stopped.stdout
        assert not alive(pid)
    finally:
        _stop_pid_file(Consortium(root).pids, "superlink")
