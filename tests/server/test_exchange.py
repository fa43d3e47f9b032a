import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from fedrad.core import keys
from server.exchange import collect_replies


@pytest.fixture
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


def _sent(node: int) -> Message:
    msg = Message(RecordDict({}), dst_node_id=node, message_type="train")
    msg.metadata.__dict__["_message_id"] = f"m-{node}"  # what the Grid sets when it pushes
    return msg


def test_failures_are_filed_under_the_node_sent_to_not_the_replier(task_identity):
    sent = [_sent(11), _sent(22), _sent(33)]
    ok = Message(
        RecordDict(
            {
                keys.METRICS: MetricRecord({keys.NUM_EXAMPLES: 4}),
                keys.SITE: ConfigRecord({keys.SITE_ID: "site-1"}),
            }
        ),
        reply_to=sent[0],
    )
    # a vanished node's error reply is made by the SuperLink (node id 1), replying to m-22
    lost = Message(Error(code=0, reason="Node Unavailable"), reply_to=sent[1])
    lost.metadata.__dict__["_src_node_id"] = 1
    names = {22: "site-2"}

    collected = collect_replies(sent, [ok, lost], names)

    assert [m.metadata.reply_to_message_id for m in collected.ok] == ["m-11"]
    assert collected.failures == {
        "site-2 (node 22)": "error 0: Node Unavailable",  # Flower's own code keeps its text
        "node-33": "no reply within round-timeout",
    }
    assert names[11] == "site-1"
    assert collected.participants == ["site-1"]


def test_failures_use_the_operators_node_names_from_the_start(task_identity, tmp_path):
    from server.exchange import load_node_names

    names_file = tmp_path / "nodes.json"
    names_file.write_text('{"11": "hospital-a", "22": "hospital-b"}')
    names = load_node_names(str(names_file))
    assert names == {11: "hospital-a", 22: "hospital-b"}
    sent = [_sent(11), _sent(22), _sent(33)]
    collected = collect_replies(sent, [], names)
    # no site answered, so none reported its name: the operator's names still label them
    assert set(collected.failures) == {"hospital-a (node 11)", "hospital-b (node 22)", "node-33"}


def test_node_names_file_errors_say_how_to_fix(tmp_path):
    from fedrad.core.errors import FedradError
    from server.exchange import load_node_names

    assert load_node_names("") == {}
    with pytest.raises(FedradError, match="fedrad coordinator start"):
        load_node_names(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(FedradError, match="not a JSON object"):
        load_node_names(str(bad))


def test_repeated_failures_are_reported_once_with_every_site():
    from server.exchange import describe_failures

    text = describe_failures(
        {
            "site-2 (node 2)": "budget spent",
            "site-1 (node 1)": "budget spent",
            "site-3 (node 3)": "no reply within round-timeout",
        }
    )
    assert text == (
        "site-1 (node 1), site-2 (node 2): budget spent; site-3 (node 3): no reply within "
        "round-timeout"
    )
    assert text.count("budget spent") == 1
