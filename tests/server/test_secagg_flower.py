"""SecAgg+ over Flower, without an engine: whole rounds through the real ClientApp handlers
and ``secure_round`` over an in-process Grid that carries every message and node state
through Flower's protobuf form (as deployment does)."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)
from flwr.serverapp import Grid

from client.secagg import (
    ERROR_CODE_REFUSED,
    ERROR_CODE_SECAGG,
    SESSION_STATE,
    SecureInput,
    register,
)
from fedrad.core import evalsums, keys
from fedrad.core.errors import ERROR_DATA, ERROR_PEER_AUTH, ERROR_SENTENCES
from fedrad.synth.identity import ROSTER_FILE, write_identities
from privacy.secagg import (
    ConfigurationError,
    RoundSetup,
    UnmaskRequest,
    quantisation_bound,
)
from privacy.secagg.allowlist import check_reply_fields
from privacy.secagg.wire import (
    KEYS_ACTION,
    LOSS_ARRAY,
    LOSS_RANGE,
    MASK_ACTION,
    SHARES_ACTION,
    UNMASK_ACTION,
    message_from_fields,
    message_to_fields,
)
from server.secagg import default_threshold, secure_round

pytestmark = pytest.mark.timeout(120)

TIMEOUT = 0.2  # ProcessGrid answers at once; a vanished site's reply is waited for this long
STEPS: dict[int, float] = {}  # partition -> size of its fake training step (default 0.05)
IDENTITIES: dict[str, Path] = {}  # where the sites' identity keys and roster lie


@pytest.fixture(autouse=True, scope="module")
def identities(tmp_path_factory):
    """Identity keys and the roster of 12 sites, as fedrad synth writes them."""
    folder = write_identities(tmp_path_factory.mktemp("identities"), SITE_NAMES)
    IDENTITIES["folder"] = folder
    sites = tmp_path_factory.mktemp("sites")  # site folders: where each site logs its replies
    for name in SITE_NAMES:
        (sites / name).mkdir()
        (sites / name / "labels.csv").write_text("file,label\n")
    IDENTITIES["sites"] = sites
    yield folder
    IDENTITIES.clear()


@pytest.fixture(autouse=True)
def default_steps():
    yield
    STEPS.clear()


SITE_NAMES = [f"site-{i}" for i in range(12)]


def node_config(partition: int) -> dict[str, object]:
    """A simulated site's node config naming its identity key and the roster."""
    folder = IDENTITIES["folder"]
    return {
        "partition-id": partition,
        "identity-key": str(folder / f"site-{partition}.key"),
        "roster": str(folder / ROSTER_FILE),
    }


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


# ---------------------------------------------------- whole rounds over an in-process Grid


def _wire(message: Message) -> Message:
    return message_from_proto(message_to_proto(message))


class ProcessGrid(Grid):
    """Delivers each message to a ClientApp as deployment does: through protobuf, in a fresh
    Context rebuilt from the node's saved one, keeping the Context the app leaves."""

    def __init__(
        self, app: ClientApp, num_nodes: int, *, vanish=(), tamper=None, tamper_reply=None
    ) -> None:
        self.app = app
        self.contexts = {
            1000 + i: Context(
                run_id=1,
                node_id=1000 + i,
                node_config=node_config(i),
                state=RecordDict(),
                run_config={"sites-dir": str(IDENTITIES["sites"])},
            )
            for i in range(num_nodes)
        }
        self.vanish = set(vanish)  # (action, partition) pairs that get no reply
        self.tamper = tamper
        self.tamper_reply = tamper_reply
        self.replies: list[Message] = []
        self.pending: dict[str, Message] = {}

    def partition(self, node_id: int) -> int:
        return int(self.contexts[node_id].node_config["partition-id"])

    @property
    def run(self):
        raise NotImplementedError

    def set_run(self, run_id):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise NotImplementedError

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        """Deliver each message at once; keep its reply for pull_messages (none if it vanished)."""
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(message.metadata.message_id)
            reply = self._deliver(message)
            if reply is not None:
                self.pending[message.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids):
        return [self.pending.pop(i) for i in list(message_ids) if i in self.pending]

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))

    def _deliver(self, message):
        node = message.metadata.dst_node_id
        action = message.metadata.message_type.partition(".")[2]
        if (action, self.partition(node)) in self.vanish:
            return None
        if self.tamper is not None:
            message = self.tamper(action, self.partition(node), message)
        context = context_from_proto(context_to_proto(self.contexts[node]))
        delivered = _wire(message)
        reply = self.app(delivered, context)
        self.contexts[node] = context
        if self.tamper_reply is not None and not reply.has_error():
            content = self.tamper_reply(action, self.partition(node), reply.content)
            reply = Message(content, reply_to=delivered)
        reply = _wire(reply)
        self.replies.append(reply)
        return reply


