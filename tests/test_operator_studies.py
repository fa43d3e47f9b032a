"""Operator commands on a real consortium on loopback: study start/stop, status, resume.

A consortium folder in the layout of :mod:`fedrad.commands.consortium` (CA, SuperLink
certificate, registered site keys, ``state/nodes.json``, the ``fedrad`` connection), a TLS
SuperLink with node authentication and one SuperNode per site, all real processes started with
the installed Flower commands, each stopped by PID at the end. The studies run through the
``fedrad`` command itself, as an operator runs them.

TODO(nodes): once ``fedrad provision`` / ``fedrad coordinator start`` / ``fedrad site start``
are merged, build the consortium with them instead of :class:`LoopbackConsortium`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from safetensors.numpy import load_file

from fedrad.commands.consortium import CONNECTION, Consortium
from fedrad.commands.processes import Launched, alive, free_port, start
from fedrad.synth import SynthConfig, write_consortium
from privacy.certs import create_ca, create_node_key_pair, create_roster, create_server_certificate
from privacy.ledger import PrivacyLedger
from server.digest import sha256_arrays
from tests.helpers import fedrad_command, run_command

pytestmark = pytest.mark.timeout(1500)  # deployment rounds take ~2 min here (issue 11 speed)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STUDY = "resume-study"
STUDY_OPTIONS = [
    "--num-server-rounds", "3", "--image-size", "16", "--batch-size", "16", "--min-sites", "2",
    "--dp", "sample", "--target-epsilon", "8", "--optimizer", "sgd", "--learning-rate", "0.5",
    "--round-timeout", "150",
]  # fmt: skip


def _local_script() -> Any:
    spec = importlib.util.spec_from_file_location("deploy_local", ROOT / "deploy" / "local.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def wait_for(what: str, check: Callable[[], object], *, timeout: float, logs: list[Path]) -> None:
    """Poll ``check()`` every second; fail with the tails of ``logs`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(1.0)
    tails = "\n".join(
        f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists()
    )
    pytest.fail(f"timed out after {timeout} s waiting for {what}\n{tails}")


@dataclass
class LoopbackConsortium:
    """A provisioned consortium folder, its SuperLink and SuperNodes, on loopback."""

    consortium: Consortium
    sites_data: Path
    port: int
    env: dict[str, str]
    link: Launched | None = None
    nodes: dict[str, Launched] = field(default_factory=dict)
    node_ids: dict[str, str] = field(default_factory=dict)

    @property
    def logs(self) -> Path:
        return self.consortium.logs

    def start_superlink(self) -> None:
        """The coordinator's SuperLink, on its state database (as a restart finds it)."""
        c = self.consortium
        self.link = start(
            "superlink",
            _local_script().superlink_command(
                ca_cert=c.ca_cert,
                cert=c.server_cert,
                key=c.server_key,
                port=self.port,
                database=c.database,
            ),
            env=self.env,
            log_dir=c.logs,
            append=True,
        )
        link = self.link
        wait_for(
            "the SuperLink to listen",
            lambda: "Uvicorn running on https://" in link.output() or link.proc.poll() is not None,
            timeout=60,
            logs=[link.log],
        )
        assert link.proc.poll() is None, link.output()[-3000:]

    def flwr(self, *args: str) -> dict[str, Any]:
        result = run_command(
            [str(BIN / "flwr"), *args, CONNECTION, "--format", "json"], env=self.env, timeout=60
        )
        return dict(json.loads(result.stdout[result.stdout.index("{") :]))

    def online(self) -> set[str]:
        nodes = self.flwr("supernode", "ls").get("nodes", [])
        ids = {n["node-id"] for n in nodes if n["status"] == "online"}
        return {site for site, node in self.node_ids.items() if node in ids}

    def start_site(self, site: str) -> None:
        folder = self.consortium.site(site)
        disk = self.consortium.root / "hospital-disks" / site
        node_config = (
            f"data-dir='{self.sites_data / site}' site-id='{site}' "
            f"ledger-dir='{disk / 'ledger'}' cache-dir='{disk / 'cache'}' min-cell-count=1 "
            f"identity-key='{folder.key}' roster='{folder.roster}' ca-cert='{folder.ca_cert}' "
            "num-threads=1"  # the sites share the test machine's CPUs
        )
        self.nodes[site] = start(
            site,
            [
                str(BIN / "flower-supernode"),
                "--superlink",
                f"127.0.0.1:{self.port}",
                "--root-certificates",
                str(folder.ca_cert),
                "--auth-supernode-private-key",
                str(folder.key),
                "--port",
                str(free_port()),
                "--node-config",
                node_config,
            ],
            env={**self.env, "FLWR_HOME": str(disk / "flwr-home")},
            log_dir=self.logs,
            append=True,
        )

    def ledger_epsilon(self, site: str) -> float:
        """The site's own ledger: cumulative epsilon it spent in the study."""
        ledger = self.consortium.root / "hospital-disks" / site / "ledger" / STUDY / f"{site}.json"
        if not ledger.is_file():
            return 0.0
        return PrivacyLedger.open(ledger.parent.parent, study_id=STUDY, site_id=site).spent_epsilon

    def stop_all(self) -> None:
        for launched in [*self.nodes.values(), *([self.link] if self.link else [])]:
            launched.stop()


def _provision(root: Path, sites: tuple[str, ...], port: int) -> Consortium:
    """The layout ``fedrad provision`` writes (made here with privacy.certs until it merges)."""
    consortium = Consortium(root)
    ca = create_ca(root / "ca")
    server = create_server_certificate(
        ca, consortium.coordinator, hostnames=["localhost"], ip_addresses=["127.0.0.1"]
    )
    assert server.cert == consortium.server_cert, server
    pairs = {site: create_node_key_pair(consortium.node_keys, site) for site in sites}
    create_roster(ca, consortium.roster, pairs)
    for site, pair in pairs.items():
        folder = consortium.site(site)
        folder.root.mkdir(parents=True)
        folder.key.write_bytes(pair.private.read_bytes())
        folder.key.chmod(0o600)
        folder.public.write_bytes(pair.public.read_bytes())
        folder.ca_cert.write_bytes(ca.cert.read_bytes())
        folder.roster.write_bytes(consortium.roster.read_bytes())
        sig = consortium.roster.with_name(consortium.roster.name + ".sig")
        if sig.is_file():
            folder.root.joinpath(sig.name).write_bytes(sig.read_bytes())
    consortium.flwr_home.mkdir(parents=True)
    (consortium.flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{ca.cert}"\n'
    )
    consortium.state.mkdir(parents=True)
    consortium.manifest.write_text(json.dumps({"sites": list(sites), "port": port}))
    return consortium


@contextlib.contextmanager
def loopback_consortium(tmp_path: Path, sites: tuple[str, ...]) -> Iterator[LoopbackConsortium]:
    port = free_port()
    consortium = _provision(tmp_path / "consortium", sites, port)
    data = tmp_path / "data"
    write_consortium(data, SynthConfig(sites=len(sites), image_size=16, samples_per_site=24))
    env = {
        **os.environ,
        "HOME": str(tmp_path / "home"),
        "FLWR_HOME": str(consortium.flwr_home),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT),
    }
    lc = LoopbackConsortium(consortium, data, port, env)
    try:
        lc.start_superlink()
        names = {}
        for site in sites:
            answer = lc.flwr("supernode", "register", str(consortium.site(site).public))
            lc.node_ids[site] = str(answer["node-id"])
            names[lc.node_ids[site]] = site
        consortium.node_names.write_text(json.dumps(names))
        for site in sites:
            lc.start_site(site)
        wait_for(
            "every SuperNode online",
            lambda: lc.online() == set(sites),
            timeout=120,
            logs=[lc.consortium.logs / f"{s}.log" for s in sites],
        )
        yield lc
    finally:
        lc.stop_all()


def fedrad(lc: LoopbackConsortium, *args: str, timeout: float = 120) -> str:
    result = run_command(fedrad_command(*args), env=lc.env, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, (
        f"fedrad {' '.join(args)} exited {result.returncode}:\n" + (result.stdout[-4000:])
    )
    return result.stdout


def _rounds(folder: Path) -> list[dict[str, Any]]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# Three rounds, killed after round 1: the round in flight (2) was charged to the sites'
# ledgers when they trained it, so its retry spends again. Each site sizes its noise for what
# is left of the study's budget over the remaining rounds (the accountant's history is the
# prior), so the study still ends within target-epsilon. Had the last round been in flight,
# nothing would be left, and the sites would refuse it (code 103): an honest refusal.
def test_coordinator_killed_after_round_1_resumes_without_losing_a_round(tmp_path: Path) -> None:
    sites = ("site-1", "site-2")
    with loopback_consortium(tmp_path, sites) as lc:
        root = str(lc.consortium.root)
        folder = lc.consortium.studies / STUDY
        started = fedrad(
            lc, "study", "start", root, "--study-id", STUDY, "--detach", *STUDY_OPTIONS
        )
        assert f"study {STUDY} started" in started
        record = json.loads((folder / "study.json").read_text())
        assert record["status"] == "running" and record["run-id"]
        study_log = Path(record["log"])
        wait_for(
            "round 1 recorded",
            lambda: any(r.get("round") == 1 for r in _rounds(folder)),
            timeout=600,
            logs=[study_log, lc.link.log if lc.link else study_log],
        )
        epsilon_1 = {site: lc.ledger_epsilon(site) for site in sites}
        assert all(e > 0 for e in epsilon_1.values()), epsilon_1

        # (d) the status names the sites and the study's round
        status = json.loads(fedrad(lc, "status", root, "--json"))
        assert set(status["sites"]) == set(sites)
        assert {s["status"] for s in status["sites"].values()} == {"online"}
        (study,) = status["studies"]
        assert study["study-id"] == STUDY and study["round"] >= 1
        assert study["num-server-rounds"] == 3
        assert set(study["epsilon"]) == set(sites)
        table = fedrad(lc, "status", root)
        assert all(site in table for site in sites)
        # the study may have moved on a round between the two calls
        assert any(f"{r}/3" in table for r in range(study["round"], 4)), table

        # the coordinator host dies: SuperLink and ServerApp, at once
        assert lc.link is not None
        lc.link.kill()
        pid = int(record["pid"])
        wait_for(
            "the study's flwr run to end", lambda: not alive(pid), timeout=60, logs=[study_log]
        )
        done_before = [r["round"] for r in _rounds(folder) if r.get("status") == "completed"]
        status = json.loads(fedrad(lc, "status", root, "--json"))
        assert status["studies"][0]["status"] == "interrupted"
        assert status["studies"][0]["resume"] == (f"fedrad study start {root} --study-id {STUDY}")

        lc.start_superlink()
        wait_for("the sites back online", lambda: lc.online() == set(sites), timeout=120, logs=[])
        resumed = fedrad(lc, "study", "start", root, "--study-id", STUDY, timeout=800)

        assert f"resumed after round {done_before[-1]}" in resumed
        assert "3 round(s) trained" in resumed and str(folder / "model.safetensors") in resumed
        rounds = [r["round"] for r in _rounds(folder)]
        assert rounds == [*done_before, *range(done_before[-1] + 1, 4)], rounds
        record = json.loads((folder / "study.json").read_text())
        assert record["status"] == "completed"
        assert [r["resumed-after-round"] for r in record["runs"]] == [0, done_before[-1]]
        run_record = json.loads((folder / "run.json").read_text())
        assert run_record["resumes"][0]["after-round"] == done_before[-1]
        # each round starts from the model the round before it ended with, across the restart
        metrics = _rounds(folder)
        for after in metrics[1:]:
            saved = folder / "rounds" / f"round-{after['round'] - 1:04d}" / "model.safetensors"
            assert after["start-model-sha256"] == sha256_arrays(load_file(str(saved)))
        epsilon_3 = {site: lc.ledger_epsilon(site) for site in sites}
        for site in sites:
            assert epsilon_3[site] >= epsilon_1[site] > 0, (site, epsilon_1, epsilon_3)
            assert epsilon_3[site] <= 8.0 + 1e-6  # within the study's target, retry included


@pytest.mark.timeout(60)
def test_status_names_sites_rounds_and_epsilon_without_a_coordinator(tmp_path: Path) -> None:
    from fedrad.commands.status import consortium_status

    consortium = Consortium(tmp_path / "consortium")
    consortium.state.mkdir(parents=True)
    consortium.manifest.write_text("{}")
    consortium.node_names.write_text(json.dumps({"11": "hospital-a", "22": "hospital-b"}))
    folder = consortium.studies / "s1"
    folder.mkdir(parents=True)
    (folder / "study.json").write_text(
        json.dumps({"status": "running", "pid": 0, "config": {"num-server-rounds": 4}})
    )
    rounds = [
        {"round": 1, "status": "completed", "train": {"sites": {
            "hospital-a": {"epsilon": 1.5}, "hospital-b": {"epsilon": 1.25}}, "failures": {}},
         "evaluate": {"aggregate": {"auc": 0.75, "loss": 0.5}}},
        {"round": 2, "status": "completed", "train": {"sites": {"hospital-a": {"epsilon": 2.0}},
         "failures": {"hospital-b (node 22)": "no reply within round-timeout"}},
         "evaluate": {"aggregate": {"auc": 0.8}}},
    ]  # fmt: skip
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rounds))

    report = consortium_status(consortium)

    assert report["coordinator"].startswith("unreachable: no ")
    assert report["sites"] == {
        "hospital-a": {"node-id": "11", "status": "unknown"},
        "hospital-b": {"node-id": "22", "status": "unknown"},
    }
    (study,) = report["studies"]
    assert study["status"] == "interrupted"  # running, but its flwr run is gone
    assert study["resume"] == f"fedrad study start {consortium.root} --study-id s1"
    assert (study["round"], study["num-server-rounds"]) == (2, 4)
    assert study["epsilon"] == {"hospital-a": 2.0, "hospital-b": 1.25}
    assert study["failures"] == {"hospital-b (node 22)": "no reply within round-timeout"}
    assert study["latest"] == {"auc": 0.8}
