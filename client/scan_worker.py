"""Run a per-file task in worker processes that can be stopped: a hang or a crash costs one file.

The parent sends chunks of paths to each worker over its own pipe. A worker runs the task on
each path in turn, records in shared memory which path it is on and since when, and sends the
chunk's results back in one message. The parent kills a worker whose current path runs past
the timeout, and notices a worker that died (segfault, out-of-memory kill); in both cases the
path in progress is reported lost and the rest of its chunk goes to a fresh worker.

A run may also name a ``finish`` step that a worker applies to a chunk's results before
sending them: work that is cheaper done for many paths at once (preprocessing small images
as one batch). It reports which path it is on the same way, so the timeout still applies and
blames one path.

Workers are forked where the platform allows it, so they start in milliseconds with the
parent's imports (pydicom, the decoders) already loaded; elsewhere they are spawned, and the
task must then be picklable.

A run may bound each worker's memory (``memory_limit_bytes``): a worker caps its address space
(``RLIMIT_AS``) at what it maps when it starts plus that budget, so that a file which expands
past every check raises ``MemoryError`` in the task (which turns it into a verdict) instead of
taking the site's memory. Where the platform cannot (no ``RLIMIT_AS`` or ``/proc``: only
Linux has both), the run logs a warning and goes on unbounded.
"""

from __future__ import annotations

import faulthandler
import logging
import math
import multiprocessing as mp
import os
import signal
import sys
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar

if sys.platform != "win32":
    import resource

log = logging.getLogger(__name__)

R = TypeVar("R")
LostKind = Literal["timeout", "crash"]
"""How a path can be lost: its task ran past the timeout, or its worker died (or it raised)."""
MAX_CHUNK = 128
MAX_CHUNK_CHARS = 16_000  # far below a pipe's 64 KiB buffer
IN_FLIGHT = 2  # chunks sent to a worker ahead of its results: it never waits for the parent
_SEQ, _INDEX, _STARTED = 0, 1, 2  # slots of a worker's shared progress array


@dataclass(frozen=True)
class _Failure:
    """Stands in a chunk's results for a task that raised (a bug: tasks should not raise)."""

    message: str


def quiet_worker() -> None:
    """Keep per-file warnings and crash dumps out of a worker's output (its results say why).

    An ``initializer`` for :func:`run_in_workers` whose tasks read DICOM files.
    """
    warnings.simplefilter("ignore")
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    faulthandler.disable()  # a decoder crash is reported as worker-crashed, not as a dump