GLOBAL = {
    "w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
    "b": np.zeros(3, dtype=np.float32),
}


def fake_train(msg: Message, context: Context) -> RecordDict:
    """A deterministic local 'training': a site-specific step from the global model."""
    partition = int(context.node_config["partition-id"])
    scale = STEPS.get(partition, 0.05)
    rng = np.random.default_rng(partition)
    arrays = {k: a.numpy() for k, a in msg.content[keys.ARRAYS].items()}
    trained = {
        k: (v + scale * rng.uniform(-1, 1, v.shape)).astype(v.dtype) for k, v in arrays.items()
    }
    weight = 10 * (partition + 1)
    metrics = {
        keys.NUM_EXAMPLES: weight,
        keys.LOSS_SUM: 0.3 * weight + partition,
        keys.NUM_STEPS: 2,
    }
    return RecordDict(
        {
            keys.ARRAYS: ArrayRecord({k: Array(v) for k, v in trained.items()}),
            keys.METRICS: MetricRecord(metrics),
            keys.SITE: ConfigRecord({keys.SITE_ID: f"site-{partition}"}),
        }
    )


EVAL_SIZES = evalsums.count_sizes(2)


def fake_evaluate(msg: Message, context: Context) -> dict[str, np.ndarray]:
    """Deterministic evaluation counts of a site, from the model it was sent."""
    partition = int(context.node_config["partition-id"])
    first = float(msg.content[keys.ARRAYS]["w"].numpy().ravel()[0])
    rng = np.random.default_rng(partition)
    n = 20 + partition
    return evalsums.to_counts(
        {
            keys.NUM_EXAMPLES: n,
            keys.LOSS_SUM: 0.7 * n + abs(first),
            keys.CONFUSION: rng.integers(0, 10, 4),
            keys.SCORE_HIST: rng.integers(0, 5, 4 * keys.SCORE_BINS),
        },
        num_classes=2,
    )


def _secure(train: Callable[[Message, Context], RecordDict]):
    """A plain-FedAvg training function as the secure round's input, as client/app.py does."""

    def secure_input(msg: Message, context: Context, setup: RoundSetup) -> SecureInput:
        reply = train(msg, context)
        start = {k: a.numpy().astype(np.float64) for k, a in msg.content[keys.ARRAYS].items()}
        trained = {k: a.numpy().astype(np.float64) for k, a in reply[keys.ARRAYS].items()}
        weight = int(reply[keys.METRICS][keys.NUM_EXAMPLES])
        mean_loss = float(reply[keys.METRICS][keys.LOSS_SUM]) / weight
        r = setup.clipping_range
        update = {k: np.clip(trained[k] - v, -r, r) for k, v in start.items()}
        update[LOSS_ARRAY] = np.array([min(mean_loss, LOSS_RANGE) * r / LOSS_RANGE])
        return SecureInput(update=update, weight=weight)

    return secure_input


def _app(
    train: Callable[[Message, Context], RecordDict] = fake_train, *, min_threshold: int = 2
) -> ClientApp:
    app = ClientApp()
    register(app, _secure(train), fake_evaluate, lambda context: min_threshold)
    return app


def _round(grid: Grid, *, threshold=3, clipping_range=0.5):
    return secure_round(
        grid,
        grid.get_node_ids(),
        server_round=3,
        arrays=GLOBAL,
        site_config=ConfigRecord({keys.SERVER_ROUND: 3}),
        threshold=threshold,
        clipping_range=clipping_range,
        timeout=TIMEOUT,
    )


