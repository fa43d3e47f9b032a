"""A real deployment on loopback: TLS SuperLink, registered SuperNodes, ``flwr run .``.

Every component is started the way an operator or a hospital starts it (the installed
``flower-superlink``, ``flwr``, ``flower-supernode`` commands), each in its own process group,
each stopped by PID when the test ends. Flower 1.42 serves the Fleet, Control and Runtime APIs of
a SuperLink on one HTTPS port (``--host``/``--port``); a SuperNode's own Runtime API takes its own
``--port``. Every port is picked free. Flower's ``flwr_exit`` logs its code ("Exit Code: 305")
but the process itself exits with status 1.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedrad.commands.processes import Launched, alive, descendants, free_port, start
from fedrad.synth import SynthConfig, write_consortium
from privacy.certs import (
    CertificateAuthority,
    ServerCertificate,
    create_ca,
    create_node_key_pair,
    create_roster,
    create_server_certificate,
)

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CONNECTION = "fedrad-test"
SITES = ("site-1", "site-2", "site-3")
RUN_CONFIG = (
    "num-server-rounds=2 image-size=32 batch-size=16 min-sites=2 dp='sample' "
    "study-id='deploy-test' target-epsilon=8 optimizer='sgd' learning-rate=0.5 round-timeout=120"
)


# ---------------------------------------------------------------- processes


def _deploy_script(name: str) -> Any:
    """``deploy/NAME.py`` as a module (``deploy/`` is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"deploy_{name}", ROOT / "deploy" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@dataclass
class Launcher:
    """Starts commands in their own process groups and stops all of them at teardown."""

    log_dir: Path
    started: list[Launched] = field(default_factory=list)

    def start(
        self, name: str, args: list[str], *, env: dict[str, str], cwd: Path | None = None
    ) -> Launched:
        launched = start(name, args, env=env, log_dir=self.log_dir, cwd=cwd)
        self.started.append(launched)
        return launched

    def stop_all(self) -> None:
        for launched in reversed(self.started):
            launched.stop()


def run(args: list[str], *, env: dict[str, str], timeout: float, cwd: Path | None = None) -> str:
    """Run a short command to completion (own process group, killed on timeout); return output."""
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"{' '.join(args)} ran past {timeout} s:\n{output[-4000:]}")
    assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{output[-4000:]}"
    return output


def wait_for(
    what: str,
    check: Callable[[], object],
    *,
    timeout: float,
    every: float = 0.5,
    logs: Sequence[Launched] = (),
) -> None:
    """Poll ``check()`` until it is truthy; after ``timeout`` fail with the tails of ``logs``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    tails = "\n".join(f"--- {log.name}\n{log.output()[-3000:]}" for log in logs)
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{tails}")


def _environment(home: Path, flwr_home: Path) -> dict[str, str]:
    """A user's environment with its own HOME and FLWR_HOME, no telemetry, no runtime installs."""
    return {
        **os.environ,
        "HOME": str(home),
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }


# ---------------------------------------------------------------- the SuperLink


@dataclass
class SuperLink:
    """A TLS SuperLink with node authentication, and the operator's ``flwr`` environment."""

    process: Launched
    port: int
    ca: CertificateAuthority
    server: ServerCertificate
    keys_dir: Path
    env: dict[str, str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def register(self, public_key: Path) -> str:
        """``flwr supernode register KEY.pub CONNECTION``; return the node id it was given."""
        output = run(
            [
                str(BIN / "flwr"),
                "supernode",
                "register",
                str(public_key),
                CONNECTION,
                "--format",
                "json",
            ],
            env=self.env,
            timeout=60,
        )
        return str(json.loads(output[output.index("{") :])["node-id"])

    def unregister(self, node_id: str) -> None:
        """``flwr supernode unregister NODE_ID CONNECTION``: the node may no longer connect."""
        run(
            [str(BIN / "flwr"), "supernode", "unregister", node_id, CONNECTION],
            env=self.env,
            timeout=60,
        )

    def nodes(self) -> dict[str, str]:
        """Registered node ids and their status (``online``, ``offline``, ``registered``)."""
        output = run(
            [str(BIN / "flwr"), "supernode", "ls", CONNECTION, "--format", "json"],
            env=self.env,
            timeout=60,
        )
        listing = json.loads(output[output.index("{") :])
        return {n["node-id"]: n["status"] for n in listing["nodes"]}


def _write_connection(flwr_home: Path, address: str, ca: Path) -> None:
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "{address}"\nroot-certificates = "{ca}"\n'
    )


