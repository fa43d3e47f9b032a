"""``fedrad site log SITE_DIR``: the replies a site sent, as a table or JSON, the chain checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import recorddict_to_proto
from rich.console import Console

import client.handlers as client_handlers
from client.sent_log import SentReply, append_reply, sent_log_path
from fedrad.commands import site_log
from fedrad.commands.cli import main
from fedrad.commands.site_log import locate_sent_log
from fedrad.core import keys
from fedrad.core.config import RunConfig
from fedrad.synth import SynthConfig, write_consortium
from server.initial_model import initial_arrays, model_spec
from server.strategies import numpy_to_arrays

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site-log")
    write_consortium(out, SynthConfig(sites=1, seed=6, image_size=32, samples_per_site=20))
    return out


@pytest.fixture
def sites(consortium: Path, tmp_path: Path) -> Path:
    """A fresh copy of the synthetic consortium, its ledger folder not yet written."""
    copy = tmp_path / "sites"
    shutil.copytree(consortium, copy)
    return copy


def _log_three(sites: Path) -> Path:
    """Three replies of site-1: a train under DP, an evaluation, an error."""
    path = sent_log_path(sites / ".fedrad-ledger", site_id="site-1")
    base = {"run_id": 3, "message_type": "train", "study": "s", "sha256": "ab" * 32}
    append_reply(path, SentReply(server_round=1, kind="train", size=5000, epsilon=0.5, **base))
    append_reply(
        path,
        SentReply(
            server_round=1,
            kind="evaluate",
            size=300,
            epsilon=0.6,
            suppressed=("loss-sum", "sex=unknown", "age-band=0-9", "modality=CT"),
            **{**base, "message_type": "evaluate"},
        ),
    )
    append_reply(path, SentReply(server_round=2, kind="error", size=90, error_code=103, **base))
    return path


@pytest.fixture
def wide(monkeypatch):
    """Print tables 160 columns wide, whatever the terminal (one table row, one line)."""
    monkeypatch.setattr(site_log, "out", Console(width=160))


def test_the_table_lists_every_reply(sites, capsys, wide):
    # Prepare
    _log_three(sites)

    # Execute
    code = main(["site", "log", str(sites / "site-1")])

    # Assert
    text = capsys.readouterr().out
    assert code == 0
    assert "replies sent by site-1" in text
    assert "5000" in text and "0.5000" in text and "abababababab" in text
    assert "loss-sum, sex=unknown, age-band=0-9 +1 more" in text
    assert "error 103 (train)" in text
    assert "3 replies listed" in text and "the hash chain is intact" in text


def test_json_holds_every_field(sites, capsys):
    # Prepare
    _log_three(sites)

    # Execute
    code = main(["site", "log", str(sites / "site-1"), "--json"])

    # Assert
    document = json.loads(capsys.readouterr().out)
    assert code == 0
    assert (document["site_id"], document["intact"], document["problem"]) == ("site-1", True, None)
    assert [r["kind"] for r in document["replies"]] == ["train", "evaluate", "error"]
    assert [r["bytes"] for r in document["replies"]] == [5000, 300, 90]
    assert [r["epsilon"] for r in document["replies"]] == [0.5, 0.6, None]
    assert document["replies"][1]["suppressed"][3] == "modality=CT"
    assert document["replies"][2]["error_code"] == 103


@pytest.mark.parametrize("as_json", [False, True])
def test_an_edited_log_is_named(sites, capsys, wide, as_json):
    # Prepare: the evaluation's size made smaller after the fact
    path = _log_three(sites)
    path.write_text(path.read_text().replace('"bytes":300', '"bytes":30'))

    # Execute
    code = main(["site", "log", str(sites / "site-1"), *(["--json"] if as_json else [])])

    # Assert
    text = capsys.readouterr().out
    assert code == 1
    if as_json:
        document = json.loads(text)
        assert (document["intact"], document["bad_line"]) == (False, 2)
        assert "line 2 was edited" in document["problem"]
    else:
        assert "THE LOG WAS EDITED" in text and "line 2 was edited" in text


def test_a_site_without_replies_says_so(sites, capsys):
    # Execute
    code = main(["site", "log", str(sites / "site-1")])

    # Assert
    assert code == 0
    assert "site-1 has sent no reply yet" in capsys.readouterr().out


def test_a_provisioned_site_folder_names_its_ledger_dir(tmp_path):
    # Prepare: site.toml as fedrad provision writes it, data-dir and ledger-dir filled in
    folder = tmp_path / "hospital-a"
    folder.mkdir()
    (folder / "site.toml").write_text(
        '[site]\nname = "hospital-a"\nsuperlink = "coordinator:9092"\n\n'
        '[node-config]\ndata-dir = "/data/pacs"\nledger-dir = "state/ledger"\n'
    )

    # Execute
    site_id, path = locate_sent_log(folder)

    # Assert
    assert site_id == "hospital-a"
    assert path == folder.resolve() / "state" / "ledger" / "_sent-log" / "hospital-a.jsonl"


def test_help_names_the_chain_check(capsys):
    # Execute
    with pytest.raises(SystemExit) as stop:
        main(["site", "log", "--help"])

    # Assert
    assert stop.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "SITE_DIR" in help_text and "--json" in help_text and "hash chain" in help_text


def test_a_simulated_sites_reply_is_found_from_its_folder(sites, capsys, task_identity):
    # Prepare: the node of partition 0 in a simulation over SITES_DIR, as Flower starts it
    config = RunConfig(image_size=32, batch_size=16, local_epochs=1)
    spec = model_spec(config)
    values = {
        k: v
        for k, v in config.to_user_config().items()
        if k not in ("sites-dir", "out-dir", "resume-from")
    }
    values.update({keys.MODEL_SPEC: json.dumps(spec.to_dict()), keys.SERVER_ROUND: 1})
    msg = Message(
        RecordDict(
            {
                keys.ARRAYS: numpy_to_arrays(initial_arrays(spec, 0).items()),
                keys.CONFIG: ConfigRecord(values),
            }
        ),
        dst_node_id=1,
        message_type="train",
    )
    context = Context(
        run_id=9,
        node_id=1,
        state=RecordDict(),
        run_config={"sites-dir": str(sites)},
        node_config={"partition-id": 0, "num-partitions": 1, "min-cell-count": 1},
    )
    reply = client_handlers.train(msg, context)
    assert not reply.has_error(), reply.error

    # Execute
    code = main(["site", "log", str(sites / "site-1"), "--json"])

    # Assert
    (line,) = json.loads(capsys.readouterr().out)["replies"]
    assert code == 0
    assert (line["run_id"], line["round"], line["kind"]) == (9, 1, "train")
    assert line["bytes"] == recorddict_to_proto(reply.content).ByteSize()
