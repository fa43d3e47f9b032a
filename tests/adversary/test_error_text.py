"""Error-text fishing: a coordinator provokes failures to read a site's details in the replies.

A site's exception text names its paths, file names and values. The attack plants a canary in
a file name the site fails on and inside an exception that is not fedrad's own, then searches
the serialized reply (what travels to the coordinator) for it. Each attack first runs against
a weakened site (the handlers as they were: the exception's text in the reason, foreign
exceptions left to Flower, which forwards their type and message), so the test cannot pass
vacuously; the real site must reply with a code and its fixed sentence, and keep the detail in
its own log.
"""

from __future__ import annotations

import json
import logging
import secrets
from collections.abc import Callable
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_to_proto

import client.app as client_app
import client.handlers as client_handlers
import client.secagg as client_secagg
from fedrad.core import keys
from fedrad.core.config import RunConfig
from fedrad.core.errors import (
    ERROR_DATA,
    ERROR_INTERNAL,
    ERROR_SENTENCES,
    FedradError,
    error_text,
)
from privacy.secagg import RequestRefused, SecAggError
from privacy.secagg.wire import KEYS_ACTION, MASK_ACTION, SHARES_ACTION, UNMASK_ACTION
from server.initial_model import initial_arrays, model_spec
from server.strategies import numpy_to_arrays

pytestmark = pytest.mark.timeout(180)

CANARY_FILE = "images/DOE_JOHN_MRN4711_1961-02-03.dcm"
CANARY_MISSING = "images/DOE_JOHN_MRN4711_1961-02-03_series2.dcm"
FLOWER_RAISED = 2  # flwr.common.constant.ErrorCode.CLIENT_APP_RAISED_EXCEPTION


def flower_edge(handler: Callable[[Message, Context], Message], msg: Message, ctx: Context):
    """What Flower's ``run_clientapp`` does with an exception a ClientApp lets out.

    Copied from flwr 1.42 ``flwr/supernode/runtime/run_clientapp.py``: the exception's type
    and text become the reason of the error reply sent to the coordinator.
    """
    try:
        return handler(msg, ctx)
    except Exception as ex:
        return Message(Error(code=FLOWER_RAISED, reason=f"{type(ex)}:<'{ex}'>"), reply_to=msg)


def old_guarded(handler):
    """The weakened site: ``client.app._guarded`` as it was (fedrad errors only, with text)."""

    def wrapper(msg: Message, context: Context) -> Message:
        try:
            site = client_app._site(context)
            content = handler(msg, context, site)
        except FedradError as exc:
            return Message(Error(code=100, reason=str(exc)), reply_to=msg)
        return Message(content, reply_to=msg)

    return wrapper


