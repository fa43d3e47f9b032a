"""Local training and evaluation at a site: plain PyTorch, no Flower.

Evaluation returns sums only (example count, loss sum, confusion counts, score histograms), so
that the coordinator can add them up across sites, and later do so under secure aggregation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedrad.core.keys import SCORE_BINS
from fedrad.core.scores import score_bins


@dataclass(frozen=True)
class TrainSettings:
    """How one site trains locally for one round."""

    local_epochs: int
    learning_rate: float
    batch_size: int
    optimizer: str
    momentum: float
    weight_decay: float
    proximal_mu: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class TrainSums:
    """Additive training statistics of one site and round."""

    num_examples: int
    loss_sum: float
    num_steps: int


@dataclass(frozen=True)
class EvalSums:
    """Additive evaluation statistics; ``confusion[t][p]`` counts true t predicted p.

    ``score_hist[c][t][b]`` counts samples of true class t whose softmax score of class c
    falls in bin b of the SCORE_BINS bins of ``fedrad.core.scores`` (fine in the middle,
    logarithmic in the tails).
    """

    num_examples: int
    loss_sum: float
    confusion: np.ndarray
    score_hist: np.ndarray


def make_optimizer(model: nn.Module, settings: TrainSettings) -> torch.optim.Optimizer:
    """Build the configured optimizer over the trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if settings.optimizer == "adam":
        return torch.optim.Adam(
            params, lr=settings.learning_rate, weight_decay=settings.weight_decay
        )
    return torch.optim.SGD(
        params,
        lr=settings.learning_rate,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
    )


def train_local(
    model: nn.Module, dataset: Dataset[tuple[torch.Tensor, int]], settings: TrainSettings
) -> TrainSums:
    """Train ``model`` in place on ``dataset``; FedProx adds its proximal term when mu > 0."""
    generator = torch.Generator().manual_seed(settings.seed)
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True, generator=generator)
    optimizer = make_optimizer(model, settings)
    global_params = [p.detach().clone() for p in model.parameters()]
    criterion = nn.CrossEntropyLoss()
    model.train()
    loss_sum, examples, steps = 0.0, 0, 0
    for _ in range(settings.local_epochs):
        for images, labels in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(images), labels)
            if settings.proximal_mu > 0:
                prox = sum(
                    (p - g).pow(2).sum()
                    for p, g in zip(model.parameters(), global_params, strict=True)
                )
                loss = loss + settings.proximal_mu / 2 * prox
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(labels)
            examples += len(labels)
            steps += 1
    return TrainSums(num_examples=examples, loss_sum=loss_sum, num_steps=steps)


@torch.no_grad()
def predict(
    model: nn.Module, dataset: Dataset[tuple[torch.Tensor, int]], *, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Return softmax scores ``(N, C)`` and true labels ``(N,)`` for a dataset."""
    model.eval()
    scores, labels = [], []
    for images, targets in DataLoader(dataset, batch_size=batch_size):
        scores.append(torch.softmax(model(images), dim=1).numpy())
        labels.append(np.asarray(targets))
    return np.concatenate(scores), np.concatenate(labels).astype(np.int64)


def evaluation_sums(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Confusion counts ``(C, C)`` and score histograms ``(C, C, SCORE_BINS)`` of predictions."""
    num_classes = scores.shape[1]
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, scores.argmax(axis=1)), 1)
    bins = score_bins(scores)
    hist = np.zeros((num_classes, num_classes, SCORE_BINS), dtype=np.int64)
    for c in range(num_classes):
        np.add.at(hist[c], (labels, bins[:, c]), 1)
    return confusion, hist


def eval_sums(scores: np.ndarray, labels: np.ndarray) -> EvalSums:
    """Additive sums of softmax scores ``(N, C)`` against true labels ``(N,)``."""
    eps = 1e-12
    loss_sum = float(-np.log(scores[np.arange(len(labels)), labels] + eps).sum())
    confusion, hist = evaluation_sums(scores, labels)
    return EvalSums(len(labels), loss_sum, confusion, hist)


def evaluate_local(model: nn.Module, dataset: Dataset[tuple[torch.Tensor, int]]) -> EvalSums:
    """Evaluate ``model`` on ``dataset`` and return additive sums."""
    return eval_sums(*predict(model, dataset))


def load_state(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy named numpy arrays into the model's state dict, checking names and shapes."""
    state = model.state_dict()
    if set(arrays) != set(state):
        missing, extra = set(state) - set(arrays), set(arrays) - set(state)
        raise ValueError(
            f"model weights do not match the architecture: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(extra)[:3]}; check that server and site run the same model."
        )
    model.load_state_dict({k: torch.as_tensor(np.asarray(v)) for k, v in arrays.items()})
