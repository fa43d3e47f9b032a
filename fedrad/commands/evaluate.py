"""``fedrad evaluate``: score a run's global model on any site-format folder.

Binary tasks are scored at the operating threshold chosen on the federation's pooled
validation data and stored in the run directory; multi-class tasks by macro one-vs-rest AUC and
arg-max accuracy. Runs where the data are: nothing leaves this machine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from client.dataset import load_site
from client.site import transform_config
from client.train import load_state, predict
from fedrad.core.config import RunConfig
from models import ModelSpec
from server.metrics import exact_auc
from server.rundir import RUN_FILE, RunDir, read_json


def binary_scores(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC, and accuracy, sensitivity, specificity at ``threshold`` (labels: 1 is positive)."""
    predicted = scores >= threshold
    positive, negative = labels == 1, labels == 0
    return {
        "auc": exact_auc(scores, labels),
        "accuracy": float((predicted == positive).mean()),
        "sensitivity": float(predicted[positive].mean()) if positive.any() else float("nan"),
        "specificity": float((~predicted[negative]).mean()) if negative.any() else float("nan"),
        "threshold": threshold,
    }


def evaluate_run(run_dir: Path, data_dir: Path) -> dict[str, float | int]:
    """Score the run's latest global model on ``data_dir`` (every labelled sample)."""
    run = RunDir(run_dir)
    config = RunConfig.from_user_config(read_json(run_dir / RUN_FILE)["config"], strict=False)
    meta, arrays = run.load_final_model()
    model = ModelSpec.from_dict(meta["model"]).build()
    load_state(model, arrays)
    dataset = load_site(data_dir, transform_config(config), num_classes=config.num_classes)
    scores, labels = predict(model, dataset)
    result: dict[str, float | int] = {"num-examples": len(labels), "round": int(meta["round"])}
    if config.num_classes == 2:
        threshold = float(run.read_summary().get("operating-threshold", 0.5))
        positive = (labels == config.positive_label).astype(np.int64)
        result.update(binary_scores(scores[:, config.positive_label], positive, threshold))
    else:
        aucs = [
            exact_auc(scores[:, c], (labels == c).astype(np.int64)) for c in range(scores.shape[1])
        ]
        result.update(
            auc=float(np.nanmean(aucs)),
            accuracy=float((scores.argmax(axis=1) == labels).mean()),
        )
    return result