def _plain(grid: ProcessGrid, partitions):
    """What each site would send for plain FedAvg, from the same training function."""
    content = RecordDict({keys.ARRAYS: ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})})
    replies = []
    for node, context in grid.contexts.items():
        if grid.partition(node) in partitions:
            replies.append(
                fake_train(Message(content, dst_node_id=node, message_type="train"), context)
            )
    return replies


def _assert_fedavg(result, replies, clipping_range=0.5):
    weights = np.array([r[keys.METRICS][keys.NUM_EXAMPLES] for r in replies], dtype=np.float64)
    bound = quantisation_bound(clipping_range=clipping_range, bits=16)
    for name, array in GLOBAL.items():
        models = np.stack([r[keys.ARRAYS][name].numpy().astype(np.float64) for r in replies])
        expected = np.tensordot(weights, models, axes=1) / weights.sum()
        assert result.arrays[name].dtype == array.dtype
        tolerance = bound + np.finfo(np.float32).eps * np.abs(expected)
        assert np.all(np.abs(result.arrays[name] - expected) <= tolerance), name
    loss_sum = sum(float(r[keys.METRICS][keys.LOSS_SUM]) for r in replies)
    assert result.totals[keys.NUM_EXAMPLES] == weights.sum()
    assert result.totals[keys.LOSS_SUM] == pytest.approx(
        loss_sum, abs=weights.sum() * bound * LOSS_RANGE / clipping_range
    )


def _expected_counts(grid: ProcessGrid, partitions) -> dict[str, np.ndarray]:
    content = RecordDict({keys.ARRAYS: ArrayRecord({k: Array(v) for k, v in GLOBAL.items()})})
    message = Message(content, dst_node_id=1, message_type="train")
    per_site = [
        fake_evaluate(message, context)
        for node, context in grid.contexts.items()
        if grid.partition(node) in partitions
    ]
    return {name: np.sum([c[name] for c in per_site], axis=0) for name in EVAL_SIZES}


@pytest.mark.parametrize("train", [True, False])
def test_evaluation_counts_are_summed_exactly_with_or_without_training(train):
    trained = []

    def counting_train(msg, context):
        trained.append(context.node_config["partition-id"])
        return fake_train(msg, context)

    grid = ProcessGrid(_app(counting_train), 5, vanish={("secagg_mask", 1)})
    result = secure_round(
        grid,
        grid.get_node_ids(),
        server_round=3,
        arrays=GLOBAL,
        site_config=ConfigRecord({keys.SERVER_ROUND: 3}),
        threshold=3,
        clipping_range=0.5,
        timeout=TIMEOUT,
        count_sizes=EVAL_SIZES,
        train=train,
    )

    assert result.status == "completed" and result.contributors == 4
    expected = _expected_counts(grid, {0, 2, 3, 4})
    for name in EVAL_SIZES:
        np.testing.assert_array_equal(result.counts[name], expected[name])
    totals = evalsums.from_counts(result.counts)
    assert totals[keys.NUM_EXAMPLES] == 20 + 22 + 23 + 24
    assert sorted(trained) == ([0, 1, 2, 3, 4] if train else [])
    assert (result.arrays != {}) is train
    if train:
        _assert_fedavg(result, _plain(grid, {0, 2, 3, 4}))
    # no site's evaluation crossed the wire in the clear: every reply is a protocol message
    for reply in grid.replies:
        assert not reply.has_error()
        assert set(reply.content.keys()) == {"secagg"}


def test_secure_round_equals_fedavg_of_the_site_models():
    grid = ProcessGrid(_app(), 5)

    result = _round(grid)

    assert (result.status, result.contributors, result.dropped) == ("completed", 5, [])
    assert result.aggregated == [f"node-{node}" for node in sorted(grid.contexts)]
    _assert_fedavg(result, _plain(grid, range(5)))
    assert all(SESSION_STATE not in c.state for c in grid.contexts.values())  # forgotten
    for reply in grid.replies:
        assert list(reply.content) == [keys.SECAGG]
        check_reply_fields(dict(reply.content[keys.SECAGG]))


