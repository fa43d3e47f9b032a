"""SecAgg+ over Flower records, without an engine: codecs, saved sessions, and whole rounds
through the real ClientApp handlers and ``secure_train_round`` over an in-process Grid that
carries every message and node state through Flower's protobuf form (as deployment does)."""

from __future__ import annotations

import dataclasses
import re
import uuid
from collections.abc import Callable

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
    config_record_from_proto,
    config_record_to_proto,
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)
from flwr.serverapp import Grid

from client.secagg import ERROR_CODE_REFUSED, ERROR_CODE_SECAGG, SESSION_STATE, register
from fedrad.core import evalsums, keys
from privacy.secagg import (
    ClientSession,
    ConfigurationError,
    ConflictingUnmaskRequest,
    KeyAdvertisement,
    KeyBroadcast,
    MaskedInput,
    ProtocolError,
    RoundSetup,
    ServerSession,
    ShareDelivery,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    quantisation_bound,
)
from privacy.secagg.state import (
    KEYS_ACTION,
    LOSS_RANGE,
    MASK_ACTION,
    RECORD,
    SHARES_ACTION,
    UNMASK_ACTION,
    check_reply_fields,
    invitation_from_fields,
    invitation_to_fields,
    message_from_fields,
    message_to_fields,
    session_from_bytes,
    session_to_bytes,
    setup_from_bytes,
    setup_to_bytes,
)
from server.secagg import default_threshold, secure_train_round

pytestmark = pytest.mark.timeout(120)

TIMEOUT = 0.2  # ProcessGrid answers at once; a vanished site's reply is waited for this long

SHAPES = {"conv": (4, 3), "bias": (5,)}
SITES = (1, 2, 3, 4, 5)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


# ----------------------------------------------------------------------------- in-memory round


def _inputs(sites=SITES):
    rng = np.random.default_rng(7)
    return {
        s: ({n: rng.uniform(-1, 1, shape) for n, shape in SHAPES.items()}, int(rng.integers(1, 99)))
        for s in sites
    }


def _setup(sites=SITES, threshold=3):
    return RoundSetup.create(
        round_id="r-1",
        participants=list(sites),
        threshold=threshold,
        array_shapes=SHAPES,
        clipping_range=1.0,
    )


def _restored(sessions):
    return {s: session_from_bytes(session_to_bytes(c)) for s, c in sessions.items()}


@dataclasses.dataclass
class Transcript:
    """Every message of one in-memory round, and the sessions at its end."""

    messages: dict[type, list]
    result: object
    sessions: dict


def _run_round(restore_after: str | None = None, compare: list | None = None) -> Transcript:
    """Run a round, saving and restoring every site's session after the named stage.

    ``compare`` collects (original, restored) outputs of the deterministic next step.
    """
    setup, inputs = _setup(), _inputs()
    server, sessions = ServerSession(setup), {s: ClientSession(s) for s in SITES}
    seen: dict[type, list] = {}

    def keep(messages):
        for m in messages:
            seen.setdefault(type(m), []).append(m)
        return messages

    adverts = keep([c.advertise_keys(setup) for c in sessions.values()])
    if restore_after == "keys":
        sessions = _restored(sessions)
    broadcasts = keep(list(server.collect_keys(adverts).values()))
    shares = keep([sessions[b.receiver].share_keys(b) for b in broadcasts])
    deliveries = keep(list(server.collect_shares(shares).values()))
    if restore_after == "shares":
        originals, sessions = sessions, _restored(sessions)
    masked = keep([_mask(sessions[d.receiver], d, inputs) for d in deliveries])
    if restore_after == "shares":
        compare += [
            (_mask(originals[d.receiver], d, inputs).masked, m.masked)
            for d, m in zip(deliveries, masked, strict=True)
        ]
    requests = keep(list(server.collect_masked_inputs(masked).values()))
    if restore_after == "mask":
        sessions = _restored(sessions)
    responses = keep([sessions[r.receiver].unmask(r) for r in requests])
    return Transcript(seen, server.aggregate(responses), sessions)


def _mask(session, delivery, inputs):
    arrays, weight = inputs[delivery.receiver]
    return session.mask_input(delivery, arrays, weight=weight)


def _fedavg(inputs, sites):
    weights = np.array([inputs[s][1] for s in sites], dtype=np.float64)
    return {
        n: np.tensordot(weights, np.stack([inputs[s][0][n] for s in sites]), axes=1) / weights.sum()
        for n in SHAPES
    }