@pytest.fixture(scope="module")
def superlink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SuperLink]:
    """Certificates, a TLS SuperLink with ``--enable-supernode-auth``, a ``flwr`` connection."""
    base = tmp_path_factory.mktemp("superlink")
    certs = base / "certs"
    ca = create_ca(certs)
    server = create_server_certificate(
        ca, certs, hostnames=["localhost"], ip_addresses=["127.0.0.1"]
    )
    port = free_port()
    env = _environment(base / "home", base / "flwr-home")
    _write_connection(base / "flwr-home", f"127.0.0.1:{port}", ca.cert)
    launcher = Launcher(base / "logs")
    process = launcher.start(
        "superlink",
        _deploy_script("local").superlink_command(
            ca_cert=ca.cert,
            cert=server.cert,
            key=server.key,
            port=port,
            database=base / "state.db",
            log_file=base / "logs" / "superlink-rotating.log",
        ),
        env=env,
    )
    try:
        wait_for(
            "the SuperLink to listen",
            lambda: (
                "Uvicorn running on https://" in process.output() or process.proc.poll() is not None
            ),
            timeout=60,
            logs=[process],
        )
        assert process.proc.poll() is None, process.output()[-4000:]
        yield SuperLink(process, port, ca, server, certs, env)
    finally:
        launcher.stop_all()


# ---------------------------------------------------------------- SuperNodes


def supernode_command(
    link: SuperLink, *, key: Path | None, port: int, node_config: str, with_ca: bool = True
) -> list[str]:
    """The command a hospital runs; ``with_ca=False`` leaves out ``--root-certificates``."""
    args = [str(BIN / "flower-supernode"), "--superlink", link.address]
    if with_ca:
        args += ["--root-certificates", str(link.ca.cert)]
    if key is not None:
        args += ["--auth-supernode-private-key", str(key)]
    return [*args, "--port", str(port), "--node-config", node_config]


def run_until_exit(name: str, args: list[str], base: Path, *, timeout: float) -> tuple[int, str]:
    """Start a SuperNode that should give up by itself; return its exit status and output."""
    launcher = Launcher(base / "logs")
    try:
        node = launcher.start(name, args, env=_environment(base / "home", base / "flwr-home"))
        try:
            code = node.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name} still running after {timeout} s:\n{node.output()[-3000:]}")
        return code, node.output()
    finally:
        launcher.stop_all()


@dataclass
class Federation:
    """Three registered, online SuperNodes, one per synthetic site."""

    link: SuperLink
    nodes: dict[str, Launched]
    node_ids: dict[str, str]
    base: Path
    launcher: Launcher
    commands: dict[str, tuple[list[str], dict[str, str]]] = field(default_factory=dict)

    def restart(self, site: str) -> Launched:
        """Start ``site``'s SuperNode again, the way the hospital started it the first time."""
        args, env = self.commands[site]
        self.nodes[site] = self.launcher.start(f"{site}-again", args, env=env)
        return self.nodes[site]