@pytest.mark.parametrize(
    ("action", "contributes"),
    [(KEYS_ACTION, False), (SHARES_ACTION, False), (MASK_ACTION, False), (UNMASK_ACTION, True)],
)
def test_a_site_that_vanishes_is_dropped(action, contributes):
    grid = ProcessGrid(_app(), 5, vanish={(action, 2)})

    result = _round(grid)

    lost = f"node-{1002}"
    assert result.status == "completed"
    assert (lost in result.dropped) is not contributes
    assert lost in result.failures and "no reply" in result.failures[lost]
    _assert_fedavg(result, _plain(grid, [p for p in range(5) if contributes or p != 2]))


@pytest.mark.parametrize("action", [KEYS_ACTION, SHARES_ACTION, MASK_ACTION])
def test_three_of_five_lost_abort_the_round(action):
    grid = ProcessGrid(_app(), 5, vanish={(action, p) for p in (0, 1, 2)})

    result = _round(grid)

    assert (result.status, result.arrays, result.totals) == ("aborted", None, {})
    assert "aborted" in result.reason


def test_too_few_nodes_abort_before_any_message():
    grid = ProcessGrid(_app(), 2)

    result = _round(grid, threshold=2)

    assert result.status == "aborted" and "3 to" in result.reason
    assert grid.replies == []


def _overlapping(action, partition, message):
    """A malicious coordinator: lists a survivor as dropped too in one unmask request."""
    if action != UNMASK_ACTION or partition != 0:
        return message
    request = message_from_fields(UnmaskRequest, dict(message.content[keys.SECAGG]))
    other = next(s for s in request.survivors if s != request.receiver)
    forged = dataclasses.replace(request, dropped=(*request.dropped, other))
    return Message(
        RecordDict({keys.SECAGG: ConfigRecord(message_to_fields(forged))}),
        dst_node_id=message.metadata.dst_node_id,
        message_type=message.metadata.message_type,
    )


def test_a_site_refuses_a_malicious_unmask_request():
    grid = ProcessGrid(_app(), 5, tamper=_overlapping)

    result = _round(grid)

    refusal = next(r for r in grid.replies if r.has_error())
    assert refusal.error.code == ERROR_CODE_REFUSED
    assert refusal.error.reason == ERROR_SENTENCES[ERROR_CODE_REFUSED]  # no exception text
    assert result.status == "completed"  # the other four answered; the refuser is in the sum
    _assert_fedavg(result, _plain(grid, range(5)))


def test_sites_refuse_a_threshold_below_their_own_minimum():
    grid = ProcessGrid(_app(min_threshold=4), 5)  # node config secagg-min-threshold = 4

    result = _round(grid, threshold=3)

    errors = [r.error for r in grid.replies if r.has_error()]
    assert len(errors) == 5 and all(e.code == ERROR_CODE_SECAGG for e in errors)
    assert result.status != "completed" and result.arrays is None


def test_sites_accept_a_threshold_at_their_minimum():
    grid = ProcessGrid(_app(min_threshold=4), 5)

    result = _round(grid, threshold=4)

    assert result.status == "completed"
    _assert_fedavg(result, _plain(grid, range(5)))


def test_a_stage_message_without_a_round_is_refused():
    app = _app()
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    message = Message(
        RecordDict({keys.SECAGG: ConfigRecord({"message": "key-broadcast"})}),
        dst_node_id=5,
        message_type=f"train.{SHARES_ACTION}",
    )

    reply = app(message, context)

    assert reply.has_error() and reply.error.code == ERROR_CODE_SECAGG
    assert reply.error.reason == ERROR_SENTENCES[ERROR_CODE_SECAGG]
    assert "no round in progress" in reply.error.reason


def test_a_training_failure_becomes_an_error_reply():
    from fedrad.core.errors import DataError

    def broken(msg, context):
        raise DataError("site has no training samples")

    grid = ProcessGrid(_app(broken), 3)

    result = _round(grid, threshold=2)

    assert result.status == "aborted"
    assert all(ERROR_SENTENCES[ERROR_DATA] in reason for reason in result.failures.values())
    assert not any("no training samples" in reason for reason in result.failures.values())
    assert all(isinstance(r.error, Error) for r in grid.replies)


