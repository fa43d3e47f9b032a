"""Sample-level DP through the whole federation: cumulative epsilon, ceilings, budget stop."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import fedrad_command, run_command

pytestmark = pytest.mark.timeout(600)

SMALL = [
    "--image-size",
    "32",
    "--batch-size",
    "16",
    "--optimizer",
    "sgd",
    "--learning-rate",
    "0.5",
    "--dp",
    "sample",
]


def _rounds(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def dp_sites(sites_2d, tmp_path_factory):
    sites = tmp_path_factory.mktemp("dp") / "sites"
    for name in ("site-1", "site-2"):
        shutil.copytree(sites_2d / name, sites / name)
    return sites


def test_epsilon_is_cumulative_over_rounds_and_runs(dp_sites, tmp_path):
    first = run_command(
        fedrad_command(
            "simulate",
            str(dp_sites),
            "--out",
            str(tmp_path / "a"),
            "--num-server-rounds",
            "2",
            "--study-id",
            "study-a",
            "--target-epsilon",
            "6",
            *SMALL,
        ),
        timeout=300,
    )
    assert first.returncode == 0, first.stdout[-3000:]
    rounds = _rounds(tmp_path / "a")
    eps = [[r["train"]["sites"][s]["epsilon"] for s in ("site-1", "site-2")] for r in rounds]

    second = run_command(
        fedrad_command(
            "simulate",
            str(dp_sites),
            "--out",
            str(tmp_path / "b"),
            "--num-server-rounds",
            "1",
            "--study-id",
            "study-a",
            "--target-epsilon",
            "9",
            *SMALL,
        ),
        timeout=300,
    )
    later = _rounds(tmp_path / "b")[0]["train"]["sites"]
    ledger = json.loads((dp_sites / ".fedrad-ledger" / "study-a" / "site-1.json").read_text())

    assert second.returncode == 0, second.stdout[-3000:]
    # cumulative, and within the study budget
    assert all(0 < a < b <= 6.0 + 1e-6 for a, b in zip(eps[0], eps[1], strict=True))
    assert later["site-1"]["epsilon"] > eps[1][0]  # a later run of the study adds to the spend
    histories = [r["history"] for r in ledger["rounds"]]
    trained = [h for h in histories if h[0][1] < 1.0]  # DP-SGD: Poisson rate below 1
    assert len(trained) == 3  # two rounds of run a, one of run b
    # every other entry is one evaluation release (a Gaussian release, rate 1, one step)
    assert all(h[0][1:] == [1.0, 1] for h in histories if h not in trained)
    assert len(histories) > 3


def test_site_refuses_a_run_above_its_ceiling(dp_sites, tmp_path):
    result = run_command(
        fedrad_command(
            "simulate",
            str(dp_sites),
            "--out",
            str(tmp_path / "c"),
            "--num-server-rounds",
            "1",
            "--study-id",
            "study-c",
            "--target-epsilon",
            "50",
            *SMALL,
        ),
        timeout=300,
    )
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())

    assert result.returncode == 1
    assert summary["status"] == "stopped"
    assert "error 106" in summary["reason"]  # above the site ceiling; the detail stays local
    assert not (tmp_path / "c" / "rounds").exists()  # nothing was aggregated
    # the user is told plainly that no model exists, and why, once for both sites
    assert "no model was trained" in result.stdout
    assert "model.safetensors" not in result.stdout
    assert summary["reason"].count("error 106") == 1


def test_spent_budget_stops_training(dp_sites, tmp_path):
    spend = run_command(
        fedrad_command(
            "simulate",
            str(dp_sites),
            "--out",
            str(tmp_path / "d"),
            "--num-server-rounds",
            "1",
            "--study-id",
            "study-d",
            "--target-epsilon",
            "1",
            *SMALL,
        ),
        timeout=300,
    )
    assert spend.returncode == 0, spend.stdout[-3000:]

    again = run_command(
        fedrad_command(
            "simulate",
            str(dp_sites),
            "--out",
            str(tmp_path / "e"),
            "--num-server-rounds",
            "1",
            "--study-id",
            "study-d",
            "--target-epsilon",
            "1",
            "--noise-multiplier",
            "0.8",
            *SMALL,
        ),
        timeout=300,
    )
    summary = json.loads((tmp_path / "e" / "summary.json").read_text())

    assert again.returncode == 1
    assert "budget" in summary["reason"].lower()
