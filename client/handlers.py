"""The site's message handlers: the ClientApp that runs them in-process (``client.handlers:app``).

The deployed ClientApp, ``client.app:app``, forwards each message to the site's warm worker
(:mod:`client.worker`), which runs this app; in simulation ``client.app`` runs it directly.
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
from flwr.clientapp import ClientApp

from client.dataset import SiteDataset
from client.dp_train import DPTrainSums, train_local_dp
from client.errors import log_refusal
from client.fairness import site_vector, suppress, suppressed_labels
from client.replay import load_replay, model_digest, request_digest, save_replay
from client.reply import check_reply
from client.secagg import SecureInput
from client.secagg import register as register_secagg
from client.sent_reply import record_refusal, record_reply
from client.site import Site, resolve_site, site_dataset
from client.train import EvalSums, TrainSettings, TrainSums, eval_sums, predict, train_local
from fedrad.core import evalsums, keys
from fedrad.core.config import NodeConfig, RunConfig
from fedrad.core.errors import ERROR_DATA, FedradError
from fedrad.core.fairness import VARIANCE_SCALE, FairnessLayout
from models import DP_GRAD_SAMPLE_MODES, ModelSpec
from privacy import (
    ClientDPPlan,
    DPRequest,
    PrivacyLedger,
    PrivacyRefused,
    check_client_round,
    eval_entry,
    eval_noise_multiplier,
    privatize_update,
    release_eval_sums,
    resolve_dp,
    study_delta,
)
from privacy.secagg import RoundSetup
from privacy.secagg.wire import LOSS_ARRAY, LOSS_RANGE

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
    ``BaseException``: an interrupt still stops the node. Every reply, error replies too, is
    written to the site's sent log before it leaves (:mod:`client.sent_reply`); a reply
    whose line cannot be written is refused.
    """

    def wrapper(msg: Message, context: Context) -> Message:
        site: Site | None = None
        try:
            site = _site(context)
            _check_study(msg, site)
            content = handler(msg, context, site)
            check_reply(content, min_cell_count=site.min_cell_count)
            reply = Message(content, reply_to=msg)
            record_reply(reply, request=msg, context=context, site=site)
        except Exception as exc:  # the edge: nothing the site did not choose may leave
            code, sentence = log_refusal(
                exc, message_type=msg.metadata.message_type, node_config=context.node_config
            )
            refused = Message(Error(code=code, reason=sentence), reply_to=msg)
            return record_refusal(refused, request=msg, context=context, site=site)
        return reply

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper


def _min_threshold(context: Context) -> int:
    """The site's smallest accepted secure-aggregation threshold (its node config)."""
    return _site(context).secagg_min_threshold


def _check_study(msg: Message, site: Site) -> None:
    """Refuse a study outside the site's non-empty ``allowed-studies`` before any work."""
    record = msg.content.config_records.get(keys.CONFIG)
    study = record.get("study-id", "") if record is not None else ""
    site.limits.check_study(str(study))