def limit_address_space(budget_bytes: int) -> int | None:
    """Cap this process's address space at what it maps now plus ``budget_bytes``.

    The soft limit is lowered (never above the hard one), so an allocation past it raises
    ``MemoryError``. Returns the limit set, or None where the platform cannot set one.
    """
    if sys.platform == "win32" or not hasattr(resource, "RLIMIT_AS"):
        return None
    try:
        with open("/proc/self/statm", encoding="ascii") as fh:
            mapped = int(fh.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = mapped + budget_bytes
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (OSError, ValueError, IndexError):
        return None
    return limit


def memory_limit() -> int | None:
    """Return the address-space limit of the running process in bytes (None: no limit)."""
    if sys.platform == "win32" or not hasattr(resource, "RLIMIT_AS"):
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY else soft


Finish = Callable[[list[Any], Callable[[int], None]], list[Any]]
"""``finish(results, mark)``: a chunk's results, done together; ``mark(i)`` says it is on
``results[i]`` (and restarts that path's clock). It returns one result per result given."""


@dataclass
class _Worker:
    """One worker process, its pipe, its progress slots and the chunks sent to it."""

    process: BaseProcess
    conn: Connection
    progress: Any  # shared doubles: chunk number, position in it, monotonic start time
    chunks: dict[int, list[int]] = field(default_factory=dict)  # chunk number -> indices


def _serve(
    conn: Connection,
    progress: Any,
    task: Callable[[str], object],
    cwd: str,
    initializer: Callable[[], None] | None,
    parent_pid: int,
    finish: Finish | None = None,
    memory_limit_bytes: int | None = None,
) -> None:
    """Worker loop: run ``task`` on each path of each chunk received, reply per chunk."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the parent, which decides
    os.chdir(cwd)
    if memory_limit_bytes is not None:
        limit_address_space(memory_limit_bytes)
    if initializer is not None:
        initializer()
    while True:
        while not conn.poll(1.0):
            if os.getppid() != parent_pid:  # orphaned: the parent is gone
                return
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        number, chunk = message
        results: list[object] = []
        for index, item in enumerate(chunk):
            progress[_STARTED] = time.monotonic()  # the time first: see _in_progress
            progress[_SEQ], progress[_INDEX] = number, index
            if memory_limit_bytes is not None:  # each file's budget, from what is mapped now
                limit_address_space(memory_limit_bytes)
            try:
                results.append(task(item))
            except Exception as exc:  # noqa: BLE001 - reported as a lost path, worker goes on
                results.append(_Failure(f"the check raised {exc.__class__.__name__}: {exc}"))
        if finish is not None:
            _finish_chunk(finish, results, number, progress)
        conn.send((number, results))


def _finish_chunk(finish: Finish, results: list[object], number: int, progress: Any) -> None:
    """Replace a chunk's results (those that did not fail) by ``finish`` of them, in place."""
    done = [i for i, r in enumerate(results) if not isinstance(r, _Failure)]

    def mark(position: int) -> None:
        progress[_STARTED] = time.monotonic()  # the time first: see _in_progress
        progress[_SEQ], progress[_INDEX] = number, done[position]

    if not done:
        return
    mark(0)
    try:
        finished = finish([results[i] for i in done], mark)
        if len(finished) != len(done):
            raise ValueError(f"{len(finished)} results for {len(done)} paths")
    except Exception as exc:  # noqa: BLE001 - reported as lost paths, worker goes on
        finished = [_Failure(f"finishing raised {exc.__class__.__name__}: {exc}")] * len(done)
    for i, result in zip(done, finished, strict=True):
        results[i] = result


class _Pool(Generic[R]):
    """The live workers of one run and what each has been sent."""

    def __init__(
        self,
        task: Callable[[str], R],
        cwd: Path,
        initializer: Callable[[], None] | None,
        finish: Finish | None = None,
        memory_limit_bytes: int | None = None,
    ) -> None:
        methods = mp.get_all_start_methods()
        self.context = mp.get_context("fork" if "fork" in methods else None)
        self.task, self.cwd, self.initializer = task, str(cwd), initializer
        self.finish, self.memory_limit_bytes = finish, memory_limit_bytes
        self.workers: list[_Worker] = []
        self.sent = 0

    def start(self) -> _Worker:
        """Start one worker process."""
        parent_conn, child_conn = self.context.Pipe()
        progress = self.context.RawArray("d", 3)
        process = self.context.Process(
            target=_serve,
            name="fedrad-scan-worker",
            daemon=True,
            args=(
                child_conn,
                progress,
                self.task,
                self.cwd,
                self.initializer,
                os.getpid(),
                self.finish,
                self.memory_limit_bytes,
            ),
        )
        process.start()
        child_conn.close()  # so that the parent sees EOF when the worker dies
        worker = _Worker(process, parent_conn, progress)
        self.workers.append(worker)
        return worker

    def send(self, worker: _Worker, indices: list[int], items: Sequence[str]) -> bool:
        """Send a chunk (an idle worker's clock starts now); False if an idle worker is gone.

        A busy worker that died keeps the chunk: its end of the pipe reads EOF next, and the
        crash is handled there, blaming the path it was on.
        """
        self.sent += 1
        idle = not worker.chunks
        if idle:
            worker.progress[_STARTED] = time.monotonic()
            worker.progress[_SEQ], worker.progress[_INDEX] = self.sent, 0
        worker.chunks[self.sent] = indices
        try:
            worker.conn.send((self.sent, [items[i] for i in indices]))
        except OSError:
            if idle:
                del worker.chunks[self.sent]
                return False
        return True

    def stop(self, worker: _Worker, *, kill: bool) -> int | None:
        """Stop one worker (politely or with SIGKILL); return its exit code."""
        if kill:
            worker.process.kill()
        else:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        worker.process.join(timeout=2.0)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.conn.close()
        if worker in self.workers:
            self.workers.remove(worker)
        return worker.process.exitcode

    def close(self) -> None:
        """Stop every worker still running."""
        for worker in list(self.workers):
            self.stop(worker, kill=bool(worker.chunks))


def _take(queue: deque[int], items: Sequence[str], workers: int) -> list[int]:
    """Take the next chunk: large while much is left, small near the end (guided).

    A chunk's paths stay under :data:`MAX_CHUNK_CHARS`, so that a chunk waiting in a pipe
    never fills it: the parent's send cannot block while a worker is sending its results.
    """
    size = max(1, min(MAX_CHUNK, math.ceil(len(queue) / (workers * 4))))
    chunk = [queue.popleft()]
    chars = len(items[chunk[0]])
    while queue and len(chunk) < size and chars + len(items[queue[0]]) <= MAX_CHUNK_CHARS:
        chars += len(items[queue[0]])
        chunk.append(queue.popleft())
    return chunk


def _in_progress(worker: _Worker) -> tuple[int, int, float] | None:
    """Return (chunk number, position, start time) of the path a worker is on, if readable."""
    progress = worker.progress
    number, position, started = int(progress[_SEQ]), int(progress[_INDEX]), progress[_STARTED]
    if (int(progress[_SEQ]), int(progress[_INDEX])) != (number, position):
        return None  # moved on while we read
    if number not in worker.chunks or position >= len(worker.chunks[number]):
        return None
    return number, position, started


def _exit_detail(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            return f"killed by signal {-code}"
        if -code == signal.SIGKILL:  # the run's own kills are timeouts, reported as such
            return f"killed by {name}: most likely the system ran out of memory"
        return f"killed by {name}"
    return f"exit code {code}"


def run_in_workers(
    task: Callable[[str], R],
    items: Sequence[str],
    *,
    cwd: Path,
    workers: int,
    timeout_s: float,
    on_lost: Callable[[str, LostKind, str], R],
    initializer: Callable[[], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    finish: Finish | None = None,
    memory_limit_bytes: int | None = None,
) -> list[R]:
    """Return ``task(item)`` for every item, in order, computed in ``workers`` processes.

    ``task`` runs with ``cwd`` as working directory. An item whose task runs past
    ``timeout_s`` (its worker is killed), or whose worker dies, or whose task raises,
    gets ``on_lost(item, kind, detail)`` with ``kind`` a :data:`LostKind`.
    ``on_progress(done, total)`` is called as results arrive. ``finish`` (see :data:`Finish`)
    runs in the worker on each chunk's results; a path it runs past the timeout on is lost
    like one whose task did. ``memory_limit_bytes`` bounds the memory each worker may add to
    what it starts with (see :func:`limit_address_space`); None leaves workers unbounded.
    """
    if memory_limit_bytes is not None and memory_limit_bytes < 1:
        raise ValueError(f"memory_limit_bytes must be positive, not {memory_limit_bytes}")
    if memory_limit_bytes is not None and not _can_limit_memory():
        log.warning("this platform cannot limit a worker's memory: scan workers run unbounded")
    results: dict[int, R] = {}
    queue = deque(range(len(items)))
    pool: _Pool[R] = _Pool(task, cwd, initializer, finish, memory_limit_bytes)
    poll_s = max(0.01, min(0.5, timeout_s / 10))

    def lose(index: int, kind: LostKind, detail: str) -> None:
        log.warning("%s: %s", items[index], detail)
        results[index] = on_lost(items[index], kind, detail)

    try:
        while queue or any(w.chunks for w in pool.workers):
            _dispatch(pool, queue, items, workers)
            busy = {w.conn: w for w in pool.workers if w.chunks}
            for conn in wait(list(busy), timeout=poll_s):
                _collect(pool, busy[conn], queue, results, lose)  # type: ignore[index]
            for worker in [w for w in pool.workers if w.chunks]:
                _stop_if_overdue(pool, worker, queue, timeout_s, lose)
            if on_progress is not None:
                on_progress(len(results), len(items))
    finally:
        pool.close()
    return [results[i] for i in range(len(items))]


def _can_limit_memory() -> bool:
    if sys.platform == "win32":
        return False
    return hasattr(resource, "RLIMIT_AS") and os.path.exists("/proc/self/statm")


def _dispatch(pool: _Pool[R], queue: deque[int], items: Sequence[str], workers: int) -> None:
    """Keep every worker supplied, starting workers up to ``workers`` while work waits."""
    while queue and len(pool.workers) < workers:
        pool.start()
    for worker in list(pool.workers):
        while queue and len(worker.chunks) < IN_FLIGHT:
            chunk = _take(queue, items, workers)
            if not pool.send(worker, chunk, items):  # died while idle: nobody to blame
                queue.extendleft(reversed(chunk))
                pool.stop(worker, kill=True)
                break


def _collect(
    pool: _Pool[R],
    worker: _Worker,
    queue: deque[int],
    results: dict[int, R],
    lose: Callable[[int, LostKind, str], None],
) -> None:
    """Take a worker's chunk results, or handle its death."""
    try:
        number, message = worker.conn.recv()
    except (EOFError, OSError):
        current = _in_progress(worker)
        code = pool.stop(worker, kill=True)
        blamed = _requeue(queue, worker, current)
        if blamed is not None:
            lose(blamed, "crash", f"worker process died ({_exit_detail(code)})")
        return
    for index, result in zip(worker.chunks.pop(number), message, strict=True):
        if isinstance(result, _Failure):
            lose(index, "crash", result.message)
        else:
            results[index] = result


def _stop_if_overdue(
    pool: _Pool[R],
    worker: _Worker,
    queue: deque[int],
    timeout_s: float,
    lose: Callable[[int, LostKind, str], None],
) -> None:
    """Kill a worker whose current path has run past the timeout; lose that path only."""
    current = _in_progress(worker)
    if current is None or time.monotonic() - current[2] <= timeout_s:
        return
    pool.stop(worker, kill=True)
    blamed = _requeue(queue, worker, current)
    if blamed is not None:
        lose(blamed, "timeout", f"still running after {timeout_s:g} s")


def _requeue(
    queue: deque[int], worker: _Worker, current: tuple[int, int, float] | None
) -> int | None:
    """Put a stopped worker's unfinished paths back in front; return the one to blame."""
    blamed = None
    if current is not None:
        blamed = worker.chunks[current[0]][current[1]]
    rest = [i for chunk in worker.chunks.values() for i in chunk if i != blamed]
    worker.chunks.clear()
    queue.extendleft(reversed(rest))
    return blamed