def _short_key(action, partition, content):
    """A broken site: advertises a mask key one byte short."""
    if action != KEYS_ACTION or partition != 1:
        return content
    fields = dict(content[keys.SECAGG])
    fields["mask-key"] = fields["mask-key"][:-1]
    return RecordDict({keys.SECAGG: ConfigRecord(fields)})


def test_a_malformed_reply_drops_its_site():
    grid = ProcessGrid(_app(), 5, tamper_reply=_short_key)

    result = _round(grid)

    assert result.status == "completed" and result.dropped == ["node-1001"]
    assert result.aggregated == ["node-1000", "node-1002", "node-1003", "node-1004"]
    assert "dropped by the protocol" in result.failures["node-1001"]
    _assert_fedavg(result, _plain(grid, [0, 2, 3, 4]))


@pytest.mark.parametrize("num_sites", [3, 4, 5, 10, 11, 30])
def test_default_threshold_is_the_smallest_a_round_accepts(num_sites):
    def setup(threshold):
        return RoundSetup.create(
            round_id="r",
            participants=list(range(1, num_sites + 1)),
            threshold=threshold,
            array_shapes={"a": (1,)},
            clipping_range=1.0,
        )

    setup(default_threshold(num_sites))
    with pytest.raises(ConfigurationError):
        setup(default_threshold(num_sites) - 1)


# ------------------------------------------------------------ authenticated round keys


def _substitute_keys(action, partition, message):
    """A coordinator that swaps in keys of its own for every peer in site 0's broadcast."""
    if action != SHARES_ACTION or partition != 0:
        return message
    from privacy.secagg import KeyBroadcast
    from privacy.secagg.keys import generate_private_key, public_bytes

    broadcast = message_from_fields(KeyBroadcast, dict(message.content[keys.SECAGG]))
    fake = tuple(public_bytes(generate_private_key()) for _ in broadcast.peers)
    forged = dataclasses.replace(broadcast, encryption_keys=fake, mask_keys=fake)
    return Message(
        RecordDict({keys.SECAGG: ConfigRecord(message_to_fields(forged))}),
        dst_node_id=message.metadata.dst_node_id,
        message_type=message.metadata.message_type,
        group_id=message.metadata.group_id,
    )


def test_a_site_refuses_substituted_keys_and_the_others_finish(caplog):
    grid = ProcessGrid(_app(), 5, tamper=_substitute_keys)

    result = _round(grid)

    refusal = next(r for r in grid.replies if r.has_error())
    assert refusal.error.code == ERROR_PEER_AUTH
    assert refusal.error.reason == ERROR_SENTENCES[ERROR_PEER_AUTH]  # the cause's kind only
    assert "bad signature from peer" in caplog.text  # the cause itself, in the site's log
    assert result.status == "completed" and result.dropped == ["node-1000"]
    _assert_fedavg(result, _plain(grid, [1, 2, 3, 4]))


def test_every_advertisement_is_relayed_with_its_signature():
    grid = ProcessGrid(_app(), 3)

    _round(grid, threshold=2)

    adverts = [
        dict(r.content[keys.SECAGG])
        for r in grid.replies
        if not r.has_error() and r.content[keys.SECAGG]["message"] == "key-advertisement"
    ]
    assert sorted(a["signer"] for a in adverts) == ["site-0", "site-1", "site-2"]
    assert all(len(a["signature"]) > 64 for a in adverts)  # DER ECDSA P-384


def test_a_site_without_an_identity_refuses_and_says_how_to_get_one(caplog):
    grid = ProcessGrid(_app(), 3)
    grid.contexts[1000].node_config = {"partition-id": 0}  # no identity-key, no sites-dir
    grid.contexts[1000].run_config = {}

    result = _round(grid, threshold=2)

    error = next(r.error for r in grid.replies if r.has_error())
    assert error.code == ERROR_CODE_SECAGG
    assert error.reason == ERROR_SENTENCES[ERROR_CODE_SECAGG]
    assert "no identity for secure aggregation" in caplog.text and "identity-key" in caplog.text
    assert result.status == "completed" and result.dropped == ["node-1000"]