@pytest.mark.parametrize("restore_after", [None, "keys", "shares", "mask"])
def test_a_session_saved_mid_round_gives_the_same_outcome(restore_after):
    compare: list = []

    transcript = _run_round(restore_after, compare)

    expected = _fedavg(_inputs(), SITES)
    for name, array in expected.items():
        assert np.abs(transcript.result.arrays[name] - array).max() <= transcript.result.error_bound
    for original, restored in compare:  # masking is deterministic given the saved state
        np.testing.assert_array_equal(original, restored)


def test_a_restored_session_keeps_its_refusals():
    transcript = _run_round()
    site, session = next(iter(transcript.sessions.items()))
    request = next(r for r in transcript.messages[UnmaskRequest] if r.receiver == site)
    other = next(s for s in request.survivors if s != site)
    restored = session_from_bytes(session_to_bytes(session))

    conflicting = dataclasses.replace(
        request, survivors=tuple(s for s in request.survivors if s != other), dropped=(other,)
    )
    with pytest.raises(ConflictingUnmaskRequest):
        restored.unmask(conflicting)
    assert restored.failed
    failed = session_from_bytes(session_to_bytes(restored))
    with pytest.raises(ProtocolError):
        failed.unmask(request)


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"[]", b'{"format": "other"}', b'{"format": "fedrad-secagg-session/1"}'],
)
def test_malformed_saved_session_is_refused(data):
    with pytest.raises(ProtocolError):
        session_from_bytes(data)


# ------------------------------------------------------------------------------ record codecs


def _through_proto(fields):
    proto = config_record_to_proto(ConfigRecord(fields))
    return dict(config_record_from_proto(type(proto).FromString(proto.SerializeToString())))


@pytest.fixture(scope="module")
def transcript():
    return _run_round()


@pytest.mark.parametrize(
    "kind",
    [
        KeyAdvertisement,
        KeyBroadcast,
        ShareKeys,
        ShareDelivery,
        MaskedInput,
        UnmaskRequest,
        UnmaskResponse,
    ],
)
def test_every_stage_message_survives_a_flower_record(transcript, kind):
    for message in transcript.messages[kind]:
        decoded = message_from_fields(kind, _through_proto(message_to_fields(message)))

        if kind is MaskedInput:
            assert decoded.masked.dtype == message.masked.dtype
            np.testing.assert_array_equal(decoded.masked, message.masked)
            assert (decoded.round_id, decoded.sender) == (message.round_id, message.sender)
        else:
            assert decoded == message


def _advert_fields(transcript):
    return message_to_fields(transcript.messages[KeyAdvertisement][0])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda f: f.pop("mask-key"),
        lambda f: f.update({"extra": 1}),
        lambda f: f.update({"message": "share-keys"}),
        lambda f: f.update({"sender": True}),
        lambda f: f.update({"sender": [1]}),
        lambda f: f.update({"encryption-key": "not bytes"}),
        lambda f: f.update({"round-id": 3}),
    ],
)
def test_malformed_message_fields_are_refused(transcript, mutate):
    fields = _advert_fields(transcript)
    mutate(fields)

    with pytest.raises(ProtocolError):
        message_from_fields(KeyAdvertisement, fields)


@pytest.mark.parametrize(
    ("dtype", "data"), [("uint64", b"\x00" * 9), ("float64", b"\x00" * 8), ("int8", b"")]
)
def test_malformed_masked_vector_is_refused(transcript, dtype, data):
    fields = message_to_fields(transcript.messages[MaskedInput][0])
    fields.update({"masked": data, "masked-dtype": dtype})

    with pytest.raises(ProtocolError):
        message_from_fields(MaskedInput, fields)


@pytest.mark.parametrize("kind", [KeyAdvertisement, ShareKeys, MaskedInput, UnmaskResponse])
def test_reply_allow_list_takes_site_messages(transcript, kind):
    check_reply_fields(message_to_fields(transcript.messages[kind][0]))


@pytest.mark.parametrize("kind", [KeyBroadcast, ShareDelivery, UnmaskRequest])
def test_reply_allow_list_refuses_coordinator_messages(transcript, kind):
    with pytest.raises(ProtocolError):
        check_reply_fields(message_to_fields(transcript.messages[kind][0]))


def test_reply_allow_list_refuses_smuggled_fields(transcript):
    fields = _advert_fields(transcript)
    fields["patient-name"] = "DOE^JANE"

    with pytest.raises(ProtocolError):
        check_reply_fields(fields)