@contextlib.contextmanager
def _federation(
    superlink: SuperLink, tmp_path: Path, sites: tuple[str, ...]
) -> Iterator[Federation]:
    sites_dir = tmp_path / "sites"
    write_consortium(
        sites_dir,
        SynthConfig(sites=len(sites), image_size=32, samples_per_site=24),
        overwrite=True,
    )
    launcher = Launcher(tmp_path / "logs")
    try:
        nodes, node_ids, commands = {}, {}, {}
        pairs = {
            site: create_node_key_pair(superlink.keys_dir, f"{site}-{tmp_path.name}")
            for site in sites
        }
        # the consortium's CA-signed roster: each site checks its peers' SecAgg+ keys against it
        roster = create_roster(superlink.ca, tmp_path / "roster.json", pairs)
        for site, keys in pairs.items():
            node_ids[site] = superlink.register(keys.public)
            node = tmp_path / site  # a hospital's own disk
            node_config = (
                f"data-dir='{sites_dir / site}' site-id='{site}' ledger-dir='{node / 'ledger'}' "
                f"cache-dir='{node / 'cache'}' min-cell-count=1 identity-key='{keys.private}' "
                f"roster='{roster}' ca-cert='{superlink.ca.cert}' num-threads=1"
            )  # one torch thread each: the sites share the test machine's CPUs
            commands[site] = (
                supernode_command(
                    superlink, key=keys.private, port=free_port(), node_config=node_config
                ),
                _environment(node / "home", node / "flwr-home"),
            )
            nodes[site] = launcher.start(site, commands[site][0], env=commands[site][1])
        wait_for(
            "all SuperNodes online",
            lambda: all(superlink.nodes().get(i) == "online" for i in node_ids.values()),
            timeout=90,
            every=2.0,
            logs=[superlink.process, *nodes.values()],
        )
        yield Federation(superlink, nodes, node_ids, tmp_path, launcher, commands)
    finally:
        launcher.stop_all()
        # a stopped node may stay "online" to the SuperLink for a while: unregister it, so the
        # next federation's rounds sample only their own sites (a round listing more
        # participants than a site's roster is refused as padded with strangers)
        for node_id in node_ids.values():
            superlink.unregister(node_id)


@pytest.fixture
def federation(superlink: SuperLink, tmp_path: Path) -> Iterator[Federation]:
    with _federation(superlink, tmp_path, SITES) as started:
        yield started


@pytest.fixture
def federation_of_four(superlink: SuperLink, tmp_path: Path) -> Iterator[Federation]:
    with _federation(superlink, tmp_path, (*SITES, "site-4")) as started:
        yield started


# ---------------------------------------------------------------- tests