def _settings(config: RunConfig, config_record: ConfigRecord, server_round: int) -> TrainSettings:
    return TrainSettings(
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


def _train_dataset(site: Site, config: RunConfig) -> SiteDataset:
    dataset = site_dataset(site, config).subset("train")
    if len(dataset) == 0:
        raise FedradError(f"site {site.site_id} has no training samples (split 'train').")
    return dataset


def _train_site(msg: Message, context: Context, site: Site) -> RecordDict:
    """A plain train message: FedAvg in the clear, or DP-SGD; client-level DP is refused here.

    Under DP the training loss is withheld: it is computed on the training data and no
    accountant covers it.
    """
    config, model = _request(msg, site)
    if config.dp == "client":
        raise PrivacyRefused(
            "dp 'client' is trained only inside a secure-aggregation round this site has "
            "verified (the train.secagg_keys message): in a plain reply its update would "
            "carry only its share of the noise. Refusing this plain train request."
        )
    config_record = msg.content.config_records[keys.CONFIG]
    server_round = _config_int(config_record, keys.SERVER_ROUND)
    settings = _settings(config, config_record, server_round)
    dataset = _train_dataset(site, config)
    metrics: dict[str, int | float] = {}
    sums: TrainSums
    if config.dp == "sample":
        dp_sums = _train_dp(context, site, config, model, dataset, settings, server_round)
        sums, metrics = dp_sums, {keys.EPSILON: dp_sums.epsilon, keys.DELTA: dp_sums.delta}
    else:
        sums = train_local(model, dataset, settings)
        metrics = {keys.LOSS_SUM: sums.loss_sum}
    return RecordDict(
        {
            keys.ARRAYS: ArrayRecord(model.state_dict()),
            keys.METRICS: MetricRecord(
                {keys.NUM_EXAMPLES: sums.num_examples, keys.NUM_STEPS: sums.num_steps, **metrics}
            ),
            keys.SITE: ConfigRecord({keys.SITE_ID: site.site_id}),
        }
    )


def _secure_input(msg: Message, context: Context, setup: RoundSetup) -> SecureInput:
    """Train for a verified secure-aggregation round; return what the site masks.

    The update (trained minus global weights) is clipped to the round's clipping range, value
    by value, and the clipped values are counted in the site's log. Under client-level DP the
    site clips the update's norm and adds its integer noise share, sized by ``setup.threshold``
    (verified against its own minimum, see :func:`privacy.privatize_update`); under any DP the
    loss entry is zero (withheld).
    """
    site = _site(context)
    _check_study(msg, site)
    config, model = _request(msg, site)
    config_record = msg.content.config_records[keys.CONFIG]
    server_round = _config_int(config_record, keys.SERVER_ROUND)
    settings = _settings(config, config_record, server_round)
    dataset = _train_dataset(site, config)
    start = {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()}
    r = setup.clipping_range
    if config.dp == "client":
        plan = ClientDPPlan.from_run_config(config)
        ledger = PrivacyLedger.open(
            site.ledger_root, study_id=plan.study_id, site_id=site.site_id, level="client"
        )
        check_client_round(plan=plan, limits=site.limits, ledger=ledger)  # before the compute
        train_local(model, dataset, settings)
        trained = {k: v.detach().numpy() for k, v in model.state_dict().items()}
        private = privatize_update(
            start,
            trained,
            plan=plan,
            threshold=setup.threshold,
            min_threshold=site.secagg_min_threshold,
            clipping_range=r,
            quantisation_bits=setup.quantisation_bits,
            extra={LOSS_ARRAY: np.zeros(1)},
            limits=site.limits,
            ledger=ledger,
            server_round=server_round,
            run_id=str(msg.metadata.run_id),
        )
        log.info(
            "site %s, round %d: client-level DP share std %.1f (threshold %d); %d value(s) "
            "clipped to the range %g%s; epsilon %.4f",
            site.site_id,
            server_round,
            private.share_std,
            setup.threshold,
            private.clipped_values,
            r,
            ", update norm clipped" if private.norm_clipped else "",
            private.epsilon,
        )
        return SecureInput(update=private.update, weight=1, noise=private.noise)
    if config.dp == "sample":
        sums: TrainSums = _train_dp(context, site, config, model, dataset, settings, server_round)
        loss_entry = 0.0  # withheld: no accountant covers the DP-SGD loss
    else:
        sums = train_local(model, dataset, settings)
        mean_loss = sums.loss_sum / max(sums.num_examples, 1)
        loss_entry = float(np.clip(mean_loss, 0.0, LOSS_RANGE)) * r / LOSS_RANGE
    update = {
        k: v.detach().numpy().astype(np.float64) - start[k] for k, v in model.state_dict().items()
    }
    if any(not np.all(np.isfinite(v)) for v in update.values()):
        raise FedradError(
            "the trained model holds NaN or infinite values: lower the learning rate."
        )
    clipped = sum(int(np.count_nonzero(np.abs(v) > r)) for v in update.values())
    boxed = {k: np.clip(v, -r, r) for k, v in update.items()}
    if clipped:
        log.info(
            "site %s, round %d: %d update value(s) clipped to the secure-aggregation range %g",
            site.site_id,
            server_round,
            clipped,
            r,
        )
    boxed[LOSS_ARRAY] = np.array([loss_entry])
    weight = min(int(sums.num_examples), setup.max_weight)
    return SecureInput(update=boxed, weight=max(weight, 1))


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
    subtract the noise. The noise multiplier, when derived, reserves the budget of the run's
    noised evaluations (one per planned round and a final one, see :func:`_release_eval`).
    A round asked for again from the same model (a coordinator that restarted with the round
    in flight) is answered with the update this site released for it (:mod:`client.replay`).
    """
    request = DPRequest.from_run_config(config)
    ledger = PrivacyLedger.open(site.ledger_root, study_id=request.study_id, site_id=site.site_id)
    start = model_digest({k: v.detach().numpy() for k, v in model.state_dict().items()})
    asked = request_digest(config.to_user_config())
    kept = load_replay(
        site.ledger_root,
        study=request.study_id,
        site=site.site_id,
        server_round=server_round,
        start=start,
        request=asked,
    )
    if kept is not None:  # a retried round: the update already released, at no new cost
        model.load_state_dict({k: torch.as_tensor(v) for k, v in kept.arrays.items()})
        log.info(
            "site %s, round %d: asked again from the same model; sending the update this "
            "site released for it before (no new privacy cost)",
            site.site_id,
            server_round,
        )
        return DPTrainSums(
            num_examples=int(kept.sums["num-examples"]),
            loss_sum=float(kept.sums["loss-sum"]),
            num_steps=int(kept.sums["num-steps"]),
            epsilon=ledger.spent_epsilon,
            delta=float(ledger.delta or 0.0),
        )
    run_id = str(context.run_id)
    releases = config.num_server_rounds + 1  # one evaluation per planned round, and a final one
    delta = study_delta(ledger, request.delta, num_train_samples=len(dataset), limits=site.limits)
    eval_noise = eval_noise_multiplier(
        budget_epsilon=min(request.target_epsilon, site.limits.max_epsilon),
        delta=delta,
        releases=releases,
        fraction=site.eval_budget_fraction,
    )
    reserved = (eval_entry(eval_noise),) * releases
    plan = resolve_dp(
        request,
        site.limits,
        num_train_samples=len(dataset),
        batch_size=config.batch_size,
        study_delta=ledger.delta,
        prior_history=ledger.history_before(run_id) + reserved,
    )
    sums = train_local_dp(
        model,
        dataset,
        settings,
        plan,
        ledger,
        server_round=server_round,
        run_id=run_id,
        grad_sample_mode=DP_GRAD_SAMPLE_MODES[config.model],
    )
    save_replay(  # recorded in the ledger already; kept before the reply leaves
        site.ledger_root,
        study=request.study_id,
        site=site.site_id,
        server_round=server_round,
        start=start,
        request=asked,
        arrays={k: v.detach().numpy() for k, v in model.state_dict().items()},
        sums={
            "num-examples": sums.num_examples,
            "loss-sum": sums.loss_sum,
            "num-steps": sums.num_steps,
        },
    )
    return sums


def _evaluate_val(msg: Message, site: Site) -> tuple[RunConfig, SiteDataset, EvalSums, np.ndarray]:
    """Evaluate the message's model on this site's validation split, whatever it asks.

    The split is the site's decision: a request naming another split (its training data,
    where the model's loss would reveal membership) is answered on ``val`` all the same.
    Returns the sums and the site's fairness vector of the run's layout (not yet suppressed).
    """
    config, model = _request(msg, site)
    asked = msg.content.config_records[keys.CONFIG].get(keys.SPLIT, "val")
    if asked != "val":
        log.warning("the coordinator asked to evaluate on split %r; evaluating on val", asked)
    dataset = site_dataset(site, config).subset("val")
    if len(dataset) == 0:
        raise FedradError(f"site {site.site_id} has no samples in its validation split.")
    scores, labels = predict(model, dataset)
    fairness = site_vector(
        config.fairness_layout, scores, labels, [s.attributes for s in dataset.samples]
    )
    return config, dataset, eval_sums(scores, labels), fairness


def _released_sums(
    msg: Message, context: Context, site: Site
) -> tuple[RunConfig, SiteDataset, dict[str, int | float | list[int] | list[float]]]:
    """The evaluation sums this site releases: exact without DP, noised and charged with it.

    Under DP (either mode) the counts, the fairness vector included, carry discrete Gaussian
    noise derived from the site's own ``eval-budget-fraction``, and the release is charged to
    the study's record-level ledger before it leaves (:func:`privacy.release_eval_sums`); the
    loss sum is withheld (zero). Then the fairness vector's small cells are suppressed (on the
    noised counts under DP: post-processing) and its first slot says the noise variance.
    """
    config, dataset, sums, fairness = _evaluate_val(msg, site)
    layout = config.fairness_layout
    if config.dp == "off":
        return (
            config,
            dataset,
            {
                keys.NUM_EXAMPLES: sums.num_examples,
                keys.LOSS_SUM: sums.loss_sum,
                keys.CONFUSION: [int(v) for v in sums.confusion.ravel()],
                keys.SCORE_HIST: [int(v) for v in sums.score_hist.ravel()],
                keys.FAIRNESS: _published(fairness, layout, site, variance=0.0),
            },
        )
    server_round = _config_int(msg.content.config_records[keys.CONFIG], keys.SERVER_ROUND, 0)
    train_size = len(site_dataset(site, config).subset("train"))
    ledger = PrivacyLedger.open(site.ledger_root, study_id=config.study_id, site_id=site.site_id)
    noised = release_eval_sums(
        confusion=sums.confusion,
        score_hist=sums.score_hist,
        planned_releases=config.num_server_rounds + 1,
        budget_fraction=site.eval_budget_fraction,
        ledger=ledger,
        limits=site.limits,
        target_epsilon=config.target_epsilon,
        delta=config.delta or None,
        accountant=config.dp_accountant if config.dp == "sample" else "rdp",
        num_train_samples=max(train_size, 1),
        server_round=server_round,
        run_id=str(context.run_id),
        extra=fairness,
        extra_l2_squared=layout.record_l2_squared,
    )
    log.info(
        "site %s, round %d: evaluation sums released with noise std %.2f; epsilon %.4f",
        site.site_id,
        server_round,
        noised.std,
        noised.epsilon,
    )
    assert noised.extra is not None  # the fairness vector was passed in
    return (
        config,
        dataset,
        {
            keys.NUM_EXAMPLES: noised.num_examples,
            keys.LOSS_SUM: 0.0,
            keys.CONFUSION: [int(v) for v in noised.confusion.ravel()],
            keys.SCORE_HIST: [int(v) for v in noised.score_hist.ravel()],
            keys.FAIRNESS: _published(noised.extra, layout, site, variance=noised.std**2),
        },
    )


def _published(
    vector: np.ndarray, layout: FairnessLayout, site: Site, *, variance: float
) -> list[int]:
    """The fairness vector as it leaves: small cells suppressed, the noise variance in front."""
    out = suppress(vector, layout, min_cell_count=site.min_cell_count)
    out[0] = round(variance * VARIANCE_SCALE)
    left_out = suppressed_labels(out, layout)
    if left_out:
        log.info(
            "site %s: %d subgroup cell(s) below min-cell-count %d or protecting one were "
            "suppressed: %s",
            site.site_id,
            len(left_out),
            site.min_cell_count,
            ", ".join(left_out[:20]),
        )
    return [int(v) for v in out]


def _evaluation_counts(msg: Message, context: Context) -> dict[str, np.ndarray]:
    """The released evaluation sums of the message's model as secure-aggregation counts."""
    site = _site(context)
    _check_study(msg, site)
    config, _, released = _released_sums(msg, context, site)
    return evalsums.to_counts(
        released, num_classes=config.num_classes, fairness_size=config.fairness_layout.size
    )


def _evaluate(msg: Message, context: Context, site: Site) -> RecordDict:
    """A plain evaluate message: the released sums, the fairness vector among them."""
    _, _, released = _released_sums(msg, context, site)
    return RecordDict(
        {
            keys.METRICS: MetricRecord(released),
            keys.SITE: ConfigRecord({keys.SITE_ID: site.site_id}),
        }
    )


train = app.train()(_guarded(_train_site))
evaluate = app.evaluate()(_guarded(_evaluate))
register_secagg(app, _secure_input, _evaluation_counts, _min_threshold)  # SecAgg+ stages
