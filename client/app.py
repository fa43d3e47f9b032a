"""The site's Flower ClientApp: the only client module that imports flwr.

Each handler turns the coordinator's records into plain calls (``client.site``,
``client.train``), checks the reply against the allow-list (``client.reply``) and answers. A
failure on one message becomes an error reply that names the problem, never a crash of the node.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.disclosure import subgroup_counts
from client.reply import check_reply
from client.site import Site, resolve_site, site_dataset
from client.train import TrainSettings, evaluate_local, train_local
from fedrad import keys
from fedrad.config import RunConfig
from fedrad.errors import FedradError
from models import ModelSpec

log = logging.getLogger(__name__)

ERROR_CODE_FEDRAD = 100
"""Error code of a reply refused on purpose (bad data, bad request); Flower uses 0-3."""

app = ClientApp()


def _request(msg: Message, context: Context) -> tuple[Site, RunConfig, torch.nn.Module]:
    site = resolve_site(context.node_config, context.run_config)
    if site.num_threads > 0:
        torch.set_num_threads(site.num_threads)
    config_record = msg.content[keys.CONFIG]
    config = RunConfig.from_user_config(
        {k: v for k, v in config_record.items() if k not in _NON_RUN_KEYS}, strict=False
    )
    spec = ModelSpec.from_dict(json.loads(str(config_record[keys.MODEL_SPEC])))
    model = spec.build()
    model.load_state_dict(msg.content[keys.ARRAYS].to_torch_state_dict())
    return site, config, model


_NON_RUN_KEYS = frozenset({keys.SERVER_ROUND, keys.MODEL_SPEC, keys.SPLIT})


def _guarded(handler: Callable[[Message, Context], RecordDict]) -> Callable[..., Message]:
    """Run a handler; turn fedrad's own errors into an error reply with the reason."""

    def wrapper(msg: Message, context: Context) -> Message:
        try:
            content = handler(msg, context)
            site = resolve_site(context.node_config, context.run_config)
            check_reply(content, min_cell_count=site.min_cell_count)
        except FedradError as exc:
            log.error("refusing %s request: %s", msg.metadata.message_type, exc)
            return Message(Error(code=ERROR_CODE_FEDRAD, reason=str(exc)), reply_to=msg)
        return Message(content, reply_to=msg)

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper


def _train(msg: Message, context: Context) -> RecordDict:
    site, config, model = _request(msg, context)
    dataset = site_dataset(site, config).subset("train")
    server_round = int(msg.content[keys.CONFIG][keys.SERVER_ROUND])
    settings = TrainSettings(
        local_epochs=config.local_epochs,
        learning_rate=config.learning_rate,
        batch_size=config.batch_size,
        optimizer=config.optimizer,
        momentum=config.momentum,
        weight_decay=config.weight_decay,
        proximal_mu=float(msg.content[keys.CONFIG].get(keys.PROXIMAL_MU, 0.0))
        if config.strategy == "fedprox" else 0.0,
        seed=config.seed * 100_003 + server_round,
    )
    if len(dataset) == 0:
        raise FedradError(f"site {site.site_id} has no training samples (split 'train').")
    sums = train_local(model, dataset, settings)
    return RecordDict(
        {
            keys.ARRAYS: ArrayRecord(model.state_dict()),
            keys.METRICS: MetricRecord(
                {
                    keys.NUM_EXAMPLES: sums.num_examples,
                    keys.LOSS_SUM: sums.loss_sum,
                    keys.NUM_STEPS: sums.num_steps,
                }
            ),
            keys.SITE: ConfigRecord({keys.SITE_ID: site.site_id}),
        }
    )


def _evaluate(msg: Message, context: Context) -> RecordDict:
    site, config, model = _request(msg, context)
    split = str(msg.content[keys.CONFIG].get(keys.SPLIT, "val"))
    dataset = site_dataset(site, config).subset(split)
    if len(dataset) == 0:
        raise FedradError(f"site {site.site_id} has no samples in split '{split}'.")
    sums = evaluate_local(model, dataset)
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
            keys.SUBGROUPS: ConfigRecord(
                subgroup_counts(
                    (s.attributes for s in dataset.samples), min_cell_count=site.min_cell_count
                )
            ),
        }
    )


train = app.train()(_guarded(_train))
evaluate = app.evaluate()(_guarded(_evaluate))
