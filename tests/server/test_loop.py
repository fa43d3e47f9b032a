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


# ---------------------------------------------------------------- the audit trail


def _audit_config(**changes: object) -> RunConfig:
    return RunConfig(num_server_rounds=2, image_size=32, min_sites=2, round_timeout=1.0).replace(
        **changes
    )


def test_round_loop_writes_a_signed_audit_trail(tmp_path: Path) -> None:
    # Prepare
    from privacy.audit_key import AUDIT_KEY_FILE
    from server.audit import AUDIT_FILE, verify

    run_dir = tmp_path / "run"
    run_dir.mkdir()

    # Execute
    summary = Federation(AnsweringGrid(), _audit_config(), RunDir(run_dir)).run()

    # Assert: every event, signed with the key created beside the runs folder, no site names
    result = verify(run_dir)
    assert result.ok, result.describe()
    assert [e["event"] for e in result.entries] == ["run-start", "round", "round", "run-end"]
    written = json.loads((run_dir / "summary.json").read_text())["audit"]
    assert (
        written
        == summary["audit"]
        == {
            "entries": 4,
            "head": result.head,
            "key-fingerprint": result.key_fingerprint,
        }
    )
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rounds = [e["data"] for e in result.entries if e["event"] == "round"]
    assert [r["model-sha256"] for r in rounds] == [m["model-sha256"] for m in metrics]
    assert len(rounds[0]["sites"]) == 2 and "node-33" in rounds[0]["failures"]["train"]
    assert result.entries[-1]["data"]["model-sha256"] == metrics[-1]["model-sha256"]
    text = (run_dir / AUDIT_FILE).read_text()
    assert "site-a" not in text and "site-b" not in text
    assert ((tmp_path / AUDIT_KEY_FILE).stat().st_mode & 0o777) == 0o600


def test_the_run_configs_audit_key_signs_the_trail(tmp_path: Path) -> None:
    from privacy.audit_key import fingerprint, write_key_pair
    from server.audit import verify

    key = write_key_pair(tmp_path / "coordinator" / "audit.key", tmp_path / "coordinator.pub")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = _audit_config(audit_key=str(tmp_path / "coordinator" / "audit.key"))

    Federation(AnsweringGrid(), config, RunDir(run_dir)).run()

    assert verify(run_dir, public_key=key.public_key()).ok
    assert verify(run_dir).key_fingerprint == fingerprint(key.public_key())
    assert not (tmp_path / "audit.key").exists()  # no default key was made


def test_a_resumed_run_continues_the_audit_chain(tmp_path: Path) -> None:
    # Prepare: a run of one round
    from server.audit import verify

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    Federation(AnsweringGrid(), _audit_config(num_server_rounds=1), RunDir(run_dir)).run()

    # Execute: resume it in the same directory for a second round
    resumed = _audit_config(resume_from=str(run_dir), out_dir=str(run_dir))
    Federation(AnsweringGrid(), resumed, RunDir(run_dir)).run()

    # Assert
    result = verify(run_dir)
    assert result.ok, result.describe()
    events = [e["event"] for e in result.entries]
    assert events == ["run-start", "round", "run-end", "resume", "round", "run-end"]
    assert result.entries[3]["data"]["after-round"] == 1
    assert result.entries[1]["data"]["sites"] == result.entries[4]["data"]["sites"]


def test_an_unwritable_audit_trail_stops_the_run(tmp_path: Path) -> None:
    from server.audit import AUDIT_FILE, AuditError

    run_dir = tmp_path / "run"
    (run_dir / AUDIT_FILE).mkdir(parents=True)

    with pytest.raises(AuditError, match="audit.jsonl is not a file"):
        Federation(AnsweringGrid(), _audit_config(), RunDir(run_dir)).run()
    assert not (run_dir / "rounds").exists()  # no round trained that the trail would not hold


# ---------------------------------------------------------------- the fairness report


class FairGrid(AnsweringGrid):
    """Sites whose evaluations carry a fairness vector; each notes whether a report exists."""

    def __init__(self, config: RunConfig, run_dir: Path) -> None:
        super().__init__()
        self.layout = config.fairness_layout
        self.run_dir = run_dir
        self.report_seen: list[bool] = []

    def _answer(self, message: Message) -> Message:
        reply = super()._answer(message)
        if message.metadata.message_type != "evaluate" or reply.has_error():
            return reply
        import numpy as np

        from client.fairness import site_vector

        self.report_seen.append((self.run_dir / "report.html").is_file())
        labels = np.array([0, 1] * 10)
        scores = np.stack([1 - (0.3 + 0.4 * labels), 0.3 + 0.4 * labels], axis=1)
        people = [{"sex": "F" if i % 4 < 2 else "M"} for i in range(20)]
        vector = site_vector(self.layout, scores, labels, people)
        reply.content[keys.METRICS][keys.FAIRNESS] = [int(v) for v in vector]
        return reply


@pytest.mark.parametrize("every_round", [True, False])
def test_fairness_report_is_written_at_the_end_or_after_every_round(
    tmp_path: Path, every_round: bool
) -> None:
    # Prepare
    config = RunConfig(
        num_server_rounds=2,
        image_size=32,
        min_sites=2,
        round_timeout=1.0,
        fairness_attributes="sex",
        fairness_every_round=every_round,
    )
    grid = FairGrid(config, tmp_path)

    # Execute
    Federation(grid, config, RunDir(tmp_path)).run()

    # Assert: each round's summed counts are kept; the report came after round 1 only if asked
    assert sorted(p.name for p in (tmp_path / "fairness").iterdir()) == [
        "round-001.json",
        "round-002.json",
    ]
    assert grid.report_seen == [False, False, every_round, every_round]
    report = json.loads((tmp_path / "fairness.json").read_text())
    groups = report["final"]["families"][0]["classes"]["1"]["groups"]
    assert {g["cell"]: g["n"] for g in groups} == {"sex=M": 20, "sex=F": 20}  # 2 sites x 10
    assert "sex=F" in (tmp_path / "report.html").read_text()
