"""The same fairness counts in the clear and through SecAgg+: real handlers on real DICOM sites.

The coordinator's round loop evaluates one global model on three synthetic sites twice over an
in-process Grid that carries every message through Flower's protobuf form: with plain evaluate
messages (each site's vector seen and summed) and in an evaluation-only SecAgg+ round (only
the masked sum arrives). The pooled subgroup metrics must be identical.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict
from flwr.common.serde import (
    context_from_proto,
    context_to_proto,
    message_from_proto,
    message_to_proto,
)
from flwr.serverapp import Grid

from client.handlers import app
from fedrad.core.config import RunConfig
from fedrad.synth import SynthConfig, write_consortium
from server.fairness import fairness_report, read_counts
from server.initial_model import initial_arrays, model_spec
from server.loop import Federation
from server.rundir import RunDir
from server.secure_rounds import evaluate_securely

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages built outside a Flower process need a task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


class WireGrid(Grid):
    """Delivers each message to the ClientApp at once, through protobuf, keeping node state."""

    def __init__(self, sites_dir: Path, num_nodes: int) -> None:
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes, "min-cell-count": 3},
                state=RecordDict(),
                run_config={"sites-dir": str(sites_dir)},
            )
            for i in range(num_nodes)
        }
        self.pending: dict[str, Message] = {}

    @property
    def run(self):  # noqa: D102 - Grid's abstract API, unused here
        raise NotImplementedError

    def set_run(self, run_id):  # noqa: D102
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # noqa: D102
        raise NotImplementedError

    def get_node_ids(self):  # noqa: D102
        return list(self.contexts)

    def push_messages(self, messages):  # noqa: D102
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            ids.append(message.metadata.message_id)
            node = message.metadata.dst_node_id
            context = context_from_proto(context_to_proto(self.contexts[node]))
            delivered = message_from_proto(message_to_proto(message))
            reply = app(delivered, context)
            self.contexts[node] = context
            self.pending[message.metadata.message_id] = message_from_proto(message_to_proto(reply))
        return ids

    def pull_messages(self, message_ids):  # noqa: D102
        return [self.pending.pop(i) for i in list(message_ids) if i in self.pending]

    def send_and_receive(self, messages, *, timeout=None):  # noqa: D102
        return self.pull_messages(self.push_messages(messages))


def test_secure_aggregation_gives_the_same_subgroup_metrics(tmp_path):
    # Prepare: three synthetic hospitals and one global model
    sites = tmp_path / "sites"
    write_consortium(
        sites,
        SynthConfig(sites=3, seed=5, kind="2d", holdout=0.0, image_size=32, samples_per_site=60),
        overwrite=True,
    )
    plain_config = RunConfig(image_size=32, batch_size=16, min_sites=3)
    secure_config = plain_config.replace(secure_aggregation=True)
    arrays = initial_arrays(model_spec(plain_config), 0)
    run_dir = RunDir(tmp_path / "run")
    run_dir.path.mkdir()
    run_dir.write_run_record(plain_config, sites=[], resumed_from=0)

    # Execute: a plain evaluation (the loop stores the summed counts), then a secure one
    plain = Federation(WireGrid(sites, 3), plain_config, run_dir)
    evaluation = plain._evaluate_round(1, arrays)
    stored = read_counts(run_dir.path)[0]
    secure = evaluate_securely(
        WireGrid(sites, 3),
        secure_config,
        model_round=1,
        arrays=arrays,
        site_config=plain._site_config(1, "val"),
    )

    # Check: the securely summed vector is the plain sum, so every pooled metric is equal
    assert evaluation["failures"] == {} and secure["status"] == "completed"
    assert sorted(stored["sites"]) == ["site-1", "site-2", "site-3"]
    total = np.asarray(stored["total"])
    np.testing.assert_array_equal(np.asarray(secure["fairness"]), total)
    np.testing.assert_array_equal(sum(np.asarray(v) for v in stored["sites"].values()), total)
    layout = plain_config.fairness_layout
    threshold = float(stored["threshold"])
    in_clear = fairness_report(layout, total, threshold=threshold)
    masked = fairness_report(
        layout, np.asarray(secure["fairness"]), threshold=threshold, secure_aggregation=True
    )
    assert in_clear["families"] == masked["families"]
    assert in_clear["suppressed"] == masked["suppressed"]
    assert masked["left-out"] and "secure aggregation" in masked["left-out"][0]
    sexes = {g["cell"] for g in in_clear["families"][0]["classes"]["1"]["groups"]}
    assert {"sex=F", "sex=M"} <= sexes  # cells of 60-sample sites survive min-cell-count 3