def test_setup_and_invitation_round_trip():
    setup = _setup()

    fields = _through_proto(invitation_to_fields(setup, 4))

    assert setup_from_bytes(setup_to_bytes(setup)) == setup
    assert invitation_from_fields(fields) == (setup, 4)


@pytest.mark.parametrize(
    "data", [b"not json", b'{"format": "fedrad-secagg-setup/1"}', b'{"format": "x"}']
)
def test_malformed_setup_is_refused(data):
    with pytest.raises(ProtocolError):
        setup_from_bytes(data)


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
                node_config={"partition-id": i},
                state=RecordDict(),
                run_config={},
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
    scale = float(context.node_config.get("step", 0.05))
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


def _app(train: Callable[[Message, Context], RecordDict] = fake_train) -> ClientApp:
    app = ClientApp()
    register(app, train, fake_evaluate)
    return app


def _round(grid: Grid, *, threshold=3, clipping_range=0.5):
    return secure_train_round(
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
    result = secure_train_round(
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
    _assert_fedavg(result, _plain(grid, range(5)))
    assert all(SESSION_STATE not in c.state for c in grid.contexts.values())  # forgotten
    for reply in grid.replies:
        assert list(reply.content) == [RECORD]
        check_reply_fields(dict(reply.content[RECORD]))


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
    request = message_from_fields(UnmaskRequest, dict(message.content[RECORD]))
    other = next(s for s in request.survivors if s != request.receiver)
    forged = dataclasses.replace(request, dropped=(*request.dropped, other))
    return Message(
        RecordDict({RECORD: ConfigRecord(message_to_fields(forged))}),
        dst_node_id=message.metadata.dst_node_id,
        message_type=message.metadata.message_type,
    )


def test_a_site_refuses_a_malicious_unmask_request():
    grid = ProcessGrid(_app(), 5, tamper=_overlapping)

    result = _round(grid)

    refusal = next(r for r in grid.replies if r.has_error())
    assert refusal.error.code == ERROR_CODE_REFUSED
    assert "OverlappingSetsError" in refusal.error.reason
    assert result.status == "completed"  # the other four answered; the refuser is in the sum
    _assert_fedavg(result, _plain(grid, range(5)))


def test_an_update_outside_the_clipping_range_is_refused_without_its_values():
    grid = ProcessGrid(_app(), 5)
    grid.contexts[1004].node_config["step"] = 3.0  # this site's update leaves [-0.5, 0.5]

    result = _round(grid)

    error = next(r.error for r in grid.replies if r.has_error())
    assert error.code == ERROR_CODE_SECAGG and "clipping range" in error.reason
    assert re.search(r"\d\.\d|e-\d", error.reason) is None  # no value of the update leaks
    assert result.status == "completed" and "node-1004" in result.dropped
    _assert_fedavg(result, _plain(grid, range(4)))


def test_a_stage_message_without_a_round_is_refused():
    app = _app()
    context = Context(run_id=1, node_id=5, node_config={}, state=RecordDict(), run_config={})
    message = Message(
        RecordDict({RECORD: ConfigRecord({"message": "key-broadcast"})}),
        dst_node_id=5,
        message_type=f"train.{SHARES_ACTION}",
    )

    reply = app(message, context)

    assert reply.has_error() and reply.error.code == ERROR_CODE_SECAGG
    assert "no secure-aggregation round" in reply.error.reason


def test_a_training_failure_becomes_an_error_reply():
    from fedrad.core.errors import DataError

    def broken(msg, context):
        raise DataError("site has no training samples")

    grid = ProcessGrid(_app(broken), 3)

    result = _round(grid, threshold=2)

    assert result.status == "aborted"
    assert all("no training samples" in reason for reason in result.failures.values())
    assert all(isinstance(r.error, Error) for r in grid.replies)


def _short_key(action, partition, content):
    """A broken site: advertises a mask key one byte short."""
    if action != KEYS_ACTION or partition != 1:
        return content
    fields = dict(content[RECORD])
    fields["mask-key"] = fields["mask-key"][:-1]
    return RecordDict({RECORD: ConfigRecord(fields)})


def test_a_malformed_reply_drops_its_site():
    grid = ProcessGrid(_app(), 5, tamper_reply=_short_key)

    result = _round(grid)

    assert result.status == "completed" and result.dropped == ["node-1001"]
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