def old_secagg_handler(step):
    """The weakened site: ``client.secagg._handler`` as it was (foreign exceptions re-raised)."""

    def handle(msg: Message, context: Context) -> Message:
        try:
            content = step(msg, context)
        except RequestRefused as exc:
            return Message(Error(code=102, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
        except (SecAggError, FedradError) as exc:
            return Message(Error(code=101, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
        return Message(content, reply_to=msg)

    return handle


@pytest.fixture
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


@pytest.fixture
def canary_site(tmp_path: Path) -> Path:
    """A site whose labelled files, named after a patient, are not DICOM or gone."""
    site = tmp_path / "site-DOE4711"
    (site / "images").mkdir(parents=True)
    (site / CANARY_FILE).write_bytes(b"not a DICOM file " * 64)
    (site / "labels.csv").write_text(
        f"id,label\n{CANARY_FILE},1\n{CANARY_MISSING},0\n", encoding="utf-8"
    )
    return site


def request(message_type: str = "train") -> Message:
    config = RunConfig(image_size=32, batch_size=16)
    spec = model_spec(config)
    values = {
        k: v
        for k, v in config.to_user_config().items()
        if k not in ("sites-dir", "out-dir", "resume-from")
    }
    values.update(
        {keys.MODEL_SPEC: json.dumps(spec.to_dict()), keys.SERVER_ROUND: 1, keys.SPLIT: "val"}
    )
    content = RecordDict(
        {
            keys.ARRAYS: numpy_to_arrays(initial_arrays(spec, 0).items()),
            keys.CONFIG: ConfigRecord(values),
            keys.SECAGG: ConfigRecord({"message": "key-broadcast"}),
        }
    )
    return Message(content, dst_node_id=1, message_type=message_type)


def context(site: Path, tmp_path: Path) -> Context:
    return Context(
        run_id=1,
        node_id=1,
        state=RecordDict(),
        run_config={},
        node_config={
            "data-dir": str(site),
            "cache-dir": str(tmp_path / "cache"),
            "ledger-dir": str(tmp_path / "ledger"),
            "log-file": str(tmp_path / "site.log"),
            "min-cell-count": 1,
        },
    )


def wire(reply: Message) -> bytes:
    return message_to_proto(reply).SerializeToString()


def leaks(reply: Message, *canaries: str) -> list[str]:
    blob = wire(reply)
    return [c for c in canaries if c.encode() in blob]


# ------------------------------------------------------------------ a canary in a file name


def test_weakened_site_leaks_the_failing_file_name(canary_site, tmp_path, task_identity):
    # Execute: the handler as it was
    reply = old_guarded(client_app._train_site)(request(), context(canary_site, tmp_path))

    # Assert: the attack works against it: the patient's file name and the site's path
    assert reply.has_error()
    assert leaks(reply, CANARY_MISSING, str(canary_site)) == [CANARY_MISSING, str(canary_site)]


@pytest.mark.parametrize("handler_name", ["train", "evaluate"])
def test_a_failing_file_name_never_leaves_the_site(
    canary_site, tmp_path, task_identity, caplog, handler_name
):
    # Prepare
    handler = getattr(client_app, handler_name)
    msg = request(handler_name)

    # Execute
    with caplog.at_level(logging.ERROR, logger="fedrad.site"):
        reply = handler(msg, context(canary_site, tmp_path))

    # Assert: code and fixed sentence only; the detail stays in the site's log
    assert reply.has_error()
    assert (reply.error.code, reply.error.reason) == (ERROR_DATA, ERROR_SENTENCES[ERROR_DATA])
    assert leaks(reply, "DOE", "4711", "1961", str(tmp_path)) == []
    assert CANARY_MISSING in caplog.text
    assert CANARY_MISSING in (tmp_path / "site.log").read_text(encoding="utf-8")


# ------------------------------------------------- a canary inside a foreign (non-fedrad) error


@pytest.fixture
def foreign_canary(monkeypatch) -> str:
    """Make the site's data loading raise a RuntimeError whose text is a canary."""
    canary = f"CANARY-{secrets.token_hex(6)}"

    def explode(*args, **kwargs):
        raise RuntimeError(f"{canary} /hospital/pacs/{CANARY_FILE}")

    monkeypatch.setattr(client_handlers, "site_dataset", explode)  # where the handlers look it up
    return canary


def test_weakened_site_lets_flower_forward_a_foreign_error(
    canary_site, tmp_path, task_identity, foreign_canary
):
    # Execute: the old handler lets the RuntimeError out; Flower's edge forwards it
    reply = flower_edge(
        old_guarded(client_app._train_site), request(), context(canary_site, tmp_path)
    )

    # Assert
    assert reply.error.code == FLOWER_RAISED
    assert leaks(reply, foreign_canary, "DOE_JOHN") == [foreign_canary, "DOE_JOHN"]


@pytest.mark.parametrize("handler_name", ["train", "evaluate"])
def test_a_foreign_error_is_caught_at_the_edge_without_its_text(
    canary_site, tmp_path, task_identity, foreign_canary, handler_name
):
    # Execute: through Flower's edge, as in deployment
    reply = flower_edge(
        getattr(client_app, handler_name), request(handler_name), context(canary_site, tmp_path)
    )

    # Assert
    assert (reply.error.code, reply.error.reason) == (
        ERROR_INTERNAL,
        ERROR_SENTENCES[ERROR_INTERNAL],
    )
    assert leaks(reply, foreign_canary, "DOE_JOHN", "RuntimeError") == []
    logged = (tmp_path / "site.log").read_text(encoding="utf-8")
    assert foreign_canary in logged and "Traceback" in logged  # the detail, at the site


# -------------------------------------------------------------- the four SecAgg+ stages


ACTIONS = [KEYS_ACTION, SHARES_ACTION, MASK_ACTION, UNMASK_ACTION]


@pytest.fixture
def secagg_canary(monkeypatch) -> str:
    canary = f"CANARY-{secrets.token_hex(6)}"

    def explode(*args, **kwargs):
        raise RuntimeError(f"{canary} at {CANARY_FILE}")

    for name in ("_fields", "_load"):  # every stage calls one of them first
        monkeypatch.setattr(client_secagg, name, explode)
    return canary


def secagg_app(monkeypatch, handler=None) -> ClientApp:
    if handler is not None:
        monkeypatch.setattr(client_secagg, "_handler", handler)
    app = ClientApp()
    client_secagg.register(
        app, client_app._secure_input, client_app._evaluation_counts, client_app._min_threshold
    )
    return app


@pytest.mark.parametrize("action", ACTIONS)
def test_weakened_secagg_stage_leaks_a_foreign_error(
    canary_site, tmp_path, task_identity, monkeypatch, secagg_canary, action
):
    app = secagg_app(monkeypatch, old_secagg_handler)

    reply = flower_edge(app, request(f"train.{action}"), context(canary_site, tmp_path))

    assert leaks(reply, secagg_canary, "DOE_JOHN") == [secagg_canary, "DOE_JOHN"]


@pytest.mark.parametrize("action", ACTIONS)
def test_secagg_stages_send_a_code_and_sentence_only(
    canary_site, tmp_path, task_identity, monkeypatch, secagg_canary, action
):
    app = secagg_app(monkeypatch)
    ctx = context(canary_site, tmp_path)
    ctx.state[client_secagg.SESSION_STATE] = ConfigRecord({"session": b"x", "weight": 1})

    reply = flower_edge(app, request(f"train.{action}"), ctx)

    assert (reply.error.code, reply.error.reason) == (
        ERROR_INTERNAL,
        ERROR_SENTENCES[ERROR_INTERNAL],
    )
    assert leaks(reply, secagg_canary, "DOE_JOHN", "RuntimeError") == []
    assert client_secagg.SESSION_STATE not in ctx.state  # the round is forgotten: fail closed
    assert secagg_canary in (tmp_path / "site.log").read_text(encoding="utf-8")


def test_the_coordinator_reports_the_code_and_the_tables_sentence_only():
    # A known code is shown with the table's sentence, even if a site sent other text
    assert error_text(ERROR_DATA, f"site {CANARY_FILE} failed") == (
        f"error {ERROR_DATA}: {ERROR_SENTENCES[ERROR_DATA]}"
    )
    assert error_text(0, "Node Unavailable") == "error 0: Node Unavailable"  # Flower's own
