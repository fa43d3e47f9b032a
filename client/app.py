"""The site's Flower ClientApp: the only client module that imports flwr.

Each handler turns the coordinator's records into plain calls (``client.site``,
``client.train``), checks the reply against the allow-list (``client.reply``) and answers. A
failure on one message becomes an error reply that names the problem, never a crash of the node.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.app.typing import ConfigRecordValues
from flwr.clientapp import ClientApp

from client.dataset import SiteDataset
from client.disclosure import subgroup_counts
from client.dp_train import DPTrainSums, train_local_dp
from client.errors import log_refusal
from client.reply import check_reply
from client.secagg import register as register_secagg
from client.site import Site, resolve_site, site_dataset
from client.train import EvalSums, TrainSettings, TrainSums, evaluate_local, train_local
from fedrad.core import evalsums, keys
from fedrad.core.config import NodeConfig, RunConfig
from fedrad.core.errors import ERROR_DATA, FedradError
from models import DP_GRAD_SAMPLE_MODES, ModelSpec
from privacy import (
    ClientDPPlan,
    DPRequest,
    PrivacyLedger,
    PrivacyRefused,
    check_client_round,
    privatize_update,
    resolve_dp,
)

log = logging.getLogger(__name__)

ERROR_CODE_FEDRAD = ERROR_DATA
"""Error code of a reply refused for the site's data; all codes: ``fedrad.core.errors``."""

app = ClientApp()


Handler = Callable[[Message, Context, Site], RecordDict]
"""A handler of one message at this site (the site parsed once from the node config)."""


def _site(context: Context) -> Site:
    """Parse the node config (once per message) and find this node's site."""
    node = NodeConfig.from_user_config(context.node_config)
    return resolve_site(node, sites_dir=str(context.run_config.get("sites-dir", "")))


def _config_number(record: ConfigRecord, key: str, default: float | None = None) -> float:
    """A number the coordinator sent in the message's config record."""
    value = record.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise FedradError(f"the request's '{key}' must be a number, got {value!r}.")
    return float(value)


def _config_int(record: ConfigRecord, key: str, default: int | None = None) -> int:
    """An integer the coordinator sent in the message's config record."""
    return int(_config_number(record, key, default))


def _request(msg: Message, site: Site) -> tuple[RunConfig, torch.nn.Module]:
    if site.num_threads > 0:
        torch.set_num_threads(site.num_threads)
    config_record = msg.content.config_records[keys.CONFIG]
    config = RunConfig.from_user_config(
        {k: v for k, v in config_record.items() if k not in _NON_RUN_KEYS}, strict=False
    )
    spec = ModelSpec.from_dict(json.loads(str(config_record[keys.MODEL_SPEC])))
    model = spec.build()
    model.load_state_dict(msg.content.array_records[keys.ARRAYS].to_torch_state_dict())
    return config, model


_NON_RUN_KEYS = frozenset({keys.SERVER_ROUND, keys.MODEL_SPEC, keys.SPLIT})


def _guarded(handler: Handler) -> Callable[[Message, Context], Message]:
    """Run a handler; turn every exception into an error reply with a code and fixed sentence.

    The site's allow-list (``allowed-studies``) is checked before anything else. The reply
    carries only :func:`client.errors.refusal`'s code and sentence; the exception's text
    (paths, file names, labels) goes to the site's own log. ``Exception``, not
    ``BaseException``: an interrupt still stops the node.
    """

    def wrapper(msg: Message, context: Context) -> Message:
        try:
            site = _site(context)
            _check_study(msg, site)
            content = handler(msg, context, site)
            check_reply(content, min_cell_count=site.min_cell_count)
        except Exception as exc:  # the edge: nothing the site did not choose may leave
            code, sentence = log_refusal(
                exc, message_type=msg.metadata.message_type, node_config=context.node_config
            )
            return Message(Error(code=code, reason=sentence), reply_to=msg)
        return Message(content, reply_to=msg)

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper


def _check_study(msg: Message, site: Site) -> None:
    """Refuse a study outside the site's non-empty ``allowed-studies`` before any work."""
    record = msg.content.config_records.get(keys.CONFIG)
    study = record.get("study-id", "") if record is not None else ""
    site.limits.check_study(str(study))


def _train(msg: Message, context: Context) -> RecordDict:
    """Local training of one message (also the SecAgg+ key step's training)."""
    return _train_site(msg, context, _site(context))


def _train_site(msg: Message, context: Context, site: Site) -> RecordDict:
    config, model = _request(msg, site)
    dataset = site_dataset(site, config).subset("train")
    config_record = msg.content.config_records[keys.CONFIG]
    server_round = _config_int(config_record, keys.SERVER_ROUND)
    settings = TrainSettings(
        local_epochs=config.local_epochs,
        learning_rate=config.learning_rate,
        batch_size=config.batch_size,
        optimizer=config.optimizer,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        proximal_mu=_config_number(config_record, keys.PROXIMAL_MU, 0.0)
        if config.strategy == "fedprox"
        else 0.0,
        seed=config.seed * 100_003 + server_round,
    )
    if len(dataset) == 0:
        raise FedradError(f"site {site.site_id} has no training samples (split 'train').")
    metrics: dict[str, int | float] = {}
    sums: TrainSums
    if config.dp == "sample":
        dp_sums = _train_dp(context, site, config, model, dataset, settings, server_round)
        sums, metrics = dp_sums, {keys.EPSILON: dp_sums.epsilon, keys.DELTA: dp_sums.delta}
    elif config.dp == "client":
        sums, metrics = _train_client_dp(msg, site, config, model, dataset, settings, server_round)
    else:
        sums = train_local(model, dataset, settings)
    return RecordDict(
        {
            keys.ARRAYS: ArrayRecord(model.state_dict()),
            keys.METRICS: MetricRecord(
                {
                    keys.NUM_EXAMPLES: sums.num_examples,
                    keys.LOSS_SUM: sums.loss_sum,
                    keys.NUM_STEPS: sums.num_steps,
                    **metrics,
                }
            ),
            keys.SITE: ConfigRecord({keys.SITE_ID: site.site_id}),
        }
    )


