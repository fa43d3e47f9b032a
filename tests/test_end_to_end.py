"""The whole path as a user runs it: fedrad simulate on synthetic DICOM sites, then evaluate."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from helpers import fedrad_command, run_command
from safetensors.numpy import load_file

from server.audit import verify
from server.digest import sha256_arrays

pytestmark = pytest.mark.timeout(400)

SMALL = ["--image-size", "32", "--batch-size", "16", "--min-sites", "2"]


@pytest.fixture(scope="module")
def finished_run(sites_2d, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run") / "run"
    result = run_command(
        fedrad_command(
            "simulate", str(sites_2d), "--out", str(run_dir), "--num-server-rounds", "2", *SMALL
        ),
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    return run_dir, result.stdout


def test_global_model_loads_and_differs_from_initial(finished_run):
    run_dir, _ = finished_run
    final = load_file(str(run_dir / "model.safetensors"))
    initial = load_file(str(run_dir / "initial-model.safetensors"))
    meta = json.loads((run_dir / "model.json").read_text())

    assert meta["round"] == 2 and meta["model"]["name"] == "cnn"
    assert set(final) == set(initial)
    assert any(not np.allclose(final[k], initial[k]) for k in final)


def test_metrics_cover_each_site_every_round(finished_run):
    run_dir, _ = finished_run
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert sorted(record["train"]["sites"]) == ["site-1", "site-2"]
        assert sorted(record["evaluate"]["sites"]) == ["site-1", "site-2"]
        assert record["train"]["failures"] == {}
        assert 0.0 <= record["evaluate"]["aggregate"]["auc"] <= 1.0
        site_examples = sum(s["num-examples"] for s in record["evaluate"]["sites"].values())
        assert record["evaluate"]["aggregate"]["num-examples"] == site_examples


def test_run_record_has_config_seed_versions_schema(finished_run):
    run_dir, _ = finished_run
    record = json.loads((run_dir / "run.json").read_text())

    assert record["schema-version"] == 1
    assert record["config"]["num-server-rounds"] == 2 and record["config"]["image-size"] == 32
    assert record["seed"] == 0
    assert {"flwr", "torch", "monai", "opacus", "pydicom"} <= set(record["versions"])
    assert len(record["code"]["sha256"]) == 64
    assert record["sites"] == ["site-1", "site-2"]


def test_every_round_checkpoint_is_complete(finished_run):
    run_dir, _ = finished_run
    for n in (1, 2):
        folder = run_dir / "rounds" / f"round-{n:04d}"
        meta = json.loads((folder / "model.json").read_text())
        assert meta["round"] == n
        assert (folder / "strategy.safetensors").is_file()


def test_run_leaves_a_verifiable_audit_trail(finished_run):
    run_dir, _ = finished_run
    result = verify(run_dir)
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert result.ok, result.describe()
    assert [e["event"] for e in result.entries] == ["run-start", "round", "round", "run-end"]
    assert [e["data"]["model-sha256"] for e in result.entries[1:3]] == [
        r["model-sha256"] for r in rounds
    ]
    assert json.loads((run_dir / "summary.json").read_text())["audit"]["head"] == result.head
    assert (run_dir.parent / "audit.key").is_file()  # the key lies outside the run directory


def test_run_writes_a_fairness_report_from_every_evaluation(finished_run):
    run_dir, _ = finished_run
    stored = sorted(p.name for p in (run_dir / "fairness").iterdir())
    report = json.loads((run_dir / "fairness.json").read_text())
    page = (run_dir / "report.html").read_text()

    assert stored == ["round-001.json", "round-002.json"]
    assert report["final"]["round"] == 2
    assert [f["name"] for f in report["final"]["families"]] == [
        "sex",
        "age-band",
        "manufacturer",
        "modality",
    ]
    assert "<svg" in page
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", page)  # nothing fetched


def test_evaluate_prints_and_writes_json(finished_run, sites_2d, tmp_path):
    run_dir, _ = finished_run
    out = tmp_path / "scores.json"

    result = run_command(
        fedrad_command("evaluate", str(run_dir), str(sites_2d / "holdout"), "--json", str(out)),
        timeout=120,
    )
    scores = json.loads(out.read_text())

    assert result.returncode == 0, result.stdout
    assert {"auc", "accuracy", "sensitivity", "specificity", "threshold"} <= set(scores)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert scores["threshold"] == summary["operating-threshold"]
    assert "auc" in result.stdout


def test_resume_continues_from_the_exact_checkpoint(sites_2d, tmp_path):
    run_dir = tmp_path / "run"
    common = [*SMALL, "--strategy", "fedadam"]
    first = run_command(
        fedrad_command(
            "simulate", str(sites_2d), "--out", str(run_dir), "--num-server-rounds", "1", *common
        ),
        timeout=300,
    )
    assert first.returncode == 0, first.stdout[-4000:]
    checkpoint = run_dir / "rounds" / "round-0001"
    saved_model = sha256_arrays(load_file(str(checkpoint / "model.safetensors")))
    saved_strategy = sha256_arrays(load_file(str(checkpoint / "strategy.safetensors")))

    second = run_command(
        fedrad_command(
            "simulate",
            str(sites_2d),
            "--resume-from",
            str(run_dir),
            "--num-server-rounds",
            "2",
            *common,
        ),
        timeout=300,
    )
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    assert second.returncode == 0, second.stdout[-4000:]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[1]["start-model-sha256"] == saved_model
    assert rounds[1]["start-strategy-sha256"] == saved_strategy
    assert len(load_file(str(checkpoint / "strategy.safetensors"))) > 0  # FedAdam moments saved
    assert json.loads((run_dir / "run.json").read_text())["resumed-after-round"] == 1
    trail = verify(run_dir)
    assert trail.ok, trail.describe()
    assert [e["event"] for e in trail.entries] == [
        "run-start",
        "round",
        "run-end",
        "resume",
        "round",
        "run-end",
    ]
