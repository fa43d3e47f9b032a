"""The coordinator's round loop: configure, send and receive, aggregate, evaluate, checkpoint.

fedrad owns this loop rather than handing the run to ``strategy.start()``: secure aggregation
(several exchanges per round) and resume after a restart need the steps in the open. The chosen
Flower strategy still samples sites and aggregates.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.exception import AggregationError, InconsistentMessageReplies

from fedrad.core import keys
from fedrad.core.config import RunConfig
from models import ModelSpec
from privacy import ClientDPPlan, planned_client_epsilon
from server.audit_trail import open_run_trail
from server.digest import sha256_arrays
from server.exchange import (
    SiteReplies,
    collect_replies,
    describe_failures,
    load_node_names,
    send_and_receive,
)
from server.fairness import cell_counts, round_counts, save_counts
from server.initial_model import initial_arrays, model_spec
from server.metrics import evaluation_metrics
from server.report import write_report
from server.rundir import RunDir
from server.secure_rounds import evaluate_securely, secure_evaluation, train_securely
from server.strategies import (
    arrays_to_numpy,
    build_strategy,
    load_strategy_state,
    numpy_to_arrays,
    strategy_state,
)

log = logging.getLogger(__name__)

# Run-config keys that describe the coordinator's own disk; never sent to a site.
_COORDINATOR_ONLY = ("sites-dir", "out-dir", "resume-from", "node-names", "audit-key")


class Federation:
    """One run of the round loop over a Grid, writing into a run directory."""

    def __init__(self, grid: Grid, config: RunConfig, run_dir: RunDir) -> None:
        self.grid = grid
        self.config = config
        self.run_dir = run_dir
        self.strategy = build_strategy(config)
        self.spec = model_spec(config)
        self.client_plan = ClientDPPlan.from_run_config(config) if config.dp == "client" else None
        self.site_names: dict[int, str] = load_node_names(config.node_names)
        """Node id to site name: the operator's registrations, then what sites reported."""
        self.participants: set[str] = set()
        """The sites that took part so far (names, or ``node-<id>`` under SecAgg+)."""

    def _note_participants(self, replies: SiteReplies) -> None:
        """Add the sites of ``replies`` to the run record's ``sites`` when new ones took part."""
        if set(replies.participants) <= self.participants:
            return
        self.participants.update(replies.participants)
        self.run_dir.record_sites(sorted(self.participants))

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
        checkpoint = source.resume_point()
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
        audit = open_run_trail(
            self.config,
            self.run_dir.path,
            resumed_after=first - 1,
            start_model=sha256_arrays(arrays),
        )
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
            self._note_participants(train)
            record["train"] = {"sites": train.results, "failures": train.failures}
            if train.secure:
                record["train"]["secure-aggregation"] = train.secure
            if new_arrays is None:
                status, reason = (
                    "stopped",
                    (
                        f"round {server_round}: {train.num_trained} site(s) trained, at least "
                        f"{self.config.min_sites} needed (min-sites); failures: "
                        f"{describe_failures(train.failures) or 'none'}"
                    ),
                )
                record["status"] = "failed"
                self.run_dir.append_metrics(record)
                audit.record_round(record, train.participants)
                log.error("stopping: %s", reason)
                break
            arrays = new_arrays
            if self.config.secure_aggregation:
                evaluation = secure_evaluation(server_round - 1, train, self.config)
                self._keep_fairness(
                    server_round - 1, evaluation["aggregate"], train.evaluation.get(keys.FAIRNESS)
                )
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
            audit.record_round(record, train.participants)
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
            model_round = self.run_dir.latest_round()
            final = evaluate_securely(
                self.grid,
                self.config,
                model_round=model_round,
                arrays=arrays,
                site_config=self._site_config(model_round, "val"),
                names=self.site_names,
            )
            last_eval = final["aggregate"]
            self._keep_fairness(model_round, last_eval, final.pop("fairness", None))
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
        audit.record_end(summary)
        summary["audit"] = audit.summary_fields()
        self.run_dir.write_summary(summary)
        write_report(self.run_dir.path)
        return summary

    def _keep_fairness(
        self,
        model_round: int,
        aggregate: dict[str, Any],
        total: Any,
        per_site: dict[str, Any] | None = None,
    ) -> None:
        """Store an evaluation's fairness counts; with fairness-every-round, report them now."""
        stored = round_counts(
            self.config,
            model_round=model_round,
            threshold=float(aggregate.get("threshold", 0.5)),
            total=total,
            per_site=per_site,
        )
        if stored is None:
            return
        save_counts(self.run_dir.path, stored)
        if self.config.fairness_every_round:
            write_report(self.run_dir.path)

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
            return train_securely(
                self.grid,
                self.strategy,
                self.config,
                server_round=server_round,
                arrays=arrays,
                messages=messages,
                client_level=self._client_level_epsilon(server_round),
                names=self.site_names,
            )
        replies = send_and_receive(self.grid, messages, timeout=self.config.round_timeout)
        collected = collect_replies(messages, replies, self.site_names)
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
        collected = collect_replies(messages, replies, self.site_names)
        self._note_participants(collected)
        per_site = {
            site: evaluation_metrics(sums, self.config) for site, sums in collected.results.items()
        }
        aggregate: dict[str, float] = {}
        if collected.ok:
            totals = self.strategy.aggregate_evaluate(server_round, collected.ok)
            if totals is not None:
                aggregate = evaluation_metrics(dict(totals), self.config)
                self._keep_fairness(
                    server_round,
                    aggregate,
                    totals.get(keys.FAIRNESS),
                    {
                        site: result[keys.FAIRNESS]
                        for site, result in collected.results.items()
                        if keys.FAIRNESS in result
                    },
                )
        return {
            "sites": per_site,
            "aggregate": aggregate,
            "subgroups": {
                site: cell_counts(self.config.fairness_layout, r[keys.FAIRNESS])
                for site, r in collected.results.items()
                if keys.FAIRNESS in r
            },
            "failures": collected.failures,
        }


def _content(arrays: ArrayRecord, config: ConfigRecord) -> RecordDict:
    return RecordDict({keys.ARRAYS: arrays, keys.CONFIG: config})
