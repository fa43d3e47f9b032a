"""Peak memory of this process and every process it starts, for the benchmarks.

Flower's simulation engine runs its sites in Ray worker processes, and on the deployment engine
each site's warm worker starts in a new session and outlives the ClientApp process that started
it; both would escape ``getrusage(RUSAGE_CHILDREN)``, which keeps one process's peak, not a sum.
:class:`PeakMemory` makes this process a child subreaper (Linux ``prctl``), so that orphaned
descendants stay in its tree, and samples the proportional set size (PSS: shared pages split
between the processes that map them, so that a sum does not count torch's libraries once per
process) of the whole tree from ``/proc`` a few times a second.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import threading
from pathlib import Path
from types import TracebackType

from fedrad.commands.processes import descendants

_PR_SET_CHILD_SUBREAPER = 36


def _set_subreaper(on: bool) -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0)


def _tree(root: int) -> list[int]:
    return [root, *descendants(root)]


def _pss_bytes(pid: int) -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def tree_pss_bytes(root: int | None = None) -> int:
    """PSS in bytes summed over ``root`` (default: this process) and all its descendants."""
    return sum(_pss_bytes(pid) for pid in _tree(os.getpid() if root is None else root))


class PeakMemory:
    """``with PeakMemory() as peak: ...``; then ``peak.bytes`` is the highest sample."""

    def __init__(self, interval: float = 0.25) -> None:
        self.interval = interval
        self.bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-memory", daemon=True)

    def _sample(self) -> None:
        while True:
            self.bytes = max(self.bytes, tree_pss_bytes())
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> PeakMemory:
        _set_subreaper(True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        _set_subreaper(False)  # orphans adopted so far stay; later ones go to init again

    @property
    def gib(self) -> float:
        return self.bytes / 2**30
