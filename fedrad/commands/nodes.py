"""``fedrad coordinator start|stop`` and ``fedrad site start``: the consortium's long-running nodes.

``fedrad coordinator start CONSORTIUM_DIR`` checks the coordinator's files (TLS certificate and
key present and valid, the state database readable), starts ``flower-superlink`` with TLS and
node authentication, registers every site key of ``coordinator/node-keys/`` and writes
``state/nodes.json`` (node id -> site name) and ``pids.json``. It stays in the foreground until
SIGTERM or Ctrl-C (what systemd and compose run), or returns at once with ``--detach``;
``fedrad coordinator stop`` ends it by PID, with every process it started.

``fedrad site start SITE_DIR`` starts the hospital's ``flower-supernode`` from its
``site.toml``. When the SuperNode exits early, the reason Flower gives (a generic error and
"Exit Code") is turned into the likely cause and the fix.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from fedrad.commands.consortium import (
    CONNECTION,
    DEFAULT_PORT,
    Consortium,
    SiteFolder,
    SiteSettings,
    read_site_settings,
)
from fedrad.commands.processes import Launched, alive, descendants, listening, signal_tree, start
from fedrad.core.errors import ConfigError

__all__ = [
    "SUPERLINK",
    "add_parser",
    "check_coordinator",
    "coordinator_running",
    "diagnose_supernode",
    "flwr_json",
    "register_site_keys",
    "replace_registered_key",
    "site_command",
    "start_coordinator",
    "start_site",
    "stop_coordinator",
    "superlink_command",
]

log = logging.getLogger(__name__)

SUPERLINK = "superlink"
"""The name of the SuperLink in ``pids.json`` and of its log in ``logs/``."""
_BIN = Path(sys.executable).parent


def _command(name: str) -> str:
    """The Flower command ``name`` installed beside this Python, else the one on PATH."""
    local = _BIN / name
    return str(local) if local.exists() else name


# ------------------------------------------------------------------------- the coordinator


def _flwr_env(consortium: Consortium) -> dict[str, str]:
    return {**os.environ, "FLWR_HOME": str(consortium.flwr_home)}


def flwr_json(consortium: Consortium, args: list[str], *, timeout: float = 60) -> dict[str, Any]:
    """Run ``flwr ARGS CONNECTION --format json`` as the operator; return its JSON answer.

    ``flwr`` exits 0 even when the command fails: read ``success`` in the answer.
    """
    try:
        done = subprocess.run(
            [_command("flwr"), *args, CONNECTION, "--format", "json"],
            capture_output=True,
            text=True,
            env=_flwr_env(consortium),
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise ConfigError(f"`flwr {' '.join(args)}` gave no answer in {timeout:.0f} s.") from None
    out = done.stdout
    try:
        return dict(json.loads(out[out.index("{") :]))
    except ValueError:
        raise ConfigError(
            f"`flwr {' '.join(args)}` gave no JSON answer: {(out + done.stderr)[-2000:]}"
        ) from None


def _site_keys(consortium: Consortium) -> dict[str, Path]:
    return {p.stem: p for p in sorted(consortium.node_keys.glob("*.pub"))}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: object) -> None:
    from fedrad.core.durable import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, (json.dumps(data, indent=1) + "\n").encode(), mode=0o644)


def _listed_node_ids(consortium: Consortium) -> dict[str, str]:
    """Node id -> OpenSSH public key (type and key, no comment) from ``flwr supernode ls``."""
    nodes = flwr_json(consortium, ["supernode", "ls"]).get("nodes")
    found: dict[str, str] = {}
    for node in nodes if isinstance(nodes, list) else []:
        key = str(node.get("public-key") or node.get("owner-public-key") or "")
        if node.get("node-id") is not None and key:
            found[str(node["node-id"])] = " ".join(key.split()[:2])
    return found


def _register(consortium: Consortium, public_key: Path) -> str | None:
    """Register ``public_key``; return its node id, or None when it was already registered."""
    answer = flwr_json(consortium, ["supernode", "register", str(public_key)])
    if answer.get("success"):
        return str(answer.get("node-id"))
    if "already in use" in str(answer.get("error-message")):
        return None
    raise ConfigError(f"could not register {public_key}: {answer.get('error-message', answer)}")


def register_site_keys(consortium: Consortium) -> dict[str, str]:
    """Register every ``node-keys/NAME.pub``; write and return ``state/nodes.json``.

    Keys already registered (a restart on the same state database) keep their node ids, found
    in ``flwr supernode ls`` or the previous ``nodes.json``.
    """
    previous = _read_json(consortium.node_names)
    names: dict[str, str] = {}
    pending: dict[str, Path] = {}
    from concurrent.futures import ThreadPoolExecutor

    keys = _site_keys(consortium)
    with ThreadPoolExecutor(max_workers=8) as pool:  # each flwr call takes seconds to start
        answers = dict(
            zip(keys, pool.map(lambda k: _register(consortium, k), keys.values()), strict=True)
        )
    for site, key in keys.items():
        node_id = answers[site]
        if node_id is not None:
            names[node_id] = site
        else:
            pending[site] = key
    if pending:
        listed = _listed_node_ids(consortium)
        by_key = {key: node for node, key in listed.items()}
        for site, path in pending.items():
            wanted = " ".join(path.read_text().split()[:2])
            node = by_key.get(wanted) or next(
                (n for n, s in previous.items() if s == site and (not listed or n in listed)),
                None,
            )
            if node is not None:
                names[node] = site
            else:
                log.warning("%s is registered but its node id is unknown", site)
    _write_json(consortium.node_names, names)
    return names


def replace_registered_key(consortium: Consortium, site: str, old_key: Path) -> list[str]:
    """Register site's new ``node-keys/SITE.pub`` and unregister its old node (coordinator live).

    ``old_key`` is unused for the lookup (the node id comes from ``nodes.json``) but named in
    the messages. Returns what was done, one line each.
    """
    done: list[str] = []
    names = _read_json(consortium.node_names)
    for node_id, name in list(names.items()):
        if name == site:
            answer = flwr_json(consortium, ["supernode", "unregister", node_id])
            if answer.get("success"):
                done.append(f"unregistered {site}'s old node {node_id} ({old_key.name})")
                del names[node_id]
            else:
                done.append(
                    f"could not unregister {site}'s old node {node_id}: "
                    f"{answer.get('error-message', answer)}"
                )
    new_id = _register(consortium, consortium.node_keys / f"{site}.pub")
    if new_id is not None:
        names[new_id] = site
        done.append(f"registered {site}'s new key on the running coordinator: node {new_id}")
    _write_json(consortium.node_names, names)
    return done


def _superlink_pid(consortium: Consortium) -> int | None:
    pid = _read_json(consortium.pids).get(SUPERLINK)
    return pid if isinstance(pid, int) and alive(pid) else None


def coordinator_running(consortium: Consortium) -> bool:
    """Whether the SuperLink of ``pids.json`` runs."""
    return _superlink_pid(consortium) is not None


def check_coordinator(consortium: Consortium, *, insecure: bool = False) -> None:
    """Check the coordinator's TLS files and state database; raise ConfigError naming the fix."""
    if not insecure:
        missing = [
            p
            for p in (consortium.ca_cert, consortium.server_cert, consortium.server_key)
            if not p.is_file()
        ]
        if missing:
            raise ConfigError(
                f"missing TLS file(s): {', '.join(map(str, missing))}. Provision the consortium "
                f"with `fedrad provision {consortium.root} --coordinator HOST --sites NAME,...`, "
                "or restore the files; --insecure-for-testing runs without TLS and without "
                "node authentication (never with real data)."
            )
        try:
            cert = x509.load_pem_x509_certificate(consortium.server_cert.read_bytes())
        except ValueError as exc:
            raise ConfigError(
                f"{consortium.server_cert} is not a PEM certificate ({exc})."
            ) from None
        if cert.not_valid_after_utc <= dt.datetime.now(dt.timezone.utc):
            raise ConfigError(
                f"the coordinator certificate {consortium.server_cert} expired on "
                f"{cert.not_valid_after_utc:%Y-%m-%d}: sites will refuse it. Issue a new one "
                "with privacy.certs.create_server_certificate (same CA, same host names) and "
                "start again."
            )
    database = consortium.database
    if database.exists():
        problem = ""
        try:
            with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
                rows = db.execute("PRAGMA integrity_check").fetchall()
            if [tuple(r) for r in rows] != [("ok",)]:
                problem = "; ".join(str(r[0]) for r in rows[:5])
        except sqlite3.DatabaseError as exc:
            problem = str(exc)
        if problem:
            raise ConfigError(
                f"the SuperLink state database {database} is damaged ({problem}). Restore it "
                f"from a backup, or move it aside (mv {database} {database}.damaged) to start "
                "with an empty one: site keys are registered again from node-keys/, but runs "
                "recorded in it are lost (study checkpoints under studies/ are kept)."
            )


