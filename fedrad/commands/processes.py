"""Processes fedrad starts (SuperLink, SuperNodes, ``flwr run``), each stopped by its PID.

One place for what the local launcher (``deploy/local.py``), the benchmarks and the deployment
tests all need: a free loopback port, a command started in its own process group with its output
in a log file, and a stop that reaches every descendant. Flower detaches some of its children
into sessions of their own, so a stop walks ``/proc`` for the whole tree instead of trusting
the process group alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedrad.commands.consortium import FLOWER_ENV

__all__ = ["Launched", "alive", "descendants", "free_port", "listening", "signal_tree", "start"]

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port free on loopback right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listening(port: int) -> bool:
    """Whether something accepts TCP connections on loopback ``port``."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, read from ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def signal_tree(pids: Sequence[int], sig: signal.Signals) -> None:
    """Send ``sig`` to each process's group, or to the process alone if it shares ours."""
    own_group = os.getpgrp()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            group = os.getpgid(pid)
            if group != own_group:
                os.killpg(group, sig)
            else:
                os.kill(pid, sig)


@dataclass
class Launched:
    """One started command: its process (in its own process group) and its log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        """Everything the command has written so far."""
        return self.log.read_text(errors="replace")

    def stop(self, *, grace: float = 10.0) -> None:
        """SIGTERM the process tree, then SIGKILL whatever is left after ``grace`` seconds."""
        pids = [self.proc.pid, *descendants(self.proc.pid)]
        signal_tree(pids, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and any(alive(p) for p in pids[1:]):
            time.sleep(0.1)
        signal_tree([p for p in pids if alive(p)], signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL the whole tree at once, as a crashing host would."""
        signal_tree([self.proc.pid, *descendants(self.proc.pid)], signal.SIGKILL)
        self.proc.wait(timeout=10)


def start(  # noqa: D417 - the environment is documented in the summary
    name: str,
    args: Sequence[str],
    *,
    env: Mapping[str, str],
    log_dir: Path,
    cwd: Path | None = None,
    append: bool = False,
) -> Launched:
    """Start ``args`` in a new session, its output going to ``log_dir/<name>.log``.

    The process gets ``env`` plus :data:`fedrad.commands.consortium.FLOWER_ENV`: Flower's
    telemetry off and no dependency installation at run time, whatever ``env`` says.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    path = log_dir / f"{name}.log"
    env = {**env, **FLOWER_ENV}  # every process fedrad starts: no telemetry, no runtime installs
    with path.open("ab" if append else "wb") as out:
        proc = subprocess.Popen(
            list(args),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    log.info("started %s (pid %d): %s", name, proc.pid, " ".join(args))
    return Launched(name, proc, path)