def _train_dp(
    context: Context,
    site: Site,
    config: RunConfig,
    model: torch.nn.Module,
    dataset: SiteDataset,
    settings: TrainSettings,
    server_round: int,
) -> DPTrainSums:
    """One round of DP-SGD; the site's own ceilings and ledger decide whether it may train.

    The sampling and noise draw on OS randomness: a seed the coordinator knows would let it
    subtract the noise.
    """
    request = DPRequest.from_run_config(config)
    ledger = PrivacyLedger.open(site.ledger_root, study_id=request.study_id, site_id=site.site_id)
    run_id = str(context.run_id)
    plan = resolve_dp(
        request,
        site.limits,
        num_train_samples=len(dataset),
        batch_size=config.batch_size,
        study_delta=ledger.delta,
        prior_history=ledger.history_before(run_id),
    )
    return train_local_dp(
        model,
        dataset,
        settings,
        plan,
        ledger,
        server_round=server_round,
        run_id=run_id,
        grad_sample_mode=DP_GRAD_SAMPLE_MODES[config.model],
    )


def _train_client_dp(
    msg: Message,
    site: Site,
    config: RunConfig,
    model: torch.nn.Module,
    dataset: SiteDataset,
    settings: TrainSettings,
    server_round: int,
) -> tuple[TrainSums, dict[str, int | float]]:
    """Train, then clip the update and add this site's noise share (distributed DP).

    The site's own ceilings and client-level ledger decide whether it may contribute; the
    round is recorded before the noised update is returned. Sites weigh equally under
    client-level DP: the reply's example count is 1.
    """
    shares = _config_int(msg.content.config_records[keys.CONFIG], keys.NOISE_SHARES, 0)
    if shares < 1:
        raise PrivacyRefused(
            "dp 'client' needs secure aggregation: alone, this site's update would carry only "
            "its share of the noise. Refusing to send it in the clear."
        )
    plan = ClientDPPlan.from_run_config(config)
    ledger = PrivacyLedger.open(
        site.ledger_root, study_id=plan.study_id, site_id=site.site_id, level="client"
    )
    check_client_round(plan=plan, limits=site.limits, ledger=ledger)  # before spending compute
    start = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    sums = train_local(model, dataset, settings)
    trained = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    private = privatize_update(
        start,
        trained,
        plan=plan,
        noise_shares=shares,
        limits=site.limits,
        ledger=ledger,
        server_round=server_round,
        run_id=str(msg.metadata.run_id),
    )
    model.load_state_dict({k: torch.from_numpy(v) for k, v in private.arrays.items()})
    return TrainSums(
        num_examples=1, loss_sum=sums.loss_sum / max(sums.num_examples, 1), num_steps=sums.num_steps
    ), {keys.EPSILON: private.epsilon, keys.DELTA: private.delta}


def _evaluate_split(msg: Message, site: Site) -> tuple[SiteDataset, EvalSums]:
    """Evaluate the message's model on the split it names (``val`` unless it says)."""
    config, model = _request(msg, site)
    split = str(msg.content.config_records[keys.CONFIG].get(keys.SPLIT, "val"))
    dataset = site_dataset(site, config).subset(split)
    if len(dataset) == 0:
        raise FedradError(f"site {site.site_id} has no samples in split '{split}'.")
    return dataset, evaluate_local(model, dataset)


def _evaluation_counts(msg: Message, context: Context) -> dict[str, np.ndarray]:
    """The evaluation sums of the message's model as secure-aggregation counts."""
    _, sums = _evaluate_split(msg, _site(context))
    return evalsums.to_counts(
        {
            keys.NUM_EXAMPLES: sums.num_examples,
            keys.LOSS_SUM: sums.loss_sum,
            keys.CONFUSION: sums.confusion.ravel(),
            keys.SCORE_HIST: sums.score_hist.ravel(),
        },
        num_classes=sums.confusion.shape[0],
    )


def _evaluate(msg: Message, context: Context, site: Site) -> RecordDict:
    dataset, sums = _evaluate_split(msg, site)
    cells: dict[str, ConfigRecordValues] = dict(
        subgroup_counts((s.attributes for s in dataset.samples), min_cell_count=site.min_cell_count)
    )
    return RecordDict(
        {
            keys.METRICS: MetricRecord(
                {
                    keys.NUM_EXAMPLES: sums.num_examples,
                    keys.LOSS_SUM: sums.loss_sum,
                    keys.CONFUSION: [int(v) for v in sums.confusion.ravel()],
                    keys.SCORE_HIST: [int(v) for v in sums.score_hist.ravel()],
                }
            ),
            keys.SITE: ConfigRecord({keys.SITE_ID: site.site_id}),
            keys.SUBGROUPS: ConfigRecord(cells),
        }
    )


train = app.train()(_guarded(_train_site))
evaluate = app.evaluate()(_guarded(_evaluate))
register_secagg(app, _train, _evaluation_counts)  # SecAgg+ stages; they catch their own errors
