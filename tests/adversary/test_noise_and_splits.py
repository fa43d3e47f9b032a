"""A coordinator that tries to shrink a site's noise, read its loss or counts, or pick its split.

Real sites (a synthetic consortium, the real ClientApp handlers and training) against crafted
requests: noise-shares inflation, client-level DP asked on the plain path, a threshold below the
site's minimum, a request to evaluate on the training split, un-noised evaluation counts and
training losses under DP, and subtraction of suppressed subgroup cells. Each attack is first
shown to work against a deliberately weakened site (one that trusts the coordinator's value,
as fedrad did before), so the tests cannot pass vacuously.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

import client.app as client_app
from client.disclosure import subgroup_counts
from client.site import resolve_site, site_dataset
from client.train import evaluate_local
from fedrad.core import keys
from fedrad.core.config import NodeConfig, RunConfig
from fedrad.core.errors import ERROR_PRIVACY_LIMIT, ERROR_SENTENCES
from fedrad.core.fairness import VARIANCE_SCALE
from privacy import (
    ClientDPPlan,
    PrivacyLedger,
    PrivacyRefused,
    SiteLimits,
    eval_noise_multiplier,
    privatize_update,
)
from privacy.distributed import GridSensitivity
from privacy.secagg import RoundSetup
from privacy.secagg.wire import LOSS_ARRAY
from server.initial_model import initial_arrays, model_spec
from server.strategies import numpy_to_arrays

pytestmark = pytest.mark.timeout(300)

STUDY = "adversary-2026"
INFLATED = 10**9  # the noise-shares value of the review's attack


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> Path:
    from fedrad.synth import SynthConfig, write_consortium

    root = tmp_path_factory.mktemp("adversary-sites")
    write_consortium(
        root,
        SynthConfig(sites=3, seed=5, kind="2d", image_size=32, samples_per_site=24),
        overwrite=True,
    )
    return root


@pytest.fixture
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


def run_config(**changes: object) -> RunConfig:
    base: dict[str, object] = {
        "image_size": 32,
        "batch_size": 8,
        "study_id": STUDY,
        "secure_aggregation": True,
        "min_sites": 3,
    }
    return RunConfig(**{**base, **changes})  # type: ignore[arg-type]


def request(config: RunConfig, message_type: str = "train", **extra: object) -> Message:
    spec = model_spec(config)
    values = {
        k: v
        for k, v in config.to_user_config().items()
        if k not in ("sites-dir", "out-dir", "resume-from")
    }
    values.update({keys.MODEL_SPEC: json.dumps(spec.to_dict()), keys.SERVER_ROUND: 1, **extra})
    content = RecordDict(
        {
            keys.ARRAYS: numpy_to_arrays(initial_arrays(spec, 0).items()),
            keys.CONFIG: ConfigRecord(values),  # type: ignore[arg-type]
        }
    )
    return Message(content, dst_node_id=1, message_type=message_type)


def context(sites: Path, tmp_path: Path, **node: object) -> Context:
    return Context(
        run_id=7,
        node_id=1,
        state=RecordDict(),
        run_config={"sites-dir": str(sites)},
        node_config={
            "partition-id": 0,
            "num-partitions": 3,
            "ledger-dir": str(tmp_path / "ledger"),
            **node,
        },
    )


def setup_for(msg: Message, *, threshold: int, participants: int = 5) -> RoundSetup:
    arrays = {k: a.numpy() for k, a in msg.content[keys.ARRAYS].items()}
    return RoundSetup.create(
        round_id="round-1-adversary",
        participants=list(range(1, participants + 1)),
        threshold=threshold,
        array_shapes={**{k: v.shape for k, v in arrays.items()}, LOSS_ARRAY: (1,)},
        clipping_range=0.5,
        signed_values=True,
    )


def client_ledger(tmp_path: Path) -> PrivacyLedger:
    return PrivacyLedger.open(tmp_path / "ledger", study_id=STUDY, site_id="site-1", level="client")


# ------------------------------------------------------------------ noise-shares inflation


def test_weakened_site_trusting_noise_shares_sends_its_update_almost_noiseless(tmp_path):
    # Prepare: a site that sizes its share by the coordinator's noise-shares, as fedrad did
    plan = ClientDPPlan.from_run_config(run_config(dp="client"))
    start = {"w": np.zeros(1000)}
    trained = {"w": np.full(1000, 0.01)}
    ledger = client_ledger(tmp_path)

    # Execute
    weak = privatize_update(
        start,
        trained,
        plan=plan,
        threshold=INFLATED,
        min_threshold=2,
        clipping_range=0.5,
        quantisation_bits=16,
        limits=SiteLimits(max_epsilon=10.0, max_delta=1e-3),
        ledger=ledger,
        server_round=1,
        run_id="weak",
    )

    # Assert: the attack works: the noise is far below one quantisation step of the update
    grid = GridSensitivity.of(clip_norm=plan.clip_norm, clipping_range=0.5, bits=16, dim=1000)
    assert weak.share_std < 0.01 * grid.l2 / math.sqrt(2)
    signal = 0.01 * 65535 / (2 * 0.5)  # one update value on the grid: 655 steps
    assert np.abs(weak.noise).max() < 0.1 * signal  # the update leaves the site in the clear


def test_real_site_sizes_its_share_by_the_verified_threshold_not_noise_shares(
    sites, tmp_path, task_identity
):
    # Prepare: the coordinator asks for noise-shares 1e9 in a verified round of threshold 3
    config = run_config(dp="client")
    msg = request(config, **{"noise-shares": INFLATED})
    setup = setup_for(msg, threshold=3)

    # Execute
    secure = client_app._secure_input(msg, context(sites, tmp_path), setup)

    # Assert: the share carries z * l2 / sqrt(3) on the grid, as the site decides
    plan = ClientDPPlan.from_run_config(config)
    dim = setup.value_length
    grid = GridSensitivity.of(clip_norm=plan.clip_norm, clipping_range=0.5, bits=16, dim=dim)
    expected = plan.noise_multiplier * grid.l2 / math.sqrt(3)
    assert secure.weight == 1 and secure.noise is not None and secure.noise.size == dim
    assert float(np.std(secure.noise)) == pytest.approx(expected, rel=0.05)
    assert secure.update[LOSS_ARRAY].tolist() == [0.0]  # the training loss is withheld
    assert len(client_ledger(tmp_path).rounds) == 1


def test_real_site_refuses_a_threshold_below_its_own_minimum(sites, tmp_path, task_identity):
    msg = request(run_config(dp="client"))

    with pytest.raises(PrivacyRefused, match="secagg-min-threshold 4"):
        client_app._secure_input(
            msg,
            context(sites, tmp_path, **{"secagg-min-threshold": 4}),
            setup_for(msg, threshold=3),
        )
    assert client_ledger(tmp_path).rounds == ()  # nothing charged, nothing sent


# ------------------------------------------------------------------ client-level DP in the clear


def test_real_site_refuses_client_dp_on_the_plain_path(sites, tmp_path, task_identity):
    # Execute: the review's attack: a plain train message, dp client, noise-shares 1e9
    msg = request(run_config(dp="client"), **{"noise-shares": INFLATED})
    reply = client_app.train(msg, context(sites, tmp_path))

    # Assert: refused with the fixed sentence, no weights, nothing charged
    assert reply.has_error()
    assert reply.error.code == ERROR_PRIVACY_LIMIT
    assert reply.error.reason == ERROR_SENTENCES[ERROR_PRIVACY_LIMIT]
    assert client_ledger(tmp_path).rounds == ()


# ------------------------------------------------------------------ the split and the sums


def _site_splits(sites: Path, tmp_path: Path, config: RunConfig):
    node = NodeConfig.from_user_config(context(sites, tmp_path).node_config)
    site = resolve_site(node, sites_dir=str(sites))
    data = site_dataset(site, config)
    return data.subset("train"), data.subset("val")


def test_real_site_evaluates_its_validation_split_whatever_the_request_names(
    sites, tmp_path, task_identity
):
    config = run_config(secure_aggregation=False, min_sites=1)
    train_split, val_split = _site_splits(sites, tmp_path, config)
    model = model_spec(config).build()
    model.load_state_dict(
        request(config).content[keys.ARRAYS].to_torch_state_dict()  # the message's model
    )
    weak = evaluate_local(model, train_split)  # a site that honours the request's split
    assert weak.num_examples == len(train_split) != len(val_split)  # the attack would work

    reply = client_app.evaluate(
        request(config, "evaluate", **{keys.SPLIT: "train"}), context(sites, tmp_path)
    )

    assert not reply.has_error(), reply.error
    assert reply.content[keys.METRICS][keys.NUM_EXAMPLES] == len(val_split)


def test_under_dp_evaluation_counts_are_noised_charged_and_the_loss_withheld(
    sites, tmp_path, task_identity
):
    # Prepare: what the weakened site (no DP on evaluation) sends: the exact counts
    config = run_config(dp="sample", secure_aggregation=False, min_sites=1)
    exact = client_app.evaluate(
        request(run_config(secure_aggregation=False, min_sites=1), "evaluate"),
        context(sites, tmp_path / "exact"),
    ).content[keys.METRICS]

    # Execute
    reply = client_app.evaluate(request(config, "evaluate"), context(sites, tmp_path))

    # Assert
    assert not reply.has_error(), reply.error
    released = reply.content[keys.METRICS]
    assert exact[keys.LOSS_SUM] > 0 and released[keys.LOSS_SUM] == 0.0
    assert released[keys.SCORE_HIST] != exact[keys.SCORE_HIST]
    ledger = PrivacyLedger.open(tmp_path / "ledger", study_id=STUDY, site_id="site-1")
    ((entry,),) = [r.history for r in ledger.rounds]  # one release, charged before it left
    z = eval_noise_multiplier(
        budget_epsilon=8.0, delta=ledger.delta, releases=config.num_server_rounds + 1, fraction=0.1
    )
    assert entry == (pytest.approx(z), 1.0, 1)
    exact_hist = np.array(exact[keys.SCORE_HIST])
    noise = (np.array(released[keys.SCORE_HIST]) - exact_hist)[exact_hist > 4 * z * 3**0.5]
    assert noise.size == 0 or float(np.std(noise)) < 2 * z * 3**0.5
    # the fairness vector travels in the same release: noised, its noise variance in front
    layout = config.fairness_layout
    std = z * (3 + layout.record_l2_squared) ** 0.5
    assert exact[keys.FAIRNESS][0] == 0
    assert released[keys.FAIRNESS][0] == round(std**2 * VARIANCE_SCALE)
    assert released[keys.FAIRNESS] != exact[keys.FAIRNESS]
    assert len(released[keys.FAIRNESS]) == layout.size


def test_under_dp_sample_the_training_loss_is_withheld(sites, tmp_path, task_identity):
    plain = client_app.train(
        request(run_config(secure_aggregation=False, min_sites=1)), context(sites, tmp_path / "p")
    )
    assert keys.LOSS_SUM in plain.content[keys.METRICS]  # what a site without DP sends

    config = run_config(dp="sample", secure_aggregation=False, min_sites=1, local_epochs=1)
    reply = client_app.train(request(config), context(sites, tmp_path))

    assert not reply.has_error(), reply.error
    metrics = reply.content[keys.METRICS]
    assert keys.LOSS_SUM not in metrics and metrics[keys.EPSILON] > 0


# ------------------------------------------------------------------ complementary cells


def test_suppressed_subgroup_cells_cannot_be_recovered_by_subtraction():
    # Prepare: 12 M, 12 F and 1 of unknown sex; the example count travels beside the cells
    people = [{"sex": "M"}] * 12 + [{"sex": "F"}] * 12 + [{"sex": "O"}]
    total = len(people)

    def naive(rows, k):  # the weakened site: primary suppression only
        counts = Counter(r["sex"] for r in rows)
        return {f"sex={v}": n for v, n in counts.items() if n >= k}

    weak = naive(people, 10)
    assert total - sum(weak.values()) == 1  # the attack recovers the suppressed cell

    published = {k: v for k, v in subgroup_counts(people, min_cell_count=10).items()}
    sex_cells = {k: v for k, v in published.items() if k.startswith("sex=")}
    hidden = total - sum(sex_cells.values())
    assert len(sex_cells) <= 1 and hidden >= 10  # at least two cells, at least k, left out