def superlink_command(
    consortium: Consortium, *, host: str, port: int, insecure: bool = False
) -> list[str]:
    """The ``flower-superlink`` command line ``coordinator start`` runs."""
    command = [_command("flower-superlink")]
    if insecure:
        command.append("--insecure")
    else:
        command += [
            "--ssl-ca-certfile",
            str(consortium.ca_cert),
            "--ssl-certfile",
            str(consortium.server_cert),
            "--ssl-keyfile",
            str(consortium.server_key),
            "--enable-supernode-auth",
        ]
    return command + [
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(consortium.database),
        "--log-file",
        str(consortium.logs / "superlink.flwr.log"),
    ]


def _write_insecure_connection(consortium: Consortium, port: int) -> None:
    consortium.flwr_home.mkdir(parents=True, exist_ok=True)
    (consortium.flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )


def start_coordinator(
    root: Path, *, port: int | None = None, host: str = "0.0.0.0", insecure: bool = False
) -> Launched:
    """Check, start the SuperLink, register the site keys; return the running SuperLink.

    Raises
    ------
    ConfigError
        If a check fails, the coordinator already runs, or the SuperLink does not come up.
    """
    consortium = Consortium(root)
    running = _superlink_pid(consortium)
    if running is not None:
        raise ConfigError(
            f"the coordinator of {root} already runs (pid {running}); stop it with "
            f"`fedrad coordinator stop {root}`."
        )
    check_coordinator(consortium, insecure=insecure)
    if port is None:
        manifest = _read_json(consortium.manifest)
        port = int(manifest.get("port", DEFAULT_PORT))
    if listening(port):
        raise ConfigError(f"port {port} is already in use; stop what listens there or use --port.")
    if insecure:
        log.warning(
            "INSECURE: the SuperLink runs without TLS and without node authentication; any "
            "process that reaches port %d can join. For testing only, never with real data.",
            port,
        )
        _write_insecure_connection(consortium, port)
    for folder in (consortium.state, consortium.logs):
        folder.mkdir(parents=True, exist_ok=True)
    link = start(
        SUPERLINK,
        superlink_command(consortium, host=host, port=port, insecure=insecure),
        env=_flwr_env(consortium),
        log_dir=consortium.logs,
        append=True,
    )
    try:
        _wait("the SuperLink to listen", lambda: listening(port), link, timeout=60)
        _write_json(consortium.pids, {SUPERLINK: link.proc.pid, "port": port})
        if not insecure:
            names = register_site_keys(consortium)
            log.info("registered %d site key(s): %s", len(names), ", ".join(names.values()))
    except BaseException:
        link.stop()
        with contextlib.suppress(FileNotFoundError):
            consortium.pids.unlink()
        raise
    return link