def _rounds(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_deployment_survives_a_site_lost_in_round_2_which_rejoins_later(
    federation: Federation, tmp_path: Path
) -> None:
    # Prepare
    run_dir = tmp_path / "run"
    killed, survivors = "site-3", ("site-1", "site-2")
    config = RUN_CONFIG.replace("num-server-rounds=2", "num-server-rounds=4")

    # Execute: flwr run ., pull site-3's plug as soon as round 1 is checkpointed (the SuperLink
    # declares the lost node unavailable after two missed heartbeats, 60 s), and start it
    # again once round 2 is checkpointed
    flwr_run = _run_and_kill(federation, tmp_path, config, killed=killed, restart_after=2)

    # Assert
    summary = json.loads((run_dir / "summary.json").read_text())
    first, second, *later = _rounds(run_dir)
    assert summary["status"] == "completed", summary
    assert summary["rounds-completed"] == 4
    # the site came back with its ledger: it trained again in a later round
    assert killed in later[-1]["train"]["sites"], [sorted(r["train"]["sites"]) for r in later]
    assert (
        later[-1]["train"]["sites"][killed]["epsilon"] > first["train"]["sites"][killed]["epsilon"]
    )
    assert sorted(first["train"]["sites"]) == list(SITES)
    # round 2: the two survivors trained and were evaluated; the lost site is a failure
    assert sorted(second["train"]["sites"]) == list(survivors)
    assert len(second["train"]["failures"]) == 1, second["train"]["failures"]
    assert "Node Unavailable" in next(iter(second["train"]["failures"].values()))
    assert sorted(second["evaluate"]["sites"]) == list(survivors)
    survivors_val = sum(second["evaluate"]["sites"][s]["num-examples"] for s in survivors)
    assert second["evaluate"]["aggregate"]["num-examples"] == survivors_val
    # the aggregate moved the model, and the run's final model is round 2's
    assert second["start-model-sha256"] != first["start-model-sha256"]
    assert second["model-sha256"] != first["model-sha256"]
    round_1 = load_file(str(run_dir / "rounds" / "round-0001" / "model.safetensors"))
    final = load_file(str(run_dir / "model.safetensors"))
    assert any((final[k] != round_1[k]).any() for k in final)
    # each survivor's epsilon is cumulative over the two rounds and within the study budget
    for site in survivors:
        eps_1 = first["train"]["sites"][site]["epsilon"]
        eps_2 = second["train"]["sites"][site]["epsilon"]
        assert 0 < eps_1 < eps_2 <= 8.0 + 1e-6, (site, eps_1, eps_2)
    assert flwr_run.proc.returncode == 0, flwr_run.output()[-4000:]


def test_unregistered_node_is_refused(superlink: SuperLink, tmp_path: Path) -> None:
    # Prepare: a valid P-384 key the operator never registered
    keys = create_node_key_pair(tmp_path, "rogue")
    args = supernode_command(
        superlink, key=keys.private, port=free_port(), node_config=f"data-dir='{tmp_path}'"
    )

    # Execute
    started = time.monotonic()
    code, output = run_until_exit("rogue", args, tmp_path, timeout=60)

    # Assert
    assert code != 0, output[-3000:]
    assert "Exit Code: 305" in output, output[-3000:]
    assert time.monotonic() - started < 60


def test_node_without_the_ca_cannot_join(superlink: SuperLink, tmp_path: Path) -> None:
    # Prepare: a registered key, but no --root-certificates (the system store does not know our CA)
    keys = create_node_key_pair(superlink.keys_dir, f"no-ca-{tmp_path.name}")
    node_id = superlink.register(keys.public)
    args = supernode_command(
        superlink,
        key=keys.private,
        port=free_port(),
        node_config=f"data-dir='{tmp_path}'",
        with_ca=False,
    )

    # Execute
    code, output = run_until_exit("no-ca", args, tmp_path, timeout=60)

    # Assert
    assert code != 0, output[-3000:]
    assert "CERTIFICATE_VERIFY_FAILED" in output, output[-3000:]
    assert superlink.nodes()[node_id] == "registered"  # it never came online


def test_local_launcher_starts_a_federation_and_stops_every_process(tmp_path: Path) -> None:
    # Prepare
    sites_dir = tmp_path / "sites"
    write_consortium(
        sites_dir, SynthConfig(sites=2, image_size=32, samples_per_site=20), overwrite=True
    )
    launcher = Launcher(tmp_path / "logs")
    env = _environment(tmp_path / "home", tmp_path / "unused-flwr-home")

    # Execute: start it as a developer would, then Ctrl-C (SIGTERM) it
    try:
        script = launcher.start(
            "local",
            [
                sys.executable,
                str(ROOT / "deploy" / "local.py"),
                str(tmp_path / "work"),
                "--sites-dir",
                str(sites_dir),
                "--min-cell-count",
                "1",
            ],
            env=env,
        )
        wait_for(
            "the local federation",
            lambda: "federation ready" in script.output() or script.proc.poll() is not None,
            timeout=180,
            logs=[script],
        )
        assert script.proc.poll() is None, script.output()[-4000:]
        pids = json.loads((tmp_path / "work" / "pids.json").read_text())
        tree = descendants(script.proc.pid)
        alive_before = all(alive(pid) for pid in pids.values())
        os.kill(script.proc.pid, signal.SIGTERM)
        code = script.proc.wait(timeout=60)
    finally:
        launcher.stop_all()

    # Assert
    assert sorted(pids) == ["site-1", "site-2", "superlink"]
    assert alive_before
    assert code == 0, script.output()[-4000:]
    assert not [pid for pid in tree if alive(pid)], "the launcher left processes behind"
    assert "flwr run . fedrad-local" in script.output()


def _run_and_kill(
    federation: Federation,
    tmp_path: Path,
    config: str,
    killed: str,
    restart_after: int | None = None,
) -> Launched:
    """Start ``flwr run .``, kill one SuperNode once round 1 is checkpointed, wait for the end.

    With ``restart_after=N`` the killed node is started again once round N is checkpointed.
    """
    run_dir = tmp_path / "run"
    launcher = Launcher(tmp_path / "logs")
    try:
        flwr_run = launcher.start(
            "flwr-run",
            [
                str(BIN / "flwr"),
                "run",
                ".",
                CONNECTION,
                "--stream",
                "-c",
                f"{config} out-dir='{run_dir}'",
            ],
            env=federation.link.env,
            cwd=ROOT,
        )
        wait_for(
            "round 1's checkpoint",
            lambda: (
                (run_dir / "rounds" / "round-0001").is_dir() or flwr_run.proc.poll() is not None
            ),
            timeout=400,
            logs=[flwr_run, federation.link.process],
        )
        assert (run_dir / "rounds" / "round-0001").is_dir(), flwr_run.output()[-6000:]
        federation.nodes[killed].kill()
        if restart_after is not None:
            checkpoint = run_dir / "rounds" / f"round-{restart_after:04d}"
            wait_for(
                f"round {restart_after}'s checkpoint",
                lambda: checkpoint.is_dir() or flwr_run.proc.poll() is not None,
                timeout=400,
                logs=[flwr_run, federation.link.process],
            )
            federation.restart(killed)
        wait_for(
            "the run to end",
            lambda: (run_dir / "summary.json").is_file() or flwr_run.proc.poll() is not None,
            timeout=400,
            every=1.0,
            logs=[flwr_run, federation.link.process],
        )
        with contextlib.suppress(subprocess.TimeoutExpired):
            flwr_run.proc.wait(timeout=30)
        assert (run_dir / "summary.json").is_file(), flwr_run.output()[-6000:]
        return flwr_run
    finally:
        launcher.stop_all()


@pytest.mark.timeout(1000)
def test_dp_and_secure_aggregation_survive_a_site_lost_mid_run(
    federation_of_four: Federation, tmp_path: Path
) -> None:
    # Prepare: DP-SGD at every site, SecAgg+ over 4 sites (threshold 3), one site will vanish
    config = (
        "num-server-rounds=2 image-size=32 batch-size=16 min-sites=3 dp='sample' "
        "study-id='deploy-secure' target-epsilon=8 optimizer='sgd' learning-rate=0.2 "
        "round-timeout=200 secure-aggregation=true"
    )

    # Execute
    _run_and_kill(federation_of_four, tmp_path, config, killed="site-4")

    # Assert: round 2 completed from the three survivors' masked updates only
    run_dir = tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    first, second = _rounds(run_dir)
    assert summary["status"] == "completed", summary
    assert first["train"]["secure-aggregation"]["contributors"] == 4
    secure = second["train"]["secure-aggregation"]
    assert secure["status"] == "completed", secure
    assert secure["contributors"] == 3
    assert second["train"]["sites"] == {}  # no individual update reached the coordinator
    assert second["model-sha256"] != first["model-sha256"]
    # evaluation sums were masked too: no per-site figures; the final model scored by 3 sites
    assert second["evaluate"]["secure-aggregation"] is True and second["evaluate"]["sites"] == {}
    assert second["evaluate"]["aggregate"]["num-examples"] > 0
    final_evaluation = summary["final-evaluation"]
    assert final_evaluation["status"] == "completed" and final_evaluation["contributors"] == 3
    round_1 = load_file(str(run_dir / "rounds" / "round-0001" / "model.safetensors"))
    final = load_file(str(run_dir / "model.safetensors"))
    assert all(np.isfinite(v).all() for v in final.values())
    assert any((final[k] != round_1[k]).any() for k in final)
