"""A site's warm worker: one long-lived process that runs the site's handlers, one by one.

On Flower's deployment engine every message starts a fresh ClientApp process, which would
import torch, MONAI and Opacus and reload the site's dataset each time. Instead the ClientApp
(:mod:`client.app`) forwards the message and its Context to this worker over a Unix socket; the
worker runs :data:`client.handlers.app` in-process (every handler, SecAgg+ included), keeping
torch, the dataset and the models loaded, and answers with the reply Message and the updated
``context.state`` (where a SecAgg+ round keeps its session between messages).

Why pickle over a socket is safe here: the socket lies in a folder under the site's own cache
folder that the ClientApp checks, before every connection, is a real folder (not a link) owned
by the same OS user with mode 0700, so no other user can reach the socket; the worker
also checks its peer's user id (``SO_PEERCRED``). Only a process already running as the site's
user, who could read the site's keys and data anyway, can talk to it. A folder with another
owner or a wider mode is refused, never repaired.

The folder is named by a digest of the node config, fedrad's version and its code: a changed
node config or a code update reaches a fresh worker, never a stale one, so everything a site
decides still comes from the node config of the message's Context. A worker exits after
``--idle-seconds`` without a message or when the SuperNode that started it is gone.

Only stdlib and flwr at the top: the ClientApp imports this module for every message.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import pickle
import socket
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict

log = logging.getLogger(__name__)

IDLE_SECONDS = 30 * 60
"""A worker with no message for this long exits (the next message starts a new one)."""

START_TIMEOUT = 120.0
"""Seconds the ClientApp waits for a worker it started to listen."""

_ROOT = Path(__file__).resolve().parents[1]
_PACKAGES = ("client", "privacy", "models", "fedrad")
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux, 104 on macOS
_HEADER = struct.Struct("!Q")


class WorkerError(Exception):
    """The warm worker cannot be used (unsafe folder, failed start, broken connection)."""


@dataclass(frozen=True)
class WorkerFolder:
    """Where one site's worker for one node config and code version listens and logs."""

    path: Path

    @property
    def socket(self) -> Path:
        """The worker's Unix socket."""
        return self.path / "worker.sock"

    @property
    def log(self) -> Path:
        """The worker's log (its stdout and stderr)."""
        return self.path / "worker.log"

    @property
    def pid_file(self) -> Path:
        """The worker's process id, written when it listens."""
        return self.path / "worker.pid"