def _wait(what: str, check: Callable[[], bool], link: Launched, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if link.proc.poll() is not None:
            raise ConfigError(
                f"the SuperLink exited ({link.proc.returncode}) before {what}:\n"
                f"{link.output()[-2000:]}\nsee {link.log}"
            )
        if check():
            return
        time.sleep(0.2)
    raise ConfigError(f"timed out after {timeout:.0f} s waiting for {what}; see {link.log}")


def _stop_pid(pid: int, *, grace: float = 10.0) -> None:
    tree = [pid, *descendants(pid)]
    signal_tree(tree, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in tree):
        time.sleep(0.1)
    signal_tree([p for p in tree if alive(p)], signal.SIGKILL)


def stop_coordinator(root: Path, *, grace: float = 10.0) -> int | None:
    """Stop the coordinator's SuperLink (whole process tree) by its PID; return it or None."""
    consortium = Consortium(root)
    pid = _superlink_pid(consortium)
    if pid is not None:
        _stop_pid(pid, grace=grace)
    with contextlib.suppress(FileNotFoundError):
        consortium.pids.unlink()
    return pid


def _until_signal(launched: Launched, *, on_exit: Callable[[int], int]) -> int:
    """Wait in the foreground until SIGTERM/SIGINT (stop ``launched``) or until it exits."""
    stop = {"signal": 0}

    def _on_signal(signum: int, _frame: object) -> None:
        stop["signal"] = signum

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop["signal"]:
            code = launched.proc.poll()
            if code is not None:
                return on_exit(code)
            time.sleep(0.5)
        launched.stop()
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ------------------------------------------------------------------------------- a site


_NODE_CONFIG_SKIP = ("log-file",)


def _toml_value(key: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    text = str(value)
    if "'" in text or "\n" in text:
        raise ConfigError(f"site.toml [node-config] {key} = {text!r}: a value may not hold ' .")
    return f"'{text}'"


def site_command(settings: SiteSettings, *, insecure: bool = False) -> list[str]:
    """The ``flower-supernode`` command line for a site's settings."""
    node_config = " ".join(
        f"{key}={_toml_value(key, value)}"
        for key, value in settings.raw_node_config.items()
        if key not in _NODE_CONFIG_SKIP and value != ""
    )
    command = [_command("flower-supernode"), "--superlink", settings.superlink]
    if insecure:
        command.append("--insecure")
    else:
        command += [
            "--root-certificates",
            str(settings.root_certificates),
            "--auth-supernode-private-key",
            str(settings.auth_key),
        ]
    return command + ["--port", str(settings.clientappio_port), "--node-config", node_config]


@dataclass(frozen=True)
class _Cause:
    needles: tuple[str, ...]
    message: str


def _causes(site_dir: Path) -> list[_Cause]:
    """Known causes of a failed start, in the order they are checked.

    Port, expired certificate, CA, plaintext, unreachable, unknown key (the last: Flower's
    generic exit code 305 also ends the others).
    """
    return [
        _Cause(
            ("address already in use",),
            "the SuperNode's own port (clientappio-port in site.toml [site]) is taken by "
            "another process, e.g. a second site on this host: give each site its own port.",
        ),
        _Cause(
            ("certificate has expired", "CERTIFICATE_EXPIRED", "certificate expired"),
            "the coordinator's TLS certificate has expired: ask the operator to issue a new "
            "one (same CA and host names) and restart the coordinator.",
        ),
        _Cause(
            ("CERTIFICATE_VERIFY_FAILED",),
            f"ca.pem in {site_dir} is not the CA that signed the coordinator's certificate "
            "(or the address in site.toml is not one of its host names); get the consortium's "
            "ca.pem from the operator.",
        ),
        _Cause(
            (
                "WRONG_VERSION_NUMBER",
                "wrong version number",
                "Socket closed",
                "Trying to connect an http1.x server",
            ),
            "this site runs without TLS (--insecure-for-testing) but the coordinator requires "
            "TLS: start it without --insecure-for-testing (ca.pem and site.key from the "
            "operator).",
        ),
        _Cause(
            ("Connection refused", "failed to connect to all addresses", "UNAVAILABLE"),
            "the coordinator is unreachable at its address in site.toml ([site] superlink): "
            "check that it runs (`fedrad coordinator start`), the host name and port, and "
            "that the firewall lets this host reach it.",
        ),
        _Cause(
            ("Exit Code: 305", "Public key not recognized", "PERMISSION_DENIED", "UNAUTHENTICATED"),
            "the coordinator does not know this site's key: ask the operator to run `fedrad "
            "provision add-site` (a new site) or to re-register site.pub (after `fedrad "
            "provision rotate-site`, use the new site folder).",
        ),
    ]


def diagnose_supernode(output: str, site_dir: Path) -> str | None:
    """The operator-facing cause and fix of a SuperNode's early exit, from its ``output``."""
    for cause in _causes(site_dir):
        if any(needle in output for needle in cause.needles):
            return cause.message
    return None


def probe_coordinator(settings: SiteSettings, *, insecure: bool = False) -> str | None:
    """Dial the coordinator as the SuperNode would; the cause and fix if that cannot work.

    A TCP connection, then (unless ``insecure``) a TLS handshake against the site's
    ``ca.pem`` and the host name of ``[site] superlink``. Without TLS, a coordinator that
    answers a TLS handshake with the system's defaults is one that requires TLS.
    """
    import socket
    import ssl

    host, _, port_text = settings.superlink.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        return f"[site] superlink = {settings.superlink!r} is not HOST:PORT; fix site.toml."
    try:
        raw = socket.create_connection((host, port), timeout=5)
    except OSError as exc:
        return f"{exc}: " + _causes(settings.root_certificates.parent)[4].message
    with raw:
        context = ssl.create_default_context()
        context.set_alpn_protocols(["h2"])
        if insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        else:
            context.load_verify_locations(cafile=str(settings.root_certificates))
        try:
            with context.wrap_socket(raw, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as exc:
            return f"{exc.verify_message}: " + (
                diagnose_supernode(str(exc), settings.root_certificates.parent) or str(exc)
            )
        except (ssl.SSLError, OSError):
            return None  # the coordinator does not speak TLS: fine without it, else Flower says
    if insecure:
        return _causes(settings.root_certificates.parent)[3].message
    return None


def _site_settings(site_dir: Path, data_dir: Path | None) -> SiteSettings:
    settings = read_site_settings(site_dir, data_dir=data_dir)
    data = Path(str(settings.raw_node_config["data-dir"]))
    if not data.is_dir():
        raise ConfigError(
            f"the data folder {data} does not exist: set [node-config] data-dir in "
            f"{SiteFolder(site_dir).config} (or pass --data-dir) to this hospital's DICOM export."
        )
    return settings


def start_site(site_dir: Path, *, data_dir: Path | None = None, insecure: bool = False) -> Launched:
    """Check the site's settings and data folder, start its SuperNode; return it."""
    settings = _site_settings(site_dir, data_dir)
    if insecure:
        log.warning("INSECURE: this SuperNode connects without TLS; for testing only.")
    for key in ("ledger-dir", "cache-dir"):
        if settings.raw_node_config.get(key):
            Path(str(settings.raw_node_config[key])).mkdir(parents=True, exist_ok=True)
    return start(
        "supernode",
        site_command(settings, insecure=insecure),
        env={**os.environ, "FLWR_HOME": str(site_dir / "flwr-home")},
        log_dir=site_dir,
        append=True,
    )


_CONNECTED = "SuperNode ID:"
_RETRYING = "Connection attempt failed"


def _watch_site(
    node: Launched, settings: SiteSettings, site_dir: Path, offset: int, **kw: Any
) -> int | None:
    """Watch a starting SuperNode until it connects (None), exits or keeps failing (exit code).

    ``settle`` (seconds, keyword) bounds the wait; when the node keeps retrying, the probe's
    cause is printed and, if it is certain (TLS mismatch, wrong CA), the node is stopped.
    """
    deadline = time.monotonic() + float(kw.get("settle", 15.0))
    while time.monotonic() < deadline:
        if node.proc.poll() is not None:
            return _explain_exit(node, site_dir, offset)
        output = node.output()[offset:]
        if _CONNECTED in output:
            return None
        if output.count(_RETRYING) >= 2:
            cause = probe_coordinator(settings, insecure=bool(kw.get("insecure")))
            if cause:
                reachable = "unreachable" not in cause
                print(
                    f"{'error' if reachable else 'warning'}: the SuperNode cannot connect: {cause}"
                    + ("" if reachable else " It keeps retrying."),
                    file=sys.stderr,
                    flush=True,
                )
                if reachable:  # a TLS mismatch never heals: stop rather than retry forever
                    node.stop()
                    return 1
            return None
        time.sleep(0.2)
    return None


def _explain_exit(node: Launched, site_dir: Path, offset: int) -> int:
    output = node.output()[offset:]
    cause = diagnose_supernode(output, site_dir)
    print(output[-3000:], file=sys.stderr)
    print(
        f"error: the SuperNode exited ({node.proc.returncode}): "
        + (cause or f"see its log {node.log}"),
        file=sys.stderr,
    )
    return 1


# ---------------------------------------------------------------------------- command line


def _cmd_coordinator_start(args: argparse.Namespace) -> int:
    root = Path(args.consortium_dir).expanduser().resolve()
    link = start_coordinator(root, port=args.port, host=args.host, insecure=args.insecure)
    consortium = Consortium(root)
    print(
        f"coordinator running (pid {link.proc.pid}), log {link.log}; operator commands: "
        f"FLWR_HOME={consortium.flwr_home} flwr ... {CONNECTION}",
        flush=True,
    )
    if args.detach:
        return 0

    def _exited(code: int) -> int:
        print(f"error: the SuperLink exited ({code}); see {link.log}", file=sys.stderr)
        return 1

    try:
        return _until_signal(link, on_exit=_exited)
    finally:
        with contextlib.suppress(FileNotFoundError):
            consortium.pids.unlink()


def _cmd_coordinator_stop(args: argparse.Namespace) -> int:
    root = Path(args.consortium_dir).expanduser().resolve()
    pid = stop_coordinator(root)
    print(f"stopped the coordinator (pid {pid})" if pid else f"no coordinator runs for {root}")
    return 0


def _cmd_site_start(args: argparse.Namespace) -> int:
    site_dir = Path(args.site_dir).expanduser().resolve()
    data_dir = Path(args.data_dir).expanduser().resolve() if args.data_dir else None
    log_path = site_dir / "supernode.log"
    offset = log_path.stat().st_size if log_path.exists() else 0
    settings = _site_settings(site_dir, data_dir)
    node = start_site(site_dir, data_dir=data_dir, insecure=args.insecure)
    print(f"site SuperNode started (pid {node.proc.pid}), log {node.log}", flush=True)
    code = _watch_site(node, settings, site_dir, offset, settle=args.settle, insecure=args.insecure)
    if code is not None:
        return code
    connected = _CONNECTED in node.output()[offset:]
    print("connected to the coordinator" if connected else "not yet connected", flush=True)
    if args.detach:
        (site_dir / "supernode.pid").write_text(f"{node.proc.pid}\n")
        return 0
    return _until_signal(node, on_exit=lambda _code: _explain_exit(node, site_dir, offset))


def _cmd_site_stop(args: argparse.Namespace) -> int:
    site_dir = Path(args.site_dir).expanduser().resolve()
    pid_file = site_dir / "supernode.pid"
    try:
        pid = int(pid_file.read_text())
    except (FileNotFoundError, ValueError):
        print(f"no detached SuperNode recorded in {pid_file}")
        return 0
    if alive(pid):
        _stop_pid(pid)
        print(f"stopped the SuperNode (pid {pid})")
    pid_file.unlink()
    return 0


def _site_subcommands(subparsers: Any) -> Any:
    """The ``fedrad site`` subcommand action (made by site_check), or a new ``site`` group."""
    site = subparsers.choices.get("site")
    if site is None:
        site = subparsers.add_parser("site", help="run and inspect a hospital's site node")
        return site.add_subparsers(dest="site_command", required=True, metavar="COMMAND")
    return next(a for a in site._actions if isinstance(a, argparse._SubParsersAction))


def add_parser(subparsers: Any) -> None:
    """Add ``coordinator start|stop`` and ``site start|stop`` to the ``fedrad`` subparsers."""
    coordinator = subparsers.add_parser(
        "coordinator",
        help="start or stop the consortium's coordinator (TLS SuperLink, node authentication)",
        description=__doc__.split("\n\n")[1],
    )
    commands = coordinator.add_subparsers(
        dest="coordinator_command", required=True, metavar="COMMAND"
    )
    begin = commands.add_parser(
        "start",
        help="check the coordinator's files, start the SuperLink, register the site keys",
        description="Check TLS files and the state database, start flower-superlink, "
        "register coordinator/node-keys/*.pub, write state/nodes.json and pids.json. Stays in "
        "the foreground until SIGTERM or Ctrl-C unless --detach.",
    )
    begin.add_argument("consortium_dir", metavar="CONSORTIUM_DIR", help="a provisioned consortium")
    begin.add_argument(
        "--port", type=int, default=None, help="SuperLink port (default: consortium.json's)"
    )
    begin.add_argument(
        "--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0: every interface)"
    )
    begin.add_argument("--detach", action="store_true", help="return once it runs")
    begin.add_argument(
        "--insecure-for-testing",
        dest="insecure",
        action="store_true",
        help="no TLS and no node authentication: testing only, never with real data",
    )
    begin.set_defaults(handler=_cmd_coordinator_start)
    end = commands.add_parser(
        "stop", help="stop the coordinator by its PID (pids.json), with every process it started"
    )
    end.add_argument("consortium_dir", metavar="CONSORTIUM_DIR", help="a provisioned consortium")
    end.set_defaults(handler=_cmd_coordinator_stop)

    site_commands = _site_subcommands(subparsers)
    site_start = site_commands.add_parser(
        "start",
        help="start this hospital's SuperNode from SITE_DIR/site.toml",
        description="Start flower-supernode from SITE_DIR/site.toml (the folder the operator "
        "sent). In the foreground until SIGTERM or Ctrl-C unless --detach; when it exits early "
        "the likely cause and its fix are printed.",
    )
    site_start.add_argument("site_dir", metavar="SITE_DIR", help="the site folder (site.toml)")
    site_start.add_argument(
        "--data-dir", default=None, help="the data folder (overrides [node-config] data-dir)"
    )
    site_start.add_argument(
        "--detach",
        action="store_true",
        help="return once it runs; its PID goes to SITE_DIR/supernode.pid, output to "
        "SITE_DIR/supernode.log",
    )
    site_start.add_argument(
        "--settle",
        type=float,
        default=15.0,
        help="with --detach: seconds to watch for an early exit before returning (default 15)",
    )
    site_start.add_argument(
        "--insecure-for-testing",
        dest="insecure",
        action="store_true",
        help="connect without TLS (only to a coordinator started with --insecure-for-testing)",
    )
    site_start.set_defaults(handler=_cmd_site_start)
    site_stop = site_commands.add_parser(
        "stop", help="stop the SuperNode that `site start --detach` left running (by PID)"
    )
    site_stop.add_argument("site_dir", metavar="SITE_DIR", help="the site folder")
    site_stop.set_defaults(handler=_cmd_site_stop)
