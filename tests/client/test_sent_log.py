"""The site's sent log: one hash-chained line per reply, written before the reply leaves."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common.serde import error_to_proto, recorddict_to_proto
from secagg_transcript import run_round

import client.handlers as client_handlers
import client.secagg as client_secagg
from client.fairness import site_vector, suppress
from client.sent_log import (
    GENESIS,
    SentLogError,
    SentReply,
    append_reply,
    entry_hash,
    read_sent_log,
    sent_log_path,
    suppressed_statistics,
)
from fedrad.core import keys
from fedrad.core.config import RunConfig
from fedrad.core.errors import ERROR_DATA, ERROR_INTERNAL, ERROR_SECAGG, ERROR_SENTENCES
from fedrad.core.fairness import FairnessLayout
from fedrad.synth import SynthConfig, write_consortium
from privacy.secagg import ShareKeys
from privacy.secagg.wire import SHARES_ACTION, UNMASK_ACTION, message_to_fields
from server.initial_model import initial_arrays, model_spec
from server.strategies import numpy_to_arrays

pytestmark = pytest.mark.timeout(180)

CANARY = "DOE_JOHN_MRN4711"


# ------------------------------------------------------------------------------ helpers


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _canonical(value: object) -> object:
    """The canonical value of the docstring of ``client.sent_log.canonical_content``."""
    if isinstance(value, bytes):
        return {"bytes": len(value), "sha256": _sha(value)}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def auditor_hash(content: RecordDict) -> str:
    """The content hash as an auditor recomputes it from the docstring, from the reply alone."""
    document = {}
    for name, record in content.items():
        if isinstance(record, ArrayRecord):
            items = {}
            for key, array in record.items():
                values = array.numpy()
                items[key] = {
                    "dtype": values.dtype.str,
                    "shape": list(values.shape),
                    "sha256": _sha(np.ascontiguousarray(values).tobytes()),
                }
            document[name] = {"type": "array", "items": items}
        else:
            kind = "metric" if isinstance(record, MetricRecord) else "config"
            items = {k: _canonical(v) for k, v in record.items()}
            document[name] = {"type": kind, "items": items}
    text = json.dumps({"content": document}, sort_keys=True, separators=(",", ":"))
    return _sha(text.encode())


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sent-log-sites")
    write_consortium(out, SynthConfig(sites=1, seed=5, image_size=32, samples_per_site=20))
    return out / "site-1"


def request(message_type: str, *, server_round: int = 2) -> Message:
    config = RunConfig(image_size=32, batch_size=16, local_epochs=1)
    spec = model_spec(config)
    values = {
        k: v
        for k, v in config.to_user_config().items()
        if k not in ("sites-dir", "out-dir", "resume-from")
    }
    values.update(
        {
            keys.MODEL_SPEC: json.dumps(spec.to_dict()),
            keys.SERVER_ROUND: server_round,
            keys.SPLIT: "val",
        }
    )
    content = RecordDict(
        {
            keys.ARRAYS: numpy_to_arrays(initial_arrays(spec, 0).items()),
            keys.CONFIG: ConfigRecord(values),
        }
    )
    return Message(content, dst_node_id=1, message_type=message_type)


def context(data_dir: Path, ledger: Path) -> Context:
    return Context(
        run_id=7,
        node_id=1,
        state=RecordDict(),
        run_config={},
        node_config={
            "data-dir": str(data_dir),
            "cache-dir": str(ledger.parent / "cache"),
            "ledger-dir": str(ledger),
            "min-cell-count": 1,
        },
    )


# ------------------------------------------------------------------- real handler calls


def test_a_train_reply_is_logged_with_its_size_and_hash(site_dir, tmp_path, task_identity):
    # Prepare
    ledger = tmp_path / "ledger"

    # Execute
    reply = client_handlers.train(request("train"), context(site_dir, ledger))

    # Assert: one line, whose size and hash are those of what left
    assert not reply.has_error(), reply.error
    (line,) = lines(sent_log_path(ledger, site_id="site-1"))
    assert line["bytes"] == recorddict_to_proto(reply.content).ByteSize()
    assert line["sha256"] == auditor_hash(reply.content)
    assert (line["seq"], line["prev"], line["hash"]) == (0, GENESIS, entry_hash(line))
    assert (line["run_id"], line["round"], line["kind"], line["message_type"]) == (
        7,
        2,
        "train",
        "train",
    )
    assert (line["epsilon"], line["suppressed"], line["error_code"]) == (None, [], None)


def test_an_error_reply_is_logged_with_its_code_and_not_its_text(tmp_path, task_identity):
    # Prepare: a site whose only labelled file is not DICOM, named after a patient
    site = tmp_path / "site-x"
    (site / "images").mkdir(parents=True)
    (site / "images" / f"{CANARY}.dcm").write_bytes(b"not a DICOM file " * 64)
    (site / "labels.csv").write_text(f"id,label\nimages/{CANARY}.dcm,1\n", encoding="utf-8")
    ledger = tmp_path / "ledger"

    # Execute
    reply = client_handlers.evaluate(request("evaluate"), context(site, ledger))

    # Assert
    assert reply.has_error() and reply.error.code == ERROR_DATA
    log_path = sent_log_path(ledger, site_id="site-x")
    (line,) = lines(log_path)
    assert (line["kind"], line["message_type"], line["error_code"]) == ("error", "evaluate", 100)
    assert line["bytes"] == error_to_proto(reply.error).ByteSize()
    error = {"error": {"code": ERROR_DATA, "reason": ERROR_SENTENCES[ERROR_DATA]}}
    assert line["sha256"] == _sha(json.dumps(error, sort_keys=True, separators=(",", ":")).encode())
    assert CANARY not in log_path.read_text(encoding="utf-8")


def test_a_reply_whose_line_cannot_be_written_is_refused(site_dir, tmp_path, task_identity, caplog):
    # Prepare: the sent-log folder is a file, so no line can be written
    ledger = tmp_path / "ledger"
    ledger.mkdir()
    (ledger / "_sent-log").write_text("in the way\n")

    # Execute
    with caplog.at_level(logging.ERROR, logger="fedrad.site"):
        reply = client_handlers.train(request("train"), context(site_dir, ledger))

    # Assert: no weights leave; an error reply with the internal code and its sentence does
    assert reply.has_error() and not reply.has_content()
    assert (reply.error.code, reply.error.reason) == (
        ERROR_INTERNAL,
        ERROR_SENTENCES[ERROR_INTERNAL],
    )
    assert "SentLogError" in caplog.text
    assert "without its line in the sent log" in caplog.text


# ---------------------------------------------------------------------- SecAgg+ stages


def test_a_secagg_stage_reply_is_logged(tmp_path, task_identity):
    # Prepare: a stage that answers with a site's real ShareKeys message
    fields = message_to_fields(run_round().messages[ShareKeys][0])
    handle = client_secagg._handler(lambda msg, ctx: client_secagg._reply(fields))
    msg = Message(RecordDict(), dst_node_id=1, message_type=f"train.{SHARES_ACTION}", group_id="3")
    ledger = tmp_path / "ledger"

    # Execute
    reply = handle(msg, context(tmp_path / "site-s", ledger))

    # Assert
    assert not reply.has_error()
    (line,) = lines(sent_log_path(ledger, site_id="site-s"))
    assert (line["kind"], line["round"]) == ("train.secagg_shares", 3)
    assert line["bytes"] == recorddict_to_proto(reply.content).ByteSize()
    assert line["sha256"] == auditor_hash(reply.content)


def test_a_secagg_error_reply_is_logged(tmp_path, task_identity):
    # Prepare: an unmask request with no round in progress
    app_handle = client_secagg._handler(client_secagg._unmask)
    msg = Message(RecordDict(), dst_node_id=1, message_type=f"train.{UNMASK_ACTION}", group_id="4")
    ledger = tmp_path / "ledger"

    # Execute
    reply = app_handle(msg, context(tmp_path / "site-s", ledger))

    # Assert
    assert reply.error.code == ERROR_SECAGG
    (line,) = lines(sent_log_path(ledger, site_id="site-s"))
    assert (line["kind"], line["message_type"], line["round"], line["error_code"]) == (
        "error",
        "train.secagg_unmask",
        4,
        ERROR_SECAGG,
    )


# --------------------------------------------------------------------- the chain itself


def sent(seq: int, **kw: object) -> SentReply:
    values: dict = {
        "run_id": 1,
        "server_round": seq,
        "kind": "train",
        "message_type": "train",
        "study": "s",
        "size": 100 + seq,
        "sha256": f"{seq:064x}",
    }
    values.update(kw)
    return SentReply(**values)


@pytest.fixture
def three_lines(tmp_path: Path) -> Path:
    path = tmp_path / "_sent-log" / "site-1.jsonl"
    for seq in range(3):
        append_reply(path, sent(seq))
    return path


def test_an_untouched_log_reads_back_intact(three_lines):
    # Execute
    log = read_sent_log(three_lines)

    # Assert
    assert log.intact and log.problem == "" and log.bad_line is None
    assert [e["seq"] for e in log.entries] == [0, 1, 2]
    assert [e["prev"] for e in log.entries] == [GENESIS] + [e["hash"] for e in log.entries[:2]]
    assert [e["bytes"] for e in log.entries] == [100, 101, 102]


def _edit_field(raw: list[str]) -> list[str]:
    entry = json.loads(raw[1])
    entry["bytes"] = 7
    return [raw[0], json.dumps(entry), raw[2]]


def _forge(raw: list[str]) -> list[str]:
    entry = json.loads(raw[1])
    entry["bytes"] = 7
    entry["hash"] = entry_hash(entry)  # a consistent line, but the next one no longer follows
    return [raw[0], json.dumps(entry), raw[2]]


@pytest.mark.parametrize(
    ("edit", "bad_line", "words"),
    [
        (_edit_field, 2, "line 2 was edited"),
        (_forge, 3, "line 3 does not follow line 2"),
        (lambda raw: [raw[0], raw[2]], 2, "line 2 does not follow line 1"),
        (lambda raw: [raw[1], raw[0], raw[2]], 1, "line 1 is not the first line"),
        (lambda raw: raw[1:], 1, "line 1 is not the first line"),
        (lambda raw: [*raw, "{}"], 4, "line 4 has other fields"),
        (lambda raw: [raw[0], "not json", raw[2]], 2, "line 2 is not a JSON object"),
    ],
    ids=["field", "re-hashed", "dropped", "reordered", "head-cut", "appended", "garbage"],
)
def test_each_edit_of_the_log_is_detected(three_lines, edit, bad_line, words):
    # Prepare
    raw = three_lines.read_text(encoding="utf-8").splitlines()
    three_lines.write_text("\n".join(edit(raw)) + "\n", encoding="utf-8")

    # Execute
    log = read_sent_log(three_lines)

    # Assert
    assert not log.intact
    assert log.bad_line == bad_line
    assert words in log.problem


def test_a_cut_last_line_is_detected_and_stops_sending(three_lines):
    # Prepare: the last line loses its end
    data = three_lines.read_bytes()
    three_lines.write_bytes(data[:-10])

    # Execute
    log = read_sent_log(three_lines)

    # Assert
    assert (log.intact, log.bad_line, len(log.entries)) == (False, 3, 2)
    assert "cut short" in log.problem
    with pytest.raises(SentLogError, match="cut short"):
        append_reply(three_lines, sent(3))


def test_concurrent_writers_keep_one_chain(tmp_path):
    # Prepare
    path = tmp_path / "site-1.jsonl"

    def write(worker: int) -> None:
        for i in range(10):
            append_reply(path, sent(i, run_id=worker))

    threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]

    # Execute
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Assert
    log = read_sent_log(path)
    assert log.intact, log.problem
    assert [e["seq"] for e in log.entries] == list(range(80))
    assert sorted(e["run_id"] for e in log.entries) == sorted(list(range(8)) * 10)


# --------------------------------------------------------------- what the reply withheld


def test_withheld_loss_and_subgroup_cells_are_listed():
    # Prepare: a DP evaluation reply with its loss withheld and a fairness vector whose
    # 'sex=unknown' cell (2 patients) and 'sex=F' (its smallest complement) were suppressed
    layout = FairnessLayout.from_config(
        num_classes=2, positive_label=1, attributes="sex", intersections=""
    )
    sexes = ["M"] * 30 + ["F"] * 12 + ["unknown"] * 2
    labels = np.zeros(len(sexes), dtype=np.int64)
    scores = np.tile([0.8, 0.2], (len(sexes), 1))
    vector = suppress(
        site_vector(layout, scores, labels, [{"sex": s} for s in sexes]),
        layout,
        min_cell_count=10,
    )
    metrics = {keys.NUM_EXAMPLES: 44, keys.LOSS_SUM: 0.0, keys.FAIRNESS: [int(v) for v in vector]}
    records = {keys.METRICS: ("metric", metrics)}

    # Execute
    withheld = suppressed_statistics(records, dp="sample", layout=layout)

    # Assert
    assert withheld == ["loss-sum", "sex=F", "sex=unknown"]
    assert suppressed_statistics(records, dp="off", layout=None) == []


@pytest.mark.parametrize(
    ("site_id", "name"),
    [("site-1", "site-1.jsonl"), ("Hospital A/..", "Hospital%20A%2F%2E%2E.jsonl")],
)
def test_the_log_sits_beside_the_ledgers(tmp_path, site_id, name):
    assert sent_log_path(tmp_path, site_id=site_id) == tmp_path / "_sent-log" / name
