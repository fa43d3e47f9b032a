"""The coordinator's round loop: configure, send and receive, aggregate, evaluate, checkpoint.

fedrad owns this loop rather than handing the run to ``strategy.start()``: secure aggregation
(several exchanges per round) and resume after a restart need the steps in the open. The chosen
Flower strategy still samples sites and aggregates.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies

from fedrad.core import evalsums, keys
from fedrad.core.config import RunConfig
from models import ModelSpec
from privacy import ClientDPPlan, planned_client_epsilon
from server.exchange import send_and_receive
from server.metrics import summarize
from server.rundir import RunDir
from server.secagg import default_threshold, secure_train_round
from server.strategies import (
    arrays_to_numpy,
    build_strategy,
    load_strategy_state,
    numpy_to_arrays,
    strategy_state,
)

log = logging.getLogger(__name__)

# Run-config keys that describe the coordinator's own disk; never sent to a site.
_COORDINATOR_ONLY = ("sites-dir", "out-dir", "resume-from")


def model_spec(config: RunConfig) -> ModelSpec:
    """The network a run trains, from its run config."""
    size = config.image_size
    return ModelSpec(
        name=config.model,
        spatial_dims=2 if config.kind == "2d" else 3,
        in_channels=config.in_channels,
        num_classes=config.num_classes,
        image_size=(size, size) if config.kind == "2d" else (config.slices, size, size),
        options={},
    )


def initial_arrays(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """Deterministic initial weights for a seed."""
    torch.manual_seed(seed)
    model = spec.build()
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def sha256_arrays(arrays: dict[str, np.ndarray]) -> str:
    """Digest of named arrays (names, shapes, dtypes and bytes), order-independent."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{a.dtype}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()


@dataclass
class SiteReplies:
    """Replies of one exchange, split into per-site results and failures."""

    ok: list[Message] = field(default_factory=list)
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    subgroups: dict[str, dict[str, int]] = field(default_factory=dict)
    secure: dict[str, Any] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    """Under SecAgg+: the securely summed evaluation totals of the model the round started from."""

    @property
    def num_trained(self) -> int:
        """Sites whose update is in the aggregate (under SecAgg+: those whose mask arrived)."""
        return int(self.secure["contributors"]) if self.secure else len(self.ok)


def _collect(sent: list[Message], replies: list[Message], names: dict[int, str]) -> SiteReplies:
    """Split replies into results and failures, each failure under the node it was sent to.

    An error reply may come from the SuperLink itself (a node that vanished), so the node is
    found through the message replied to, never the reply's source. ``names`` maps node ids
    to the site names they reported earlier; it learns from this exchange.
    """
    out = SiteReplies()
    destination = {m.metadata.message_id: m.metadata.dst_node_id for m in sent}
    answered: set[int] = set()
    for msg in replies:
        node = destination.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        answered.add(node)
        if msg.has_error():
            out.failures[_node_label(node, names)] = str(msg.error.reason)
            continue
        site = str(msg.content[keys.SITE][keys.SITE_ID])
        names[node] = site
        metrics = next(iter(msg.content.metric_records.values()))
        out.results[site] = {k: (list(v) if isinstance(v, list) else v) for k, v in metrics.items()}
        if keys.SUBGROUPS in msg.content:
            out.subgroups[site] = {k: int(v) for k, v in msg.content[keys.SUBGROUPS].items()}
        out.ok.append(msg)
    for node in set(destination.values()) - answered:
        out.failures[_node_label(node, names)] = "no reply within round-timeout"
    return out


def _node_label(node: int, names: dict[int, str]) -> str:
    return f"{names[node]} (node {node})" if node in names else f"node-{node}"


def _evaluation_metrics(totals: dict[str, Any], config: RunConfig) -> dict[str, float]:
    c = config.num_classes
    return summarize(
        num_examples=int(totals[keys.NUM_EXAMPLES]),
        loss_sum=float(totals[keys.LOSS_SUM]),
        confusion=np.asarray(totals[keys.CONFUSION], dtype=np.int64).reshape(c, c),
        score_hist=np.asarray(totals[keys.SCORE_HIST], dtype=np.int64).reshape(
            c, c, keys.SCORE_BINS
        ),
        positive_label=config.positive_label,
    )


