"""``fedrad local-superlink``: the SuperLink that ``flwr run .`` starts for a local simulation.

``flwr run .`` on the ``local`` connection starts a detached ``flower-superlink --simulation``
(its files in ``$FLWR_HOME/local-superlink``) and leaves it running after the run, so that the
next ``flwr run`` starts faster. Flower gives no command to stop it; this one finds it by its
command line (the ``--simulation`` flag and a log file under this ``FLWR_HOME``) and stops it
by PID, with every process it started.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path
from typing import Any

from fedrad.commands.processes import alive, descendants

__all__ = ["add_parser", "find_local_superlinks", "stop_local_superlinks"]


def _flwr_home() -> Path:
    return Path(os.environ.get("FLWR_HOME", "~/.flwr")).expanduser()


def find_local_superlinks(flwr_home: Path | None = None) -> list[int]:
    """PIDs of the local simulation SuperLinks started for ``flwr_home`` (default $FLWR_HOME)."""
    runtime = str((flwr_home or _flwr_home()) / "local-superlink")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
            command = Path(args[0]).name if args else ""
            is_link = command == "flower-superlink" or any(
                Path(a).name == "flower-superlink" for a in args[:2]
            )
            if is_link and "--simulation" in args and any(a.startswith(runtime) for a in args):
                found.append(int(entry.name))
    return sorted(found)


def stop_local_superlinks(flwr_home: Path | None = None, *, grace: float = 10.0) -> list[int]:
    """SIGTERM each local SuperLink and its process tree, SIGKILL what is left; return PIDs."""
    import signal
    import time

    stopped = find_local_superlinks(flwr_home)
    for pid in stopped:
        tree = [pid, *descendants(pid)]
        for member in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(member, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(alive(p) for p in tree):
            time.sleep(0.1)
        for member in tree:
            if alive(member):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(member, signal.SIGKILL)
    return stopped


def _cmd_status(args: argparse.Namespace) -> int:
    pids = find_local_superlinks()
    if not pids:
        print(f"no local simulation SuperLink runs for FLWR_HOME={_flwr_home()}")
        return 0
    print(
        f"local simulation SuperLink running (pid {', '.join(map(str, pids))}) for "
        f"FLWR_HOME={_flwr_home()}; stop it with `fedrad local-superlink stop`"
    )
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    stopped = stop_local_superlinks()
    if stopped:
        print(f"stopped the local simulation SuperLink (pid {', '.join(map(str, stopped))})")
    else:
        print(f"no local simulation SuperLink was running for FLWR_HOME={_flwr_home()}")
    return 0


def add_parser(sub: Any) -> None:
    """Register ``fedrad local-superlink status|stop``."""
    parser = sub.add_parser(
        "local-superlink",
        help="show or stop the SuperLink that `flwr run .` leaves running for local simulation",
        description=__doc__.split("\n\n")[1],
    )
    commands = parser.add_subparsers(dest="local_command", required=True)
    status = commands.add_parser("status", help="say whether it runs, and its PIDs")
    status.set_defaults(handler=_cmd_status)
    stop = commands.add_parser("stop", help="stop it and every process it started, by PID")
    stop.set_defaults(handler=_cmd_stop)
