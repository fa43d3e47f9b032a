"""Run directories for report tests, built from real site vectors instead of a simulation.

Each site's predictions are drawn with a planted subgroup difference (positives of sex=F get
fainter scores), turned into a suppressed fairness vector by ``client.fairness``, summed and
stored by ``server.fairness`` exactly as the round loop does, beside a minimal run.json,
metrics.jsonl and summary.json.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from client.fairness import site_vector, suppress
from fedrad.core.config import RunConfig
from server.fairness import round_counts, save_counts
from server.rundir import RunDir

SITES = {"site-1": 80, "site-2": 60, "site-3": 40}
THRESHOLD = 0.5


def site_predictions(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, list[dict[str, str]]]:
    """Scores, labels and attributes of ``n`` patients; findings of women are fainter."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    sexes = rng.choice(["M", "F"], n)
    bands = rng.choice(["40-49", "60-69"], n, p=[0.9, 0.1])
    strength = np.where(sexes == "F", 0.1, 0.35)
    positive = np.clip(rng.normal(0.35 + strength * labels, 0.15), 0.0, 0.999)
    scores = np.stack([1 - positive, positive], axis=1)
    attributes = [{"sex": s, "age-band": b} for s, b in zip(sexes, bands, strict=True)]
    return scores, labels, attributes


def multiclass_predictions(
    n: int, seed: int, classes: int
) -> tuple[np.ndarray, np.ndarray, list[dict[str, str]]]:
    """Softmax scores of ``classes`` classes, labels and attributes of ``n`` patients."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes)) + 2.0 * np.eye(classes)[labels]
    scores = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    sexes = rng.choice(["M", "F"], n)
    return scores, labels, [{"sex": s, "age-band": "40-49"} for s in sexes]


def run_config(
    *, dp: str = "off", secure: bool = False, rounds: int = 2, classes: int = 2
) -> RunConfig:
    """The run config of a test run (two attributes reported)."""
    return RunConfig(
        num_classes=classes,
        dp=dp,
        study_id="study" if dp != "off" else "",
        secure_aggregation=secure,
        min_sites=3 if secure else 2,
        num_server_rounds=rounds,
        fairness_attributes="sex,age-band",
    )


def _round_record(
    server_round: int, sites: Mapping[str, int], *, dp: str, secure: bool
) -> dict[str, object]:
    train_sites = {
        site: {"num-examples": n, "num-steps": 3}
        | ({"epsilon": 0.5 * server_round, "delta": 1e-5} if dp == "sample" else {})
        for site, n in sites.items()
    }
    auc = 0.6 + 0.05 * server_round
    aggregate = {"auc": auc, "loss": 0.7 - 0.05 * server_round, "threshold": THRESHOLD}
    evaluate: dict[str, object] = {"aggregate": aggregate, "failures": {}}
    train: dict[str, object] = {"sites": {} if secure else train_sites, "failures": {}}
    if secure:
        evaluate |= {"model-round": server_round - 1, "sites": {}, "secure-aggregation": True}
        train["secure-aggregation"] = {"status": "ok", "contributors": len(sites)} | (
            {"client-level-epsilon": 0.8 * server_round, "client-level-delta": 1e-5}
            if dp == "client"
            else {}
        )
    else:
        evaluate["sites"] = {
            site: {
                "auc": auc + 0.01 * i,
                "loss": 0.7 - 0.01 * i,
                "sensitivity": 0.6,
                "specificity": 0.7,
                "accuracy": 0.65,
                "num-examples": float(n),
            }
            for i, (site, n) in enumerate(sites.items())
        }
    return {
        "round": server_round,
        "status": "completed",
        "train": train,
        "evaluate": evaluate,
        "model-sha256": f"{server_round:064x}",
    }


def write_run(
    run_dir: Path,
    *,
    sites: Mapping[str, int] = SITES,
    dp: str = "off",
    secure: bool = False,
    rounds: int = 2,
    min_cell_count: int = 10,
    counts: bool = True,
    classes: int = 2,
) -> Path:
    """A completed run directory with ``rounds`` evaluations' fairness counts."""
    config = run_config(dp=dp, secure=secure, rounds=rounds, classes=classes)
    layout = config.fairness_layout
    store = RunDir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    store.write_run_record(config, sites=list(sites), resumed_from=0)
    for server_round in range(1, rounds + 1):
        store.append_metrics(_round_record(server_round, sites, dp=dp, secure=secure))
        if not counts:
            continue
        per_site = {}
        for i, (site, n) in enumerate(sites.items()):
            seed = 100 * server_round + i
            scores, labels, attributes = (
                site_predictions(n, seed)
                if classes == 2
                else multiclass_predictions(n, seed, classes)
            )
            vector = site_vector(layout, scores, labels, attributes)
            per_site[site] = suppress(vector, layout, min_cell_count=min_cell_count)
        total = sum(per_site.values())
        save_counts(
            run_dir,
            round_counts(
                config,
                model_round=server_round,
                threshold=THRESHOLD,
                total=[int(v) for v in total],
                per_site=None
                if secure
                else {s: [int(v) for v in v_] for s, v_ in per_site.items()},
            ),
        )
    store.write_summary(
        {
            "status": "completed",
            "reason": "",
            "rounds-completed": rounds,
            "num-server-rounds": rounds,
            "operating-threshold": THRESHOLD,
            "validation": {"auc": 0.7},
        }
    )
    return run_dir
