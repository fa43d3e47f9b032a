"""Local training with sample-level DP-SGD (Opacus): the DP twin of ``client.train.train_local``.

Opacus' ``PrivacyEngine`` clips each sample's gradient, adds Gaussian noise and samples
batches by Poisson sampling. Its accountant starts from the study's ledger history, so the
epsilon it reports after training is cumulative over the whole study at this site, and the
history the round adds is written to the ledger before the round's model may leave the site.
Plain PyTorch and Opacus only: no Flower here.
"""

from __future__ import annotations

import copy
import logging
import secrets
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, Dataset

from client.train import TrainSettings, TrainSums, make_optimizer
from privacy import DPPlan, LedgerError, PrivacyLedger, PrivacyRefused, history_delta

__all__ = ["DPTrainSums", "train_local_dp"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DPTrainSums(TrainSums):
    """Training sums of one DP round, with the study's cumulative epsilon after it.

    ``num_examples`` is the public count ``N * local_epochs`` (what a plain round reports), not
    the Poisson-sampled count, which would say a little about who was sampled. ``loss_sum``
    is summed over the sampled examples and is NOT covered by the DP guarantee: keep it local
    or accept its disclosure explicitly.
    """

    epsilon: float
    delta: float


def _generators(seed: int | None, server_round: int) -> tuple[torch.Generator, torch.Generator]:
    """Independent generators for Poisson sampling and for noise.

    Whoever knows these seeds can tell who was sampled and subtract the noise, so by default
    they come from OS entropy; a fixed seed is for tests and debugging only (mixed with the
    round, so that rounds at least never repeat each other's noise).
    """
    if seed is None:
        return (
            torch.Generator().manual_seed(secrets.randbits(63)),
            torch.Generator().manual_seed(secrets.randbits(63)),
        )
    logger.warning("DP-SGD with a fixed seed: noise and sampling are reproducible, not private.")
    state = np.random.SeedSequence([seed, server_round]).generate_state(2, dtype=np.uint64)
    sampling, noise = (int(value) >> 1 for value in state)  # manual_seed takes up to 2**63 - 1
    return (
        torch.Generator().manual_seed(sampling),
        torch.Generator().manual_seed(noise),
    )


def _check_plan(plan: DPPlan, dataset_size: int, settings: TrainSettings) -> None:
    trained = (dataset_size, settings.batch_size, settings.local_epochs)
    planned = (plan.num_train_samples, plan.batch_size, plan.local_epochs)
    if trained != planned:
        raise PrivacyRefused(
            f"The DP plan was resolved for (samples, batch size, local epochs) = {planned}, but "
            f"training would use {trained}. Resolve the plan with this dataset and settings."
        )


def _add_proximal_term(
    optimizer: DPOptimizer, global_params: list[torch.Tensor], mu: float
) -> None:
    """Add FedProx's gradient ``mu * (w - w_global)`` after clipping and noise.

    The term does not depend on data, so it costs no privacy; added to the loss instead, it
    would be lost, because Opacus replaces ``p.grad`` with the noisy per-sample sum.
    """
    accountant_hook = optimizer.step_hook

    def hook(dp_optimizer: DPOptimizer) -> None:
        if accountant_hook is not None:
            accountant_hook(dp_optimizer)
        for param, start in zip(dp_optimizer.params, global_params, strict=True):
            if param.grad is not None:
                param.grad.add_(param.detach() - start, alpha=mu)

    optimizer.attach_step_hook(hook)


def train_local_dp(
    model: nn.Module,
    dataset: Dataset[tuple[torch.Tensor, int]],
    settings: TrainSettings,
    plan: DPPlan,
    ledger: PrivacyLedger,
    *,
    server_round: int,
    run_id: str,
    seed: int | None = None,
    grad_sample_mode: str = "hooks",
) -> DPTrainSums:
    """Train ``model`` in place for one round under DP-SGD and record the spend in ``ledger``.

    Parameters
    ----------
    model : nn.Module
        The model, updated in place; its parameter names stay the plain ones.
    dataset : Dataset
        The site's training samples; ``len(dataset)`` must equal ``plan.num_train_samples``.
    settings : TrainSettings
        Optimizer, learning rate, batch size (the expected Poisson batch), epochs, FedProx mu.
        ``settings.seed`` is the coordinator's and is not used: see ``seed``.
    plan : DPPlan
        From :func:`privacy.resolve_dp` for this dataset and these settings.
    ledger : PrivacyLedger
        The study's ledger at this site.
    server_round : int
        The federated round, recorded in the ledger.
    run_id : str
        The run, recorded in the ledger.
    seed : int | None
        None (default): sampling and noise from OS entropy. An int makes them reproducible,
        which voids the guarantee against anyone who knows it: tests only.
    grad_sample_mode : str
        Opacus' per-sample gradient method (``models.DP_GRAD_SAMPLE_MODES``): the same
        gradients, at different speeds.

    Returns
    -------
    DPTrainSums
        Sums of the round and the study's cumulative epsilon at ``plan.delta``.

    Raises
    ------
    BudgetExhausted
        Before training, if the round would exceed the study's target epsilon.
    LedgerError
        If the ledger cannot record the round. On any error the model is restored to its
        state before the round, so nothing trained can leave the site unrecorded.
    """
    _check_plan(plan, len(dataset), settings)  # type: ignore[arg-type]
    ledger.check_budget(plan)
    if settings.optimizer == "adam":
        logger.warning("Adam often fails to learn under DP-SGD here; SGD with momentum works.")
    snapshot = copy.deepcopy(model.state_dict())
    prior = ledger.history
    sampling, noise = _generators(seed, server_round)
    engine = PrivacyEngine(accountant=plan.accountant, secure_mode=False)
    engine.accountant.history = list(prior)
    loader = DataLoader(dataset, batch_size=settings.batch_size, generator=sampling)
    dp_model = None
    try:
        dp_model, optimizer, dp_loader = engine.make_private(
            module=model,
            optimizer=make_optimizer(model, settings),
            data_loader=loader,
            noise_multiplier=plan.noise_multiplier,
            max_grad_norm=plan.max_grad_norm,
            poisson_sampling=True,
            noise_generator=noise,
            grad_sample_mode=grad_sample_mode,
        )
        # Opacus' secure_mode needs torchcsprng, which has no build for the pinned torch; its
        # defence against the floating-point attack on Gaussian noise (each noise draw the
        # sum of four Gaussians, halved: Holohan & Braghin 2021, as Opacus implements it) is
        # the optimizer's flag, and it is turned on here. The generators are seeded from OS
        # entropy each round (see _generators).
        optimizer.secure_mode = True
        if settings.proximal_mu > 0:
            global_params = [p.detach().clone() for p in optimizer.params]
            _add_proximal_term(optimizer, global_params, settings.proximal_mu)
        loss_sum, steps = _run_epochs(dp_model, optimizer, dp_loader, settings.local_epochs)
        added = history_delta(prior, engine.accountant.history)
        if sum(entry[2] for entry in added) != steps:
            raise LedgerError(
                f"Opacus' accountant counted {sum(e[2] for e in added)} steps where training "
                f"took {steps}; nothing was recorded and the round is discarded. Report this bug."
            )
        epsilon = ledger.record_round(
            server_round=server_round,
            run_id=run_id,
            history=added,
            delta=plan.delta,
            accountant=plan.accountant,
        )
    except BaseException:
        model.load_state_dict(snapshot)
        raise
    finally:
        if dp_model is not None:
            dp_model.cleanup()  # removes Opacus' hooks and per-sample attributes from `model`
    return DPTrainSums(
        num_examples=plan.num_train_samples * plan.local_epochs,
        loss_sum=loss_sum,
        num_steps=steps,
        epsilon=epsilon,
        delta=plan.delta,
    )


def _run_epochs(
    model: nn.Module,
    optimizer: DPOptimizer,
    loader: DataLoader[tuple[torch.Tensor, int]],
    epochs: int,
) -> tuple[float, int]:
    """Run the DP-SGD steps; every sampled batch is a step, the empty ones too (noise only)."""
    criterion = nn.CrossEntropyLoss()
    model.train()
    loss_sum, steps = 0.0, 0
    with warnings.catch_warnings():
        # Opacus' per-sample hooks on a model whose input needs no gradient: harmless.
        warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
        for _ in range(epochs):
            for images, labels in loader:
                optimizer.zero_grad(set_to_none=True)
                if len(labels):
                    loss = criterion(model(images), labels)
                    loss.backward()
                    loss_sum += float(loss.detach()) * len(labels)
                else:  # an empty Poisson batch still takes its (noise-only) step
                    for param in optimizer.params:
                        param.grad_sample = param.new_zeros((0, *param.shape))
                optimizer.step()
                steps += 1
    return loss_sum, steps
