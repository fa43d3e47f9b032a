"""The round loop over a fake Grid whose sites answer at once: what the run directory records."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedrad.core import keys
from fedrad.core.config import RunConfig
from server.loop import Federation
from server.rundir import RUN_FILE, RunDir

NAMES = {11: "site-a", 22: "site-b"}
LOST = 33  # answers every message with an error


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


class AnsweringGrid(Grid):
    """Sites that send back the model they got, with fixed sums; node 33 always fails."""

    def __init__(self) -> None:
        self.pending: dict[str, Message] = {}

    @property
    def run(self):
        raise NotImplementedError

    def set_run(self, run_id):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise NotImplementedError

    def get_node_ids(self):
        return [*NAMES, LOST]

    def push_messages(self, messages):
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(message.metadata.message_id)
            self.pending[message.metadata.message_id] = self._answer(message)
        return ids

    def pull_messages(self, message_ids):
        return [self.pending.pop(i) for i in list(message_ids) if i in self.pending]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))

    def _answer(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        if node == LOST:
            return Message(Error(code=1, reason="site failed"), reply_to=message)
        site = ConfigRecord({keys.SITE_ID: NAMES[node]})
        if message.metadata.message_type == "train":
            metrics = {keys.NUM_EXAMPLES: 8, keys.LOSS_SUM: 4.0, keys.NUM_STEPS: 1}
            content = {
                keys.ARRAYS: message.content[keys.ARRAYS],
                keys.METRICS: MetricRecord(metrics),
            }
        else:
            metrics = {
                keys.NUM_EXAMPLES: 8,
                keys.LOSS_SUM: 4.0,
                keys.CONFUSION: [3, 1, 1, 3],
                keys.SCORE_HIST: [1] * (4 * keys.SCORE_BINS),
            }
            content = {keys.METRICS: MetricRecord(metrics)}
        return Message(RecordDict({**content, keys.SITE: site}), reply_to=message)


def test_run_record_names_the_sites_that_took_part(tmp_path: Path) -> None:
    # Prepare
    config = RunConfig(num_server_rounds=2, image_size=32, min_sites=2, round_timeout=1.0)
    run_dir = RunDir(tmp_path)

    # Execute
    summary = Federation(AnsweringGrid(), config, run_dir).run()

    # Assert: the sites that replied, by name; not the one whose every reply was an error
    assert summary["status"] == "completed"
    record = json.loads((tmp_path / RUN_FILE).read_text())
    assert record["sites"] == ["site-a", "site-b"]
    assert record["config"]["num-server-rounds"] == 2


def test_record_sites_keeps_the_rest_of_the_run_record(tmp_path: Path) -> None:
    # Prepare
    run_dir = RunDir(tmp_path)
    run_dir.write_run_record(RunConfig(), sites=[], resumed_from=0)
    before = json.loads((tmp_path / RUN_FILE).read_text())

    # Execute
    run_dir.record_sites(["node-7", "node-9"])

    # Assert
    after = json.loads((tmp_path / RUN_FILE).read_text())
    assert after == {**before, "sites": ["node-7", "node-9"]}


class ReversedGrid(AnsweringGrid):
    """Sites whose replies arrive in the reverse of the order they were asked in."""

    def pull_messages(self, message_ids):
        return list(reversed(super().pull_messages(message_ids)))


def test_replies_come_back_in_the_order_sent_whatever_the_arrival() -> None:
    from flwr.app import ArrayRecord

    from server.exchange import send_and_receive

    grid = ReversedGrid()
    messages = [
        Message(RecordDict({keys.ARRAYS: ArrayRecord()}), dst_node_id=node, message_type="evaluate")
        for node in (11, 22, 33)
    ]

    replies = send_and_receive(grid, messages, timeout=1.0)

    assert [m.metadata.reply_to_message_id for m in replies] == [
        m.metadata.message_id for m in messages
    ]
