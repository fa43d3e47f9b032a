"""Start a whole consortium on one machine, the way real sites start theirs: for development.

One TLS SuperLink with node authentication and one SuperNode per site folder, all on loopback,
each started with the installed Flower command an operator or a hospital runs::

    python deploy/local.py WORKDIR --sites-dir SITES_DIR [--nodes N] [--port P]

WORKDIR receives the CA, the SuperLink certificate and one node key pair per site
(``certs/``, made by ``privacy.certs`` unless already there), the operator's Flower
configuration (``flwr-home/config.toml`` with the connection ``fedrad-local``), each node's own
disk (``nodes/site-N/``: FLWR_HOME, privacy ledger, sample cache) and every log (``logs/``).
Once all nodes are online it prints the ``flwr run`` command and waits; Ctrl-C (or SIGTERM)
stops every process it started, by PID. Ports are picked free unless ``--port`` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from fedrad.commands.processes import Launched, free_port, listening, start  # noqa: E402
from fedrad.core.sites import list_site_dirs  # noqa: E402
from privacy.certs import (  # noqa: E402
    CertificateAuthority,
    NodeKeyPair,
    ServerCertificate,
    create_ca,
    create_node_key_pair,
    create_roster,
    create_server_certificate,
)

log = logging.getLogger("fedrad.deploy.local")

BIN = Path(sys.executable).parent
CONNECTION = "fedrad-local"


def superlink_command(
    *, ca_cert: Path, cert: Path, key: Path, port: int, database: Path, log_file: Path | None = None
) -> list[str]:
    """The ``flower-superlink`` command line: TLS, node authentication, loopback ``port``."""
    command = [
        str(BIN / "flower-superlink"),
        "--ssl-ca-certfile",
        str(ca_cert),
        "--ssl-certfile",
        str(cert),
        "--ssl-keyfile",
        str(key),
        "--enable-supernode-auth",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
        "--database",
        str(database),
    ]
    return command + ([] if log_file is None else ["--log-file", str(log_file)])


def flwr_json(args: list[str], *, env: dict[str, str]) -> dict[str, object]:
    """Run a ``flwr ... --format json`` command and return its JSON answer."""
    out = subprocess.run(
        [str(BIN / "flwr"), *args, "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    ).stdout
    try:
        return dict(json.loads(out[out.index("{") :]))
    except ValueError:
        raise RuntimeError(f"flwr {' '.join(args)} gave no JSON answer:\n{out}") from None


def make_credentials(
    certs: Path, sites: Sequence[str]
) -> tuple[CertificateAuthority, ServerCertificate]:
    """The CA, the SuperLink certificate and one key pair per site; existing files are kept."""
    ca = CertificateAuthority(cert=certs / "ca.pem", key=certs / "ca.key")
    if not ca.cert.is_file():
        ca = create_ca(certs, common_name="fedrad local CA")
    server = ServerCertificate(
        cert=certs / "superlink.pem", key=certs / "superlink.key", ca=ca.cert
    )
    if not server.cert.is_file():
        server = create_server_certificate(
            ca, certs, hostnames=["localhost"], ip_addresses=["127.0.0.1"]
        )
    for site in sites:
        if not (certs / f"{site}.key").is_file():
            create_node_key_pair(certs, site)
    # the CA-signed roster every site checks its peers' secure-aggregation keys against
    create_roster(
        ca,
        certs / "roster.json",
        {site: NodeKeyPair(certs / f"{site}.key", certs / f"{site}.pub") for site in sites},
    )
    return ca, server


def register(public_key: Path, *, env: dict[str, str]) -> None:
    """``flwr supernode register``; a key already registered (same database) is fine."""
    answer = flwr_json(["supernode", "register", str(public_key), CONNECTION], env=env)
    # flwr exits 0 even when registration fails: read the answer, not the status
    if not answer.get("success") and "already in use" not in str(answer.get("error-message")):
        raise RuntimeError(f"could not register {public_key}: {answer}")
    log.info("registered %s: %s", public_key.name, answer.get("node-id", "already registered"))


def wait_until(what: str, check: Callable[[], bool], *, timeout: float, link: Launched) -> None:
    """Poll ``check()`` every second; raise if the SuperLink dies or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if link.proc.poll() is not None:
            raise RuntimeError(f"the SuperLink exited ({link.proc.returncode}); see {link.log}")
        if check():
            return
        time.sleep(1.0)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}; see {link.log}")


def _online(env: dict[str, str], expected: int) -> bool:
    nodes = flwr_json(["supernode", "ls", CONNECTION], env=env).get("nodes")
    statuses = [n.get("status") for n in nodes] if isinstance(nodes, list) else []
    return statuses.count("online") >= expected


