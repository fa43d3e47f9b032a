import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedrad.core import keys
from fedrad.core.config import STRATEGY_NAMES, RunConfig
from server.strategies import build_strategy, load_strategy_state, strategy_state, sum_metrics


def _reply(weights, n):
    content = RecordDict(
        {
            keys.ARRAYS: ArrayRecord({"w": Array(np.asarray(weights, dtype=np.float32))}),
            keys.METRICS: MetricRecord(
                {keys.NUM_EXAMPLES: n, keys.LOSS_SUM: float(n), keys.CONFUSION: [n, 0, 0, n]}
            ),
            keys.SITE: ConfigRecord({keys.SITE_ID: f"site-{n}"}),
        }
    )
    return content


@pytest.mark.parametrize("name", STRATEGY_NAMES)
def test_every_strategy_builds(name):
    strategy = build_strategy(RunConfig(strategy=name))

    assert strategy.weighted_by_key == keys.NUM_EXAMPLES


def test_sum_metrics_adds_scalars_and_lists():
    total = sum_metrics([_reply([0.0], 2), _reply([1.0], 3)], keys.NUM_EXAMPLES)

    assert total[keys.NUM_EXAMPLES] == 5
    assert total[keys.LOSS_SUM] == pytest.approx(5.0)
    assert list(total[keys.CONFUSION]) == [5, 0, 0, 5]


@pytest.fixture
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


def test_fedadam_state_round_trips(task_identity):
    config = RunConfig(strategy="fedadam")
    strategy = build_strategy(config)
    strategy.current_arrays = {"w": np.zeros(3, dtype=np.float32)}
    replies = [
        Message(_reply([1.0, 2.0, 3.0], 4), dst_node_id=1, message_type="train"),
        Message(_reply([3.0, 2.0, 1.0], 4), dst_node_id=2, message_type="train"),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    saved = strategy_state(strategy)

    fresh = build_strategy(config)
    load_strategy_state(fresh, saved)

    assert set(saved) == {"m_t/w", "v_t/w", "current_arrays/w"}
    for key, value in saved.items():
        attr, _, name = key.partition("/")
        np.testing.assert_array_equal(getattr(fresh, attr)[name], value)
    assert not np.allclose(arrays["w"].numpy(), 0)


def test_loading_state_into_the_wrong_strategy_fails():
    with pytest.raises(ValueError, match="resume with the strategy"):
        load_strategy_state(build_strategy(RunConfig(strategy="fedavg")), {"m_t/w": np.zeros(1)})