def code_digest() -> str:
    """A digest of fedrad's Python sources (the packages a site runs) and its version."""
    digest = hashlib.sha256()
    try:
        from importlib.metadata import version

        digest.update(version("fedrad").encode())
    except Exception:  # not installed (a source checkout, a FAB): the sources decide alone
        digest.update(b"unversioned")
    for package in _PACKAGES:
        for path in sorted((_ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(_ROOT)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def worker_key(node_config: Mapping[str, Any]) -> str:
    """The worker's name: a digest of the node config and of the code (:func:`code_digest`)."""
    payload = json.dumps(dict(node_config), sort_keys=True, default=str)
    return hashlib.sha256(f"{payload}\n{code_digest()}".encode()).hexdigest()[:24]


def workers_root(node_config: Mapping[str, Any]) -> Path:
    """``<cache-dir>/workers``, or ``~/.cache/fedrad/workers`` when the site names no cache."""
    cache = str(node_config.get("cache-dir", "") or "")
    return (Path(cache).expanduser() if cache else Path.home() / ".cache" / "fedrad") / "workers"


def check_private_folder(path: Path) -> None:
    """Raise :class:`WorkerError` unless ``path`` is a folder (no link) of this user, mode 0700."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise WorkerError(f"{path} is not a folder (a link or a file): refusing its socket.")
    if info.st_uid != os.getuid():
        raise WorkerError(
            f"{path} belongs to user id {info.st_uid}, not to this site's user "
            f"({os.getuid()}): refusing its socket. Remove the folder; it is recreated."
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise WorkerError(
            f"{path} has mode {stat.S_IMODE(info.st_mode):o}, so other users can reach its "
            f"socket: refusing it. Run 'chmod 700 {path}' or remove the folder."
        )


def _private_folder(path: Path) -> None:
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700, parents=True)
    check_private_folder(path)


def worker_folder(node_config: Mapping[str, Any]) -> WorkerFolder:
    """The checked, private folder of the worker for this node config (created if absent)."""
    root = workers_root(node_config)
    _private_folder(root)
    folder = WorkerFolder(root / worker_key(node_config))
    _private_folder(folder.path)
    return folder


@contextlib.contextmanager
def _socket_address(path: Path) -> Iterator[str]:
    """An address for the Unix socket ``path`` that fits ``sun_path`` however long ``path`` is.

    A short path is used as it is. A long one (a deep ``cache-dir``) is reached through its
    folder, opened once: ``/proc/self/fd/N/worker.sock`` names the same file in a few bytes,
    and the folder's own permissions still decide who may connect.
    """
    if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
        yield str(path)
        return
    if not Path("/proc/self/fd").is_dir():
        raise WorkerError(
            f"the worker socket {path} is longer than a Unix socket path may be "
            f"({_MAX_SOCKET_PATH} bytes): give the site a shorter 'cache-dir'."
        )
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _send(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_HEADER.pack(len(payload)) + payload)


def _receive(sock: socket.socket) -> bytes:
    def exactly(size: int) -> bytes:
        chunks = bytearray()
        while len(chunks) < size:
            chunk = sock.recv(min(size - len(chunks), 1 << 20))
            if not chunk:
                raise WorkerError("the connection to the worker closed mid-message.")
            chunks.extend(chunk)
        return bytes(chunks)

    (size,) = _HEADER.unpack(exactly(_HEADER.size))
    return exactly(size)


def _supernode_pid() -> int:
    """The nearest ancestor running ``flower-supernode``, else this process's parent."""
    pid = os.getppid()
    while pid > 1:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            break
        if b"flower-supernode" in cmdline:
            return pid
        pid = next(
            (int(line.split()[1]) for line in status.splitlines() if line.startswith("PPid:")), 1
        )
    return os.getppid()


def start_worker(folder: WorkerFolder, *, idle_seconds: float = IDLE_SECONDS) -> None:
    """Start a worker in ``folder``, detached in its own session, logging beside its socket."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    with folder.log.open("ab") as out:
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "client.worker",
                str(folder.path),
                "--parent-pid",
                str(_supernode_pid()),
                "--idle-seconds",
                str(idle_seconds),
            ],
            cwd=_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )


def _connect(folder: WorkerFolder, *, timeout: float) -> socket.socket:
    check_private_folder(folder.path)  # again: the folder must still be ours right now
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with _socket_address(folder.socket) as address:
            sock.connect(address)
    except OSError:
        sock.close()
        raise
    sock.settimeout(None)  # a message may train for as long as it takes
    return sock


def connect(folder: WorkerFolder, *, idle_seconds: float = IDLE_SECONDS) -> socket.socket:
    """Connect to the folder's worker, starting it first if none listens."""
    with contextlib.suppress(OSError):
        return _connect(folder, timeout=5.0)
    with (folder.path / "start.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one ClientApp starts the worker; the others wait
        with contextlib.suppress(OSError):
            return _connect(folder, timeout=5.0)
        with contextlib.suppress(FileNotFoundError):
            folder.socket.unlink()  # a dead worker's socket
        start_worker(folder, idle_seconds=idle_seconds)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                return _connect(folder, timeout=5.0)
            time.sleep(0.05)
    raise WorkerError(
        f"the site's worker did not start within {START_TIMEOUT:.0f} s; see {folder.log}."
    )


def forward(message: Message, context: Context, *, idle_seconds: float = IDLE_SECONDS) -> Message:
    """Run ``message`` in the site's warm worker; copy the worker's ``context.state`` back.

    ``idle_seconds`` applies to a worker this call starts.
    """
    folder = worker_folder(context.node_config)
    with connect(folder, idle_seconds=idle_seconds) as sock:
        _send(sock, pickle.dumps((message, context), protocol=pickle.HIGHEST_PROTOCOL))
        reply, state = pickle.loads(_receive(sock))
    if not isinstance(reply, Message) or not isinstance(state, RecordDict):
        raise WorkerError(f"the worker in {folder.path} answered something that is no reply.")
    context.state = state
    return reply


def _peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _serve_one(conn: socket.socket, app: Any) -> None:
    if _peer_uid(conn) != os.getuid():
        log.warning("refused a connection from user id %d", _peer_uid(conn))
        return
    message, context = pickle.loads(_receive(conn))
    started = time.perf_counter()
    reply = app(message, context)
    log.info("%s served in %.2f s", message.metadata.message_type, time.perf_counter() - started)
    _send(conn, pickle.dumps((reply, context.state), protocol=pickle.HIGHEST_PROTOCOL))


def serve(folder: WorkerFolder, *, parent_pid: int, idle_seconds: float) -> None:
    """Listen on the folder's socket and serve messages until idle or the parent is gone."""
    check_private_folder(folder.path)
    with contextlib.suppress(FileNotFoundError):
        folder.socket.unlink()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with _socket_address(folder.socket) as address:
        server.bind(address)
    os.chmod(folder.socket, 0o600)
    server.listen(8)
    folder.pid_file.write_text(str(os.getpid()))
    log.info("worker %d listening on %s (parent %d)", os.getpid(), folder.socket, parent_pid)
    from client.handlers import app  # torch, MONAI, Opacus: once, while the first waits

    server.settimeout(1.0)
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle_seconds and _alive(parent_pid):
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(None)
                try:
                    _serve_one(conn, app)
                except Exception:  # a broken connection ends that message, not the worker
                    log.exception("a message failed in the worker")
            last = time.monotonic()
        log.info("worker %d exits: idle or its parent %d is gone", os.getpid(), parent_pid)
    finally:
        server.close()
        with contextlib.suppress(FileNotFoundError):
            folder.socket.unlink()
        with contextlib.suppress(FileNotFoundError):
            folder.pid_file.unlink()


def main(argv: list[str] | None = None) -> None:
    """``python -m client.worker FOLDER --parent-pid PID``: the worker's entry point."""
    parser = argparse.ArgumentParser(description="A fedrad site's warm ClientApp worker.")
    parser.add_argument("folder", type=Path, help="the worker's private folder (mode 0700)")
    parser.add_argument(
        "--parent-pid", type=int, required=True, help="exit when this process is gone"
    )
    parser.add_argument(
        "--idle-seconds",
        type=float,
        default=IDLE_SECONDS,
        help=f"exit after this long without a message (default {IDLE_SECONDS})",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    serve(WorkerFolder(args.folder), parent_pid=args.parent_pid, idle_seconds=args.idle_seconds)


if __name__ == "__main__":
    main()
