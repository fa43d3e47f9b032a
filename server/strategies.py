"""Aggregation strategies by name, and their state for checkpoints.

Flower's strategies do the aggregation; fedrad's round loop (``server/loop.py``) drives them.
A strategy's own state (FedAdam's moments, FedAvgM's momentum, the arrays it compares against)
is saved with every round's checkpoint so that a resumed run continues exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypedDict

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum

from fedrad.core import keys
from fedrad.core.config import RunConfig


def sum_metrics(records: list[RecordDict], weighted_by_key: str) -> MetricRecord:
    """Add up every site's metric sums (counts, loss sums, histograms) element by element."""
    del weighted_by_key  # sums need no weights
    total = MetricRecord()
    for record in records:
        for metrics in record.metric_records.values():
            for key, value in metrics.items():
                if key not in total:
                    total[key] = list(value) if isinstance(value, list) else value
                elif isinstance(value, list):
                    current = total[key]
                    total[key] = [a + b for a, b in zip(current, value, strict=True)]  # type: ignore[arg-type]
                else:
                    total[key] = total[key] + value  # type: ignore[operator]
    return total


class _CommonOptions(TypedDict):
    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int
    weighted_by_key: str
    arrayrecord_key: str
    configrecord_key: str
    train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord]
    evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord]


def _common(config: RunConfig) -> _CommonOptions:
    return {
        "fraction_train": config.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": config.min_sites,
        "min_evaluate_nodes": config.min_sites,
        "min_available_nodes": config.min_sites,
        "weighted_by_key": keys.NUM_EXAMPLES,
        "arrayrecord_key": keys.ARRAYS,
        "configrecord_key": keys.CONFIG,
        "train_metrics_aggr_fn": sum_metrics,
        "evaluate_metrics_aggr_fn": sum_metrics,
    }


STRATEGIES: dict[str, Callable[[RunConfig], FedAvg]] = {
    "fedavg": lambda c: FedAvg(**_common(c)),
    "fedprox": lambda c: FedProx(**_common(c), proximal_mu=c.proximal_mu),
    "fedadam": lambda c: FedAdam(
        **_common(c),
        eta=c.server_learning_rate,
        eta_l=c.learning_rate,
    ),
    "fedmedian": lambda c: FedMedian(**_common(c)),
    "fedtrimmedavg": lambda c: FedTrimmedAvg(**_common(c), beta=c.trim_beta),
    "krum": lambda c: Krum(**_common(c), num_malicious_nodes=c.krum_byzantine),
}


def build_strategy(config: RunConfig) -> FedAvg:
    """Build the strategy the run config names (validated by RunConfig)."""
    return STRATEGIES[config.strategy](config)


# Attributes holding per-parameter arrays, by strategy; saved and restored with checkpoints.
_STATE_DICTS = ("m_t", "v_t", "current_arrays")


def strategy_state(strategy: FedAvg) -> dict[str, np.ndarray]:
    """Flatten the strategy's array state into ``{"<attr>/<param>": array}``."""
    state: dict[str, np.ndarray] = {}
    for attr in _STATE_DICTS:
        value = getattr(strategy, attr, None)
        if isinstance(value, ArrayRecord):
            value = {k: a.numpy() for k, a in value.items()}
        if isinstance(value, dict):
            for name, array in value.items():
                state[f"{attr}/{name}"] = np.asarray(array)
    return state


def load_strategy_state(strategy: FedAvg, state: dict[str, np.ndarray]) -> None:
    """Restore what ``strategy_state`` saved; unknown attributes are an error."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for key, array in state.items():
        attr, _, name = key.partition("/")
        if attr not in _STATE_DICTS or not hasattr(strategy, attr):
            raise ValueError(
                f"checkpoint holds state '{attr}' that strategy {type(strategy).__name__} "
                "lacks; resume with the strategy the run was started with."
            )
        grouped.setdefault(attr, {})[name] = np.array(array, copy=True)
    for attr, arrays in grouped.items():
        setattr(strategy, attr, arrays)


def arrays_to_numpy(arrays: ArrayRecord) -> dict[str, np.ndarray]:
    """Return an ArrayRecord as named numpy arrays."""
    return {k: v.numpy() for k, v in arrays.items()}


def numpy_to_arrays(named: Iterable[tuple[str, np.ndarray]]) -> ArrayRecord:
    """Build an ArrayRecord from named numpy arrays, keeping their order."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in named})
