"""The site's warm worker (``client.worker``): real worker processes on a real Unix socket."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import app
from client.worker import WorkerError, WorkerFolder, forward, worker_folder, workers_root
from fedrad.core import keys
from fedrad.core.errors import ERROR_DATA, ERROR_INTERNAL, ERROR_STUDY_NOT_ALLOWED

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short folder: a Unix socket path holds about 100 bytes, pytest's tmp_path is long."""
    path = Path(tempfile.mkdtemp(prefix="fw-", dir="/tmp"))
    yield path
    for pid_file in path.rglob("worker.pid"):  # stop the workers these tests started
        with contextlib.suppress(ValueError, ProcessLookupError, OSError):
            os.kill(int(pid_file.read_text()), signal.SIGTERM)
    shutil.rmtree(path, ignore_errors=True)


def node_config(
    root: Path, **extra: bool | float | int | str
) -> dict[str, bool | float | int | str]:
    (root / "site-a").mkdir(exist_ok=True)
    return {
        "data-dir": str(root / "site-a"),
        "cache-dir": str(root / "c"),
        "ledger-dir": str(root / "l"),
        "allowed-studies": "approved-study",
        **extra,
    }


def request(study: str = "other-study") -> Message:
    """A train request for a study the site does not allow: the handlers refuse it at once."""
    content = RecordDict({keys.CONFIG: ConfigRecord({"study-id": study, keys.SERVER_ROUND: 1})})
    return Message(content, dst_node_id=1, message_type="train")


def context(config: dict[str, bool | float | int | str]) -> Context:
    state = RecordDict({"kept": ConfigRecord({"value": 7})})
    return Context(run_id=7, node_id=1, state=state, run_config={}, node_config=config)


def process_gone(pid: int) -> bool:
    """No such process, or only its exit status left (the test process started it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status


def worker_pid(folder: WorkerFolder) -> int:
    return int(folder.pid_file.read_text())


def test_first_message_starts_a_worker_and_the_second_reuses_it(
    short_dir: Path, task_identity: None
) -> None:
    # Prepare
    config = node_config(short_dir)
    ctx = context(config)

    # Execute
    first = app(request(), ctx)
    folder = worker_folder(config)
    pid = worker_pid(folder)
    second = app(request(), ctx)

    # Assert: the handlers ran in the worker (their refusal code), twice in one process
    assert first.has_error() and first.error.code == ERROR_STUDY_NOT_ALLOWED
    assert second.has_error() and second.error.code == ERROR_STUDY_NOT_ALLOWED
    assert pid != os.getpid() and worker_pid(folder) == pid
    log = folder.log.read_text()
    assert log.count("listening on") == 1  # started (and imported torch) once
    assert log.count("train served in") == 2
    assert ctx.state["kept"]["value"] == 7  # the worker's context.state came back


def test_a_changed_node_config_gets_a_fresh_worker(short_dir: Path, task_identity: None) -> None:
    # Prepare
    config = node_config(short_dir)
    changed = node_config(short_dir, **{"min-cell-count": 5})

    # Execute
    forward(request(), context(config))
    forward(request(), context(changed))

    # Assert
    one, other = worker_folder(config), worker_folder(changed)
    assert one.path != other.path
    assert worker_pid(one) != worker_pid(other)


@pytest.mark.parametrize("mode", [0o755, 0o770])
def test_a_socket_folder_others_can_reach_is_refused(
    short_dir: Path, task_identity: None, mode: int
) -> None:
    # Prepare
    config = node_config(short_dir)
    root = workers_root(config)
    root.mkdir(parents=True)
    root.chmod(mode)

    # Execute
    with pytest.raises(WorkerError, match=f"mode {mode:o}.*chmod 700"):
        worker_folder(config)
    reply = app(request(), context(config))

    # Assert: refused, nothing started, and the reply names no path
    assert reply.has_error() and reply.error.code == ERROR_INTERNAL
    assert str(short_dir) not in str(reply.error.reason)
    assert list(root.iterdir()) == []


def test_a_socket_folder_of_another_user_is_refused(
    short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: the folder is this user's; the check is made to see another user id
    config = node_config(short_dir)
    workers_root(config).mkdir(parents=True, mode=0o700)
    real_uid = os.getuid()
    monkeypatch.setattr(os, "getuid", lambda: real_uid + 1)

    # Execute / Assert
    with pytest.raises(WorkerError, match=f"belongs to user id {real_uid}, not"):
        worker_folder(config)


def test_a_link_as_socket_folder_is_refused(short_dir: Path) -> None:
    # Prepare
    config = node_config(short_dir)
    elsewhere = short_dir / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (short_dir / "c").mkdir()
    (short_dir / "c" / "workers").symlink_to(elsewhere)

    # Execute / Assert
    with pytest.raises(WorkerError, match="is not a folder"):
        worker_folder(config)


def test_an_idle_worker_exits(short_dir: Path, task_identity: None) -> None:
    # Prepare
    config = node_config(short_dir)
    reply = forward(request(), context(config), idle_seconds=2)
    folder = worker_folder(config)
    pid = worker_pid(folder)

    # Execute: wait for it to go
    deadline = time.monotonic() + 60
    while not process_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.2)

    # Assert
    assert reply.error.code == ERROR_STUDY_NOT_ALLOWED
    assert not folder.pid_file.exists() and not folder.socket.exists()
    assert process_gone(pid)
    assert "exits: idle" in folder.log.read_text()


def test_simulation_runs_the_handlers_in_process(tmp_path: Path, task_identity: None) -> None:
    # Prepare: a simulated node (no data-dir) and a deployed one with warm-worker=false
    simulated: dict[str, bool | float | int | str] = {
        "partition-id": 0,
        "num-partitions": 1,
        "allowed-studies": "approved-study",
    }
    switched_off = node_config(tmp_path, **{"warm-worker": False})

    # Execute
    replies = [app(request(), context(c)) for c in (simulated, switched_off)]

    # Assert: answered by the handlers in this process (the simulated site has no sites-dir,
    # the deployed one refuses the study); no worker folder made
    assert [r.error.code for r in replies] == [ERROR_DATA, ERROR_STUDY_NOT_ALLOWED]
    assert not workers_root(switched_off).exists()


def test_a_socket_in_a_deep_cache_dir_is_reached_through_its_folder(tmp_path: Path) -> None:
    import socket

    from client.worker import _socket_address

    deep = tmp_path.joinpath(*["a-rather-long-folder-name"] * 6)
    deep.mkdir(parents=True)
    path = deep / "worker.sock"
    assert len(str(path)) > 108  # longer than sun_path
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _socket_address(path) as address:
            server.bind(address)
        server.listen(1)
        with _socket_address(path) as address:
            client.connect(address)
        conn, _ = server.accept()
        client.sendall(b"ping")
        assert conn.recv(4) == b"ping"
        conn.close()
    finally:
        client.close()
        server.close()
    assert path.exists()  # the socket file is in the deep folder itself
