"""Secure aggregation with DP through the fedrad command: the coordinator sees only sums."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from helpers import fedrad_command, run_command
from safetensors.numpy import load_file

from client.dataset import load_site
from client.transforms import TransformConfig
from fedrad.synth import SynthConfig, write_consortium

pytestmark = pytest.mark.timeout(500)


@pytest.fixture(scope="module")
def three_sites(tmp_path_factory):
    out = tmp_path_factory.mktemp("three")
    write_consortium(
        out, SynthConfig(sites=3, seed=5, image_size=32, samples_per_site=24), overwrite=True
    )
    return out


def test_secure_aggregation_with_dp_trains_and_reveals_only_sums(three_sites, tmp_path):
    run_dir = tmp_path / "run"

    result = run_command(
        fedrad_command(
            "simulate",
            str(three_sites),
            "--out",
            str(run_dir),
            "--num-server-rounds",
            "2",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--min-sites",
            "3",
            "--secure-aggregation",
            "true",
            "--dp",
            "sample",
            "--study-id",
            "secure-study",
            "--optimizer",
            "sgd",
            "--learning-rate",
            "0.2",
        ),
        timeout=400,
    )
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = load_file(str(run_dir / "model.safetensors"))
    initial = load_file(str(run_dir / "initial-model.safetensors"))

    assert result.returncode == 0, result.stdout[-4000:]
    assert [r["status"] for r in rounds] == ["completed", "completed"]
    for record in rounds:
        secure = record["train"]["secure-aggregation"]
        assert secure["status"] == "completed" and secure["contributors"] == 3
        assert record["train"]["sites"] == {}  # no individual update or metric reached it
        assert secure["totals"]["num-examples"] > 0
    assert any(not np.allclose(final[k], initial[k]) for k in final)
    # evaluation sums went through SecAgg+ too: only their sum over the sites is known
    val_samples = sum(
        len(load_site(site, TransformConfig(image_size=32), num_classes=2).subset("val"))
        for site in sorted(three_sites.glob("site-*"))
    )
    evaluations = [r["evaluate"] for r in rounds]
    assert [e["model-round"] for e in evaluations] == [0, 1]  # the model each round started from
    # under DP they are noised at each site and the loss is withheld
    for evaluation in evaluations:
        assert evaluation["secure-aggregation"] is True and evaluation["sites"] == {}
        # 3 sites x 4 confusion cells, std about 6.5 each at these settings, clipped at 0
        assert 0 <= evaluation["aggregate"]["num-examples"] <= val_samples + 12 * 6 * 7
        assert math.isnan(evaluation["aggregate"]["loss"])
    summary = json.loads((run_dir / "summary.json").read_text())
    final_evaluation = summary["final-evaluation"]
    assert final_evaluation["status"] == "completed" and final_evaluation["model-round"] == 2
    assert final_evaluation["contributors"] == 3
    assert 0.0 <= summary["validation"]["auc"] <= 1.0
    # under SecAgg+ no site name reaches the coordinator: the run names the nodes that took part
    sites = json.loads((run_dir / "run.json").read_text())["sites"]
    assert len(sites) == 3 and all(re.fullmatch(r"node-\d+", s) for s in sites)
    ledger = three_sites / ".fedrad-ledger" / "secure-study" / "site-1.json"
    recorded = [r["history"] for r in json.loads(ledger.read_text())["rounds"]]
    # DP spent at the site: per round an evaluation release then DP-SGD; then the final release
    assert len(recorded) == 5
    assert [h[0][1:] == [1.0, 1] for h in recorded] == [True, False, True, False, True]


@pytest.mark.parametrize("strategy", ["fedmedian", "fedtrimmedavg", "krum"])
def test_aggregators_needing_individual_updates_are_refused(
    three_sites, tmp_path, strategy, capsys
):
    from fedrad.commands.cli import main

    code = main(
        [
            "simulate",
            str(three_sites),
            "--out",
            str(tmp_path / "r"),
            "--min-sites",
            "3",
            "--secure-aggregation",
            "true",
            "--strategy",
            strategy,
        ]
    )

    assert code == 2
    assert "individual update" in capsys.readouterr().err


def _client_dp_run(sites, run_dir, noise):
    return run_command(
        fedrad_command(
            "simulate",
            str(sites),
            "--out",
            str(run_dir),
            "--num-server-rounds",
            "2",
            "--image-size",
            "32",
            "--batch-size",
            "8",
            "--min-sites",
            "3",
            "--secure-aggregation",
            "true",
            "--dp",
            "client",
            "--noise-multiplier",
            noise,
            "--study-id",
            "client-study",
            "--max-grad-norm",
            "0.5",
        ),
        timeout=400,
    )


def test_client_level_dp_adds_noise_shares_under_secure_aggregation(three_sites, tmp_path):
    result = _client_dp_run(three_sites, tmp_path / "run", "1.5")
    rounds = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]

    assert result.returncode == 0, result.stdout[-4000:]
    eps = [r["train"]["secure-aggregation"]["client-level-epsilon"] for r in rounds]
    assert 0 < eps[0] < eps[1]  # accounted over rounds
    # sites weigh equally under client-level DP: the secure total weight is the site count
    assert rounds[0]["train"]["secure-aggregation"]["totals"]["num-examples"] == pytest.approx(3)


def test_client_level_dp_above_the_site_ceiling_is_refused(three_sites, tmp_path):
    result = _client_dp_run(three_sites, tmp_path / "run", "0.2")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())

    assert result.returncode == 1
    assert summary["status"] == "stopped"
    assert "error 103" in summary["reason"]  # the budget code; the detail is in the site log