def launch(
    workdir: Path,
    site_dirs: Sequence[Path],
    children: list[Launched],
    *,
    port: int,
    min_cell_count: int,
    warm_worker: bool = True,
    num_threads: int | None = None,
) -> None:
    """Start the SuperLink and one SuperNode per site folder; return once all are online.

    The sites share this machine's CPUs: each site's torch gets ``num_threads`` threads (by
    default the CPUs divided among the sites, at least one), as a simulated site gets its
    ``--client-cpus``; on its own machine a site uses its node config's ``num-threads``.

    ``warm_worker=False`` sets the sites' node config ``warm-worker=false`` (a fresh ClientApp
    process does each message's work, as before the warm worker; ``bench/`` compares the two).

    Every process started is appended to ``children`` at once, so a caller can stop them all
    even when a later step fails.
    """
    sites = [d.name for d in site_dirs]
    if num_threads is None:
        num_threads = max(1, (os.cpu_count() or 1) // max(1, len(sites)))
    ca, server = make_credentials(workdir / "certs", sites)
    logs = workdir / "logs"
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\nroot-certificates = "{ca.cert}"\n'
    )
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    link = start(
        "superlink",
        superlink_command(
            ca_cert=ca.cert,
            cert=server.cert,
            key=server.key,
            port=port,
            database=workdir / "superlink.db",
        ),
        env=env,
        log_dir=logs,
        append=True,
    )
    children.append(link)
    wait_until("the SuperLink to listen", lambda: listening(port), timeout=60, link=link)
    for site, data_dir in zip(sites, site_dirs, strict=True):
        register(workdir / "certs" / f"{site}.pub", env=env)
        disk = workdir / "nodes" / site
        node_config = (
            f"data-dir='{data_dir}' site-id='{site}' ledger-dir='{disk / 'ledger'}' "
            f"cache-dir='{disk / 'cache'}' min-cell-count={min_cell_count} "
            f"identity-key='{workdir / 'certs' / f'{site}.key'}' "
            f"roster='{workdir / 'certs' / 'roster.json'}' ca-cert='{ca.cert}'"
            f" warm-worker={'true' if warm_worker else 'false'} num-threads={num_threads}"
        )
        children.append(
            start(
                site,
                [
                    str(BIN / "flower-supernode"),
                    "--superlink",
                    f"127.0.0.1:{port}",
                    "--root-certificates",
                    str(ca.cert),
                    "--auth-supernode-private-key",
                    str(workdir / "certs" / f"{site}.key"),
                    "--port",
                    str(free_port()),
                    "--node-config",
                    node_config,
                ],
                env={**env, "FLWR_HOME": str(disk / "flwr-home")},
                log_dir=logs,
                append=True,
            )
        )
    wait_until(
        f"{len(sites)} SuperNodes online", lambda: _online(env, len(sites)), timeout=120, link=link
    )


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path, help="folder for certificates, state and logs")
    parser.add_argument(
        "--sites-dir",
        type=Path,
        required=True,
        help="folder of site folders (e.g. written by 'fedrad synth')",
    )
    parser.add_argument(
        "--nodes", type=int, default=0, help="number of SuperNodes (default: one per site folder)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=0,
        help="SuperLink port for Fleet, Control and Runtime APIs (default: free)",
    )
    parser.add_argument(
        "--min-cell-count",
        type=int,
        default=10,
        help="each node's smallest reported subgroup count",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Start the local consortium, print how to run on it, stop everything on Ctrl-C."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True
    )
    args = _parse_args(argv)
    sites_dir = args.sites_dir.expanduser().resolve()
    site_dirs = list_site_dirs(sites_dir)
    if args.nodes:
        if args.nodes > len(site_dirs):
            raise SystemExit(
                f"--nodes {args.nodes}: {args.sites_dir} holds {len(site_dirs)} site(s)."
            )
        site_dirs = site_dirs[: args.nodes]
    workdir = args.workdir.expanduser().resolve()
    stop = {"signal": 0}

    def _on_signal(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    children: list[Launched] = []
    try:
        launch(
            workdir,
            site_dirs,
            children,
            port=args.port or free_port(),
            min_cell_count=args.min_cell_count,
        )
        flwr_home = workdir / "flwr-home"
        (workdir / "pids.json").write_text(json.dumps({c.name: c.proc.pid for c in children}))
        print(
            f"fedrad local federation ready: {len(children) - 1} SuperNode(s), logs in "
            f"{workdir / 'logs'}\nRun on it from the repository root with:\n"
            f"  FLWR_HOME={flwr_home} flwr run . {CONNECTION} --stream "
            f"-c \"sites-dir='{sites_dir}' out-dir='{workdir / 'runs' / 'run-1'}'\"\n"
            "Ctrl-C stops every process.",
            flush=True,
        )
        while not stop["signal"]:
            if children[0].proc.poll() is not None:
                log.error(
                    "the SuperLink exited (%s); see %s",
                    children[0].proc.returncode,
                    children[0].log,
                )
                return 1
            time.sleep(0.5)
        return 0
    finally:
        for child in reversed(children):
            child.stop()
        log.info("stopped %d process(es)", len(children))


if __name__ == "__main__":
    sys.exit(main())