class Federation:
    """One run of the round loop over a Grid, writing into a run directory."""

    def __init__(self, grid: Grid, config: RunConfig, run_dir: RunDir) -> None:
        self.grid = grid
        self.config = config
        self.run_dir = run_dir
        self.strategy = build_strategy(config)
        self.spec = model_spec(config)
        self.client_plan = ClientDPPlan.from_run_config(config) if config.dp == "client" else None
        self.site_names: dict[int, str] = {}

    def _site_config(self, server_round: int, split: str | None = None) -> ConfigRecord:
        values: dict[str, Any] = {
            k: v for k, v in self.config.to_user_config().items() if k not in _COORDINATOR_ONLY
        }
        values[keys.MODEL_SPEC] = json.dumps(self.spec.to_dict())
        values[keys.SERVER_ROUND] = server_round
        if split is not None:
            values[keys.SPLIT] = split
        return ConfigRecord(values)

    def _start(self) -> tuple[int, dict[str, np.ndarray]]:
        """Initial weights, or the checkpoint named by ``resume-from``; returns the first round."""
        if not self.config.resume_from:
            arrays = initial_arrays(self.spec, self.config.seed)
            self.run_dir.save_initial(arrays)
            return 1, arrays
        source = RunDir(Path(self.config.resume_from).expanduser())
        checkpoint = source.load_checkpoint()
        saved = ModelSpec.from_dict(checkpoint.model)
        if saved != self.spec:
            raise ValueError(
                f"checkpoint model {saved} differs from the run config's {self.spec}; resume "
                "with the model settings the run was started with."
            )
        load_strategy_state(self.strategy, checkpoint.strategy_state)
        log.info("resuming after round %d from %s", checkpoint.round, source.path)
        return checkpoint.round + 1, checkpoint.arrays

    def run(self) -> dict[str, Any]:
        """Run every remaining round; return the summary written to the run directory."""
        first, arrays = self._start()
        self.run_dir.write_run_record(self.config, sites=[], resumed_from=first - 1)
        status, reason, last_eval = "completed", "", {}
        ran_rounds = False
        for server_round in range(first, self.config.num_server_rounds + 1):
            started = time.monotonic()
            record: dict[str, Any] = {
                "round": server_round,
                "start-model-sha256": sha256_arrays(arrays),
                "start-strategy-sha256": sha256_arrays(strategy_state(self.strategy)),
            }
            new_arrays, train = self._train_round(server_round, arrays)
            record["train"] = {"sites": train.results, "failures": train.failures}
            if train.secure:
                record["train"]["secure-aggregation"] = train.secure
            if new_arrays is None:
                status, reason = (
                    "stopped",
                    (
                        f"round {server_round}: {train.num_trained} site(s) trained, at least "
                        f"{self.config.min_sites} needed (min-sites); failures: {train.failures}"
                    ),
                )
                record["status"] = "failed"
                self.run_dir.append_metrics(record)
                log.error("stopping: %s", reason)
                break
            arrays = new_arrays
            if self.config.secure_aggregation:
                evaluation = self._secure_evaluation(server_round - 1, train)
            else:
                evaluation = self._evaluate_round(server_round, arrays)
                last_eval = evaluation["aggregate"]
            record["evaluate"] = evaluation
            record["status"] = "completed"
            digest = self.run_dir.save_checkpoint(
                server_round, arrays, strategy_state(self.strategy), self.spec.to_dict()
            )
            record["model-sha256"] = digest
            record["seconds"] = round(time.monotonic() - started, 3)
            self.run_dir.append_metrics(record)
            log.info(
                "round %d/%d: %d site(s), val AUC %.3f, val loss %.4f (%.1f s)",
                server_round,
                self.config.num_server_rounds,
                train.num_trained,
                evaluation["aggregate"].get("auc", float("nan")),
                evaluation["aggregate"].get("loss", float("nan")),
                record["seconds"],
            )
            ran_rounds = True
        final: dict[str, Any] = {}
        if self.config.secure_aggregation and ran_rounds:
            final = self._secure_final_evaluation(self.run_dir.latest_round(), arrays)
            last_eval = final["aggregate"]
        summary = {
            "status": status,
            "reason": reason,
            "rounds-completed": self.run_dir.latest_round(),
            "num-server-rounds": self.config.num_server_rounds,
            "validation": last_eval,
            "operating-threshold": last_eval.get("threshold", 0.5),
        }
        if final:
            summary["final-evaluation"] = final
        self.run_dir.write_summary(summary)
        return summary

    def _train_round(
        self, server_round: int, arrays: dict[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray] | None, SiteReplies]:
        messages = list(
            self.strategy.configure_train(
                server_round,
                numpy_to_arrays(arrays.items()),
                self._site_config(server_round),
                self.grid,
            )
        )
        if self.config.secure_aggregation:
            return self._secure_train_round(server_round, arrays, messages)
        replies = send_and_receive(self.grid, messages, timeout=self.config.round_timeout)
        collected = _collect(messages, replies, self.site_names)
        if len(collected.ok) < self.config.min_sites:
            return None, collected
        try:
            aggregated, _ = self.strategy.aggregate_train(server_round, collected.ok)
        except (AggregationError, InconsistentMessageReplies) as exc:
            collected.failures["aggregation"] = str(exc)
            return None, collected
        if aggregated is None:
            return None, collected
        return arrays_to_numpy(aggregated), collected

    def _secure_train_round(
        self, server_round: int, arrays: dict[str, np.ndarray], messages: list[Message]
    ) -> tuple[dict[str, np.ndarray] | None, SiteReplies]:
        """Train under SecAgg+: the strategy then sees only the sites' weighted mean."""
        collected = SiteReplies()
        nodes = [m.metadata.dst_node_id for m in messages]
        if not nodes:
            return None, collected
        threshold = self.config.secagg_threshold or default_threshold(len(nodes))
        site_config = messages[0].content[keys.CONFIG]  # keeps FedProx's proximal-mu
        site_config[keys.NOISE_SHARES] = threshold  # client-level DP: noise per survivor set
        site_config[keys.SPLIT] = "val"  # the sites evaluate the model they are sent on it
        result = secure_train_round(
            self.grid,
            nodes,
            server_round=server_round,
            arrays=arrays,
            site_config=site_config,
            threshold=threshold,
            clipping_range=self.config.secagg_clipping_range,
            timeout=self.config.round_timeout,
            count_sizes=evalsums.count_sizes(self.config.num_classes),
        )
        collected.failures.update(result.failures)
        if result.counts:
            collected.evaluation = evalsums.from_counts(result.counts)
        collected.secure = {
            **self._client_level_epsilon(server_round),
            "status": result.status,
            "reason": result.reason,
            "contributors": result.contributors,
            "dropped": result.dropped,
            "totals": result.totals,
            "error-bound": result.error_bound,
            "seconds": result.seconds,
        }
        if result.arrays is None or result.contributors < self.config.min_sites:
            return None, collected
        mean = Message(
            content=RecordDict(
                {
                    keys.ARRAYS: numpy_to_arrays(result.arrays.items()),
                    keys.METRICS: MetricRecord(
                        {
                            keys.NUM_EXAMPLES: int(result.totals[keys.NUM_EXAMPLES]),
                            keys.LOSS_SUM: float(result.totals[keys.LOSS_SUM]),
                        }
                    ),
                }
            ),
            message_type=MessageType.TRAIN,
            dst_node_id=0,
        )
        aggregated, _ = self.strategy.aggregate_train(server_round, [mean])
        return (None if aggregated is None else arrays_to_numpy(aggregated)), collected

    def _client_level_epsilon(self, server_round: int) -> dict[str, float]:
        """Client-level epsilon of rounds 1..server_round, when the run uses distributed DP.

        Cumulative over the round number (a resumed run counts the rounds before it). The
        noise multiplier is the one every site derives from the run config; no amplification
        by the choice of sites is claimed, so this is the spend of a site in every round.
        """
        plan = self.client_plan  # resolved once per run, in __init__
        if plan is None:
            return {}
        epsilon = planned_client_epsilon(
            noise_multiplier=plan.noise_multiplier, rounds=server_round, delta=plan.delta
        )
        return {
            "client-level-epsilon": epsilon,
            "client-level-delta": plan.delta,
            "noise-multiplier": plan.noise_multiplier,
        }

    def _secure_evaluation(self, model_round: int, train: SiteReplies) -> dict[str, Any]:
        """The evaluation summed inside a secure training round: of the model it started from.

        Under SecAgg+ the sites evaluate the model they are sent before training, and only the
        sum over the contributing sites reaches the coordinator: there are no per-site figures.
        """
        totals = train.evaluation
        return {
            "model-round": model_round,
            "secure-aggregation": True,
            "sites": {},
            "aggregate": _evaluation_metrics(totals, self.config) if totals else {},
            "subgroups": {},
            "failures": {},
        }

    def _secure_final_evaluation(
        self, model_round: int, arrays: dict[str, np.ndarray]
    ) -> dict[str, Any]:
        """Evaluate the last model in an evaluation-only secure round (for the run summary)."""
        nodes = list(self.grid.get_node_ids())
        site_config = self._site_config(model_round, "val")
        result = secure_train_round(
            self.grid,
            nodes,
            server_round=model_round,
            arrays=arrays,
            site_config=site_config,
            threshold=self.config.secagg_threshold or default_threshold(len(nodes)),
            clipping_range=self.config.secagg_clipping_range,
            timeout=self.config.round_timeout,
            count_sizes=evalsums.count_sizes(self.config.num_classes),
            train=False,
        )
        aggregate = (
            _evaluation_metrics(evalsums.from_counts(result.counts), self.config)
            if result.counts
            else {}
        )
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
        }

    def _evaluate_round(self, server_round: int, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        messages = [
            Message(
                content=_content(
                    numpy_to_arrays(arrays.items()), self._site_config(server_round, "val")
                ),
                message_type=MessageType.EVALUATE,
                dst_node_id=node_id,
            )
            for node_id in self.grid.get_node_ids()
        ]
        replies = send_and_receive(self.grid, messages, timeout=self.config.round_timeout)
        collected = _collect(messages, replies, self.site_names)
        per_site = {
            site: _evaluation_metrics(sums, self.config) for site, sums in collected.results.items()
        }
        aggregate: dict[str, float] = {}
        if collected.ok:
            totals = self.strategy.aggregate_evaluate(server_round, collected.ok)
            if totals is not None:
                aggregate = _evaluation_metrics(dict(totals), self.config)
        return {
            "sites": per_site,
            "aggregate": aggregate,
            "subgroups": collected.subgroups,
            "failures": collected.failures,
        }


def _content(arrays: ArrayRecord, config: ConfigRecord) -> RecordDict:
    return RecordDict({keys.ARRAYS: arrays, keys.CONFIG: config})
