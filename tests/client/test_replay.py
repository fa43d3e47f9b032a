"""A retried DP round is answered with the update already released, and charged once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.handlers import train
from client.replay import REPLAY_DIR
from fedrad.core import keys
from fedrad.core.config import RunConfig
from fedrad.synth import SynthConfig, write_consortium
from privacy import PrivacyLedger
from server.initial_model import initial_arrays, model_spec
from server.strategies import numpy_to_arrays

pytestmark = pytest.mark.timeout(240)

STUDY = "replay-2026"


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("replay-sites")
    write_consortium(
        root,
        SynthConfig(sites=2, seed=2, kind="2d", image_size=16, samples_per_site=24),
        overwrite=True,
    )
    return root


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


CONFIG = RunConfig(
    image_size=16,
    batch_size=8,
    optimizer="sgd",
    learning_rate=0.5,
    local_epochs=1,
    num_server_rounds=3,
    dp="sample",
    study_id=STUDY,
    min_sites=1,
)


def _request(seed: int, server_round: int = 2, config: RunConfig = CONFIG) -> Message:
    spec = model_spec(config)
    values = {
        k: v
        for k, v in config.to_user_config().items()
        if k not in ("sites-dir", "out-dir", "resume-from", "node-names", "audit-key")
    }
    values.update({keys.MODEL_SPEC: json.dumps(spec.to_dict()), keys.SERVER_ROUND: server_round})
    content = RecordDict(
        {
            keys.ARRAYS: numpy_to_arrays(initial_arrays(spec, seed).items()),
            keys.CONFIG: ConfigRecord(values),
        }
    )
    return Message(content, dst_node_id=1, message_type="train")


def _context(sites: Path, ledger: Path, run_id: int) -> Context:
    return Context(
        run_id=run_id,
        node_id=1,
        state=RecordDict(),
        run_config={"sites-dir": str(sites)},
        node_config={"partition-id": 0, "num-partitions": 2, "ledger-dir": str(ledger)},
    )


def _weights(reply: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in reply.content[keys.ARRAYS].items()}


def test_a_retried_round_gets_the_released_update_and_no_new_charge(sites, tmp_path):
    # Prepare: round 2 trained and charged in run 7, whose reply never arrived
    ledger_dir = tmp_path / "ledger"
    first = train(_request(seed=0), _context(sites, ledger_dir, run_id=7))
    assert not first.has_error(), first.error
    ledger = PrivacyLedger.open(ledger_dir, study_id=STUDY, site_id="site-1")
    charged = ledger.spent_epsilon

    # Execute: the restarted coordinator (run 8) asks for round 2 from the same model
    again = train(_request(seed=0), _context(sites, ledger_dir, run_id=8))

    # Assert: the same bytes, the same spend, one training round in the ledger
    assert not again.has_error(), again.error
    for name, value in _weights(first).items():
        np.testing.assert_array_equal(_weights(again)[name], value)
    after = PrivacyLedger.open(ledger_dir, study_id=STUDY, site_id="site-1")
    assert after.spent_epsilon == pytest.approx(charged)
    assert [r.server_round for r in after.rounds] == [2]
    assert again.content[keys.METRICS][keys.EPSILON] == pytest.approx(charged)
    assert (ledger_dir / REPLAY_DIR).is_dir()


def test_another_model_for_the_same_round_is_trained_and_charged(sites, tmp_path):
    ledger_dir = tmp_path / "ledger"
    first = train(_request(seed=0), _context(sites, ledger_dir, run_id=7))
    charged = PrivacyLedger.open(ledger_dir, study_id=STUDY, site_id="site-1").spent_epsilon

    other = train(_request(seed=1), _context(sites, ledger_dir, run_id=8))

    assert not first.has_error() and not other.has_error(), other.error
    after = PrivacyLedger.open(ledger_dir, study_id=STUDY, site_id="site-1")
    assert after.spent_epsilon > charged  # a new release, charged like any other
    assert [r.server_round for r in after.rounds] == [2, 2]
    assert any(not np.array_equal(_weights(other)[k], v) for k, v in _weights(first).items())


def test_the_same_model_asked_with_other_dp_settings_is_trained_and_charged(sites, tmp_path):
    ledger_dir = tmp_path / "ledger"
    train(_request(seed=0), _context(sites, ledger_dir, run_id=7))
    charged = PrivacyLedger.open(ledger_dir, study_id=STUDY, site_id="site-1").spent_epsilon

    other = train(
        _request(seed=0, config=CONFIG.replace(max_grad_norm=0.5)),
        _context(sites, ledger_dir, run_id=8),
    )

    assert not other.has_error(), other.error
    after = PrivacyLedger.open(ledger_dir, study_id=STUDY, site_id="site-1")
    assert after.spent_epsilon > charged and len(after.rounds) == 2
