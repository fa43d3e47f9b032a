"""DP-SGD local training through the ledger, and the client-level DP building blocks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.dp_train import DPTrainSums, train_local_dp
from client.train import TrainSettings
from models import build_model
from privacy import (
    BudgetExhausted,
    DPPlan,
    DPRequest,
    LedgerError,
    PrivacyLedger,
    PrivacyRefused,
    SiteLimits,
    client_level_epsilon,
    clip_update,
    compute_epsilon,
    resolve_dp,
)

pytestmark = pytest.mark.timeout(120)

NUM_SAMPLES, BATCH = 32, 8


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("cnn", spatial_dims=2, in_channels=1, num_classes=2, image_size=(16, 16))


def tiny_dataset() -> TensorDataset:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(NUM_SAMPLES, 1, 16, 16, generator=generator)
    labels = torch.randint(0, 2, (NUM_SAMPLES,), generator=generator)
    return TensorDataset(images, labels)


def train_settings(*, proximal_mu: float = 0.0, batch_size: int = BATCH) -> TrainSettings:
    return TrainSettings(
        local_epochs=1,
        learning_rate=0.1,
        batch_size=batch_size,
        optimizer="sgd",
        momentum=0.0,
        weight_decay=0.0,
        proximal_mu=proximal_mu,
    )


def tiny_plan(*, target: float = 50.0, accountant: str = "rdp", batch: int = BATCH) -> DPPlan:
    request = DPRequest(
        study_id="study-a",
        target_epsilon=target,
        max_grad_norm=1.0,
        local_epochs=1,
        noise_multiplier=1.0,
        delta=1e-3,
        accountant=accountant,
    )
    limits = SiteLimits(max_epsilon=100.0, max_delta=1e-2)
    return resolve_dp(request, limits, num_train_samples=NUM_SAMPLES, batch_size=batch)


def open_ledger(root: Path) -> PrivacyLedger:
    return PrivacyLedger.open(root, study_id="study-a", site_id="site-1")


def train_round(
    root: Path,
    model: nn.Module,
    server_round: int,
    *,
    plan: DPPlan | None = None,
    settings: TrainSettings | None = None,
    seed: int | None = 7,
) -> DPTrainSums:
    return train_local_dp(
        model,
        tiny_dataset(),
        settings or train_settings(),
        plan or tiny_plan(),
        open_ledger(root),
        server_round=server_round,
        run_id="run-1",
        seed=seed,
    )


def parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- DP-SGD rounds


def test_one_dp_round_trains_the_plain_model_in_place(tmp_path: Path) -> None:
    # Prepare
    model = tiny_model()
    before = parameters(model)

    # Execute
    sums = train_round(tmp_path, model, 1)

    # Assert
    after = parameters(model)
    assert sums.epsilon > 0 and sums.delta == 1e-3
    assert sums.num_steps == 4 and sums.num_examples == NUM_SAMPLES
    assert list(after) == list(before)  # plain names, no "_module." prefix
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_two_rounds_report_cumulative_not_per_round_epsilon(tmp_path: Path) -> None:
    # Prepare
    model = tiny_model()

    # Execute
    first = train_round(tmp_path, model, 1)
    second = train_round(tmp_path, model, 2)

    # Assert
    ledger = open_ledger(tmp_path)
    combined = RDPAccountant()
    combined.history = [e for r in ledger.rounds for e in r.history]
    per_round = compute_epsilon(ledger.rounds[1].history, delta=1e-3, accountant="rdp")
    assert second.epsilon > first.epsilon
    assert second.epsilon == pytest.approx(combined.get_epsilon(delta=1e-3), abs=1e-9)
    assert per_round == pytest.approx(first.epsilon, abs=1e-12)  # what a fresh engine would say
    assert ledger.history == ((1.0, 0.25, 8),)


def test_exhausted_budget_stops_before_training(tmp_path: Path) -> None:
    # Prepare: one round fits in the target, a second does not
    plan = tiny_plan(target=3.5)
    model = tiny_model()
    first = train_round(tmp_path, model, 1, plan=plan)
    before = parameters(model)

    # Execute
    with pytest.raises(BudgetExhausted, match=f"spent epsilon {first.epsilon:.4f} of target 3.5"):
        train_round(tmp_path, model, 2, plan=plan)

    # Assert
    assert all(torch.equal(before[k], v) for k, v in parameters(model).items())
    assert len(open_ledger(tmp_path).rounds) == 1


def test_corrupt_ledger_refuses_training(tmp_path: Path) -> None:
    # Prepare
    train_round(tmp_path, tiny_model(), 1)
    path = open_ledger(tmp_path).path
    path.write_bytes(path.read_bytes()[:-40])

    # Execute / Assert: the ledger cannot be opened, so no round can start
    with pytest.raises(LedgerError, match="not valid JSON"):
        train_round(tmp_path, tiny_model(), 2)


def test_unrecorded_round_restores_the_model(tmp_path: Path) -> None:
    # Prepare: another process records a round after this ledger was opened
    model = tiny_model()
    before = parameters(model)
    stale = open_ledger(tmp_path)
    train_round(tmp_path, tiny_model(), 1)

    # Execute
    with pytest.raises(LedgerError, match="changed on disk"):
        train_local_dp(
            model,
            tiny_dataset(),
            train_settings(),
            tiny_plan(),
            stale,
            server_round=2,
            run_id="run-1",
            seed=7,
        )

    # Assert
    assert all(torch.equal(before[k], v) for k, v in parameters(model).items())
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_plan_for_other_settings_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PrivacyRefused, match="Resolve the plan"):
        train_round(tmp_path, tiny_model(), 1, settings=train_settings(batch_size=4))


def test_fixed_seed_reproduces_and_os_entropy_does_not(tmp_path: Path) -> None:
    # Prepare
    models = [tiny_model() for _ in range(4)]

    # Execute
    for index, (model, seed) in enumerate(zip(models, [7, 7, None, None], strict=True)):
        train_round(tmp_path / str(index), model, 1, seed=seed)

    # Assert
    same, fresh = parameters(models[0]), parameters(models[1])
    entropy_a, entropy_b = parameters(models[2]), parameters(models[3])
    assert all(torch.equal(same[k], fresh[k]) for k in same)
    assert any(not torch.equal(entropy_a[k], entropy_b[k]) for k in entropy_a)


def test_fedprox_term_survives_opacus_and_pulls_towards_the_global_model(tmp_path: Path) -> None:
    # Prepare: same sampling and noise, with and without a strong proximal term
    plain, proximal = tiny_model(), tiny_model()
    start = parameters(plain)

    # Execute
    train_round(tmp_path / "plain", plain, 1, settings=train_settings(proximal_mu=0.0))
    train_round(tmp_path / "prox", proximal, 1, settings=train_settings(proximal_mu=5.0))

    # Assert
    def drift(model: nn.Module) -> float:
        return sum(float((p - start[k]).norm() ** 2) for k, p in parameters(model).items())

    assert drift(proximal) < drift(plain)


@pytest.mark.parametrize(("samples", "batch"), [(32, 8), (100, 32), (930, 10), (5, 64)])
def test_plan_matches_what_opacus_samples_and_accounts(samples: int, batch: int) -> None:
    # Prepare
    request = DPRequest(
        study_id="study-a",
        target_epsilon=8.0,
        max_grad_norm=1.0,
        local_epochs=2,
        noise_multiplier=1.0,
        delta=1e-3,
    )
    loader = DataLoader(TensorDataset(torch.zeros(samples, 1)), batch_size=batch)

    # Execute
    plan = resolve_dp(
        request,
        SiteLimits(max_epsilon=8.0, max_delta=1e-2),
        num_train_samples=samples,
        batch_size=batch,
    )
    dp_loader = DPDataLoader.from_data_loader(loader)

    # Assert: 930 / 10 gives 93 batches but Opacus' sampler takes int(1 / (1 / 93)) = 92
    assert plan.sample_rate == dp_loader.sample_rate
    assert plan.steps_per_epoch == len(dp_loader)
    assert plan.steps_per_round == 2 * len(dp_loader)


# ---------------------------------------------------------------- client-level DP


@settings(max_examples=50, deadline=None)
@given(
    arrays=st.lists(
        hnp.arrays(np.float32, st.integers(1, 20), elements=st.floats(-1e3, 1e3, width=32)),
        min_size=1,
        max_size=4,
    ),
    clip_norm=st.floats(1e-3, 1e3),
)
def test_clip_update_bounds_the_norm(arrays: list[np.ndarray], clip_norm: float) -> None:
    # Prepare
    update = {f"layer{i}": a for i, a in enumerate(arrays)}
    true_norm = math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays))

    # Execute
    clipped, norm = clip_update(update, clip_norm=clip_norm)

    # Assert
    clipped_norm = math.sqrt(sum(float(np.sum(a**2)) for a in clipped.values()))
    assert norm == pytest.approx(true_norm)
    assert clipped_norm <= clip_norm * (1 + 1e-9)
    if true_norm <= clip_norm:
        assert all(np.array_equal(clipped[k], update[k].astype(np.float64)) for k in update)


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"step": np.array([1, 2])}, "integer buffers"),
        ({"w": np.array([1.0, np.nan])}, "NaN"),
    ],
)
def test_clip_update_rejects_what_it_cannot_clip(update: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        clip_update(update, clip_norm=1.0)


def test_client_level_epsilon_is_rdp_of_the_subsampled_gaussian() -> None:
    # Prepare
    accountant = RDPAccountant()
    accountant.history = [(1.0, 0.1, 50)]

    # Execute
    epsilon = client_level_epsilon(
        noise_multiplier=1.0, site_sample_rate=0.1, rounds=50, delta=1e-5
    )
    without_sampling = client_level_epsilon(
        noise_multiplier=1.0, site_sample_rate=1.0, rounds=50, delta=1e-5
    )

    # Assert
    assert epsilon == pytest.approx(accountant.get_epsilon(delta=1e-5), abs=1e-12)
    assert without_sampling > epsilon


@pytest.mark.parametrize(
    "kwargs",
    [
        {"noise_multiplier": 0.0, "site_sample_rate": 0.5, "rounds": 10, "delta": 1e-5},
        {"noise_multiplier": 1.0, "site_sample_rate": 1.5, "rounds": 10, "delta": 1e-5},
        {"noise_multiplier": 1.0, "site_sample_rate": 0.5, "rounds": 0, "delta": 1e-5},
        {"noise_multiplier": 1.0, "site_sample_rate": 0.5, "rounds": 10, "delta": 0.0},
    ],
)
def test_client_level_epsilon_rejects_invalid_parameters(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        client_level_epsilon(**kwargs)


# ---------------------------------------------------------------- per-sample gradient modes


@pytest.mark.parametrize(
    ("name", "dims", "size"),
    [("cnn", 2, (16, 16)), ("cnn", 3, (4, 8, 8)), ("cnn-lstm", 3, (3, 8, 8))],
)
def test_every_grad_sample_mode_gives_the_hooks_per_sample_gradients(name, dims, size) -> None:
    from opacus import GradSampleModule

    from models import DP_GRAD_SAMPLE_MODES

    # Prepare: the same model twice, one per method
    torch.manual_seed(0)
    model = build_model(name, spatial_dims=dims, in_channels=1, num_classes=2, image_size=size)
    images, labels = torch.rand(5, 1, *size), torch.tensor([0, 1, 1, 0, 1])
    grads = {}

    # Execute
    for mode in ("hooks", DP_GRAD_SAMPLE_MODES[name]):
        copy = build_model(name, spatial_dims=dims, in_channels=1, num_classes=2, image_size=size)
        copy.load_state_dict(model.state_dict())
        sampled = GradSampleModule(copy, force_functorch=mode == "functorch")
        nn.functional.cross_entropy(sampled(images), labels).backward()
        grads[mode] = {n: p.grad_sample.clone() for n, p in sampled.named_parameters()}

    # Assert
    hooks, chosen = grads["hooks"], grads[DP_GRAD_SAMPLE_MODES[name]]
    assert hooks.keys() == chosen.keys()
    for key in hooks:
        assert hooks[key].shape[0] == 5
        torch.testing.assert_close(chosen[key], hooks[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
def test_empty_poisson_batches_take_noise_only_steps_in_every_mode(tmp_path, mode) -> None:
    # Prepare: an expected batch of 1 of 32 samples: each batch is empty with probability
    # (31/32)^32 = 0.36, so all 32 non-empty has probability below 1e-6
    model = tiny_model()
    settings = train_settings(batch_size=1)
    plan = tiny_plan(batch=1)
    before = parameters(model)

    # Execute
    sums = train_local_dp(
        model,
        tiny_dataset(),
        settings,
        plan,
        open_ledger(tmp_path),
        server_round=1,
        run_id="run-1",
        seed=3,
        grad_sample_mode=mode,
    )

    # Assert: one step per sampled batch, empty ones included, all accounted; weights moved
    assert sums.num_steps == NUM_SAMPLES
    history = open_ledger(tmp_path).history
    assert sum(entry[2] for entry in history) == NUM_SAMPLES
    after = parameters(model)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)
