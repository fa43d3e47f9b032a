"""The round loop's steps under secure aggregation: training and evaluation rounds over SecAgg+.

:func:`train_securely` runs a training round through :func:`server.secagg.secure_round`; the
strategy then sees only the sites' weighted mean, as one reply. The sites evaluate the model
they are sent inside that round, so :func:`secure_evaluation` reports its summed evaluation,
and :func:`evaluate_securely` evaluates the last model in an evaluation-only round.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedrad.core import evalsums, keys
from fedrad.core.config import RunConfig
from server.exchange import SiteReplies
from server.metrics import evaluation_metrics
from server.secagg import default_threshold, secure_round
from server.strategies import arrays_to_numpy, numpy_to_arrays

__all__ = ["evaluate_securely", "secure_evaluation", "train_securely"]

log = logging.getLogger(__name__)


def train_securely(
    grid: Grid,
    strategy: FedAvg,
    config: RunConfig,
    *,
    server_round: int,
    arrays: dict[str, np.ndarray],
    messages: list[Message],
    client_level: Mapping[str, float],
    names: Mapping[int, str] | None = None,
) -> tuple[dict[str, np.ndarray] | None, SiteReplies]:
    """Train under SecAgg+: the strategy then sees only the sites' weighted mean.

    ``messages`` are the strategy's train messages (their nodes and config are used);
    ``client_level`` is the run's client-level epsilon so far, recorded with the round.
    """
    collected = SiteReplies()
    nodes = [m.metadata.dst_node_id for m in messages]
    if not nodes:
        return None, collected
    threshold = config.secagg_threshold or default_threshold(len(nodes))
    site_config = messages[0].content.config_records[keys.CONFIG]  # keeps FedProx's proximal-mu
    site_config[keys.SPLIT] = "val"  # the sites evaluate the model they are sent on it
    result = secure_round(
        grid,
        nodes,
        server_round=server_round,
        arrays=arrays,
        site_config=site_config,
        threshold=threshold,
        clipping_range=config.secagg_clipping_range,
        timeout=config.round_timeout,
        count_sizes=evalsums.count_sizes(config.num_classes, config.fairness_layout.size),
        signed_values=config.dp == "client",
        names=names,
    )
    collected.failures.update(result.failures)
    collected.participants.extend(result.aggregated)
    if result.counts:
        collected.evaluation = evalsums.from_counts(result.counts)
    collected.secure = {
        **client_level,
        "status": result.status,
        "reason": result.reason,
        "contributors": result.contributors,
        "dropped": result.dropped,
        "totals": result.totals,
        "error-bound": result.error_bound,
        "seconds": result.seconds,
    }
    if result.arrays is None or result.contributors < config.min_sites:
        return None, collected
    mean = Message(
        content=RecordDict(
            {
                keys.ARRAYS: numpy_to_arrays(result.arrays.items()),
                keys.METRICS: MetricRecord(
                    {
                        keys.NUM_EXAMPLES: int(result.totals[keys.NUM_EXAMPLES]),
                        **(
                            {keys.LOSS_SUM: float(result.totals[keys.LOSS_SUM])}
                            if config.dp == "off"  # under DP the sites withhold the loss
                            else {}
                        ),
                    }
                ),
            }
        ),
        message_type=MessageType.TRAIN,
        dst_node_id=0,
    )
    aggregated, _ = strategy.aggregate_train(server_round, [mean])
    return (None if aggregated is None else arrays_to_numpy(aggregated)), collected


def secure_evaluation(model_round: int, train: SiteReplies, config: RunConfig) -> dict[str, Any]:
    """The evaluation summed inside a secure training round: of the model it started from.

    Under SecAgg+ the sites evaluate the model they are sent before training, and only the
    sum over the contributing sites reaches the coordinator: there are no per-site figures.
    """
    totals = train.evaluation
    return {
        "model-round": model_round,
        "secure-aggregation": True,
        "sites": {},
        "aggregate": evaluation_metrics(totals, config) if totals else {},
        "subgroups": {},
        "failures": {},
    }


def evaluate_securely(
    grid: Grid,
    config: RunConfig,
    *,
    model_round: int,
    arrays: dict[str, np.ndarray],
    site_config: ConfigRecord,
    names: Mapping[int, str] | None = None,
) -> dict[str, Any]:
    """Evaluate the last model in an evaluation-only secure round (for the run summary)."""
    nodes = list(grid.get_node_ids())
    result = secure_round(
        grid,
        nodes,
        server_round=model_round,
        arrays=arrays,
        site_config=site_config,
        threshold=config.secagg_threshold or default_threshold(len(nodes)),
        clipping_range=config.secagg_clipping_range,
        timeout=config.round_timeout,
        count_sizes=evalsums.count_sizes(config.num_classes, config.fairness_layout.size),
        train=False,
        names=names,
    )
    totals = evalsums.from_counts(result.counts) if result.counts else {}
    aggregate = evaluation_metrics(totals, config) if totals else {}
    log.info(
        "final secure evaluation of round %d: %d site(s), val AUC %.3f",
        model_round,
        result.contributors,
        aggregate.get("auc", float("nan")),
    )
    return {
        "model-round": model_round,
        "secure-aggregation": True,
        "status": result.status,
        "reason": result.reason,
        "contributors": result.contributors,
        "aggregate": aggregate,
        "failures": result.failures,
        "seconds": result.seconds,
        "fairness": totals.get(keys.FAIRNESS),
    }
