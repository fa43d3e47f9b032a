"""Client-level DP through the fedrad command: derived noise, site ledgers, a later run refused."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import fedrad_command, run_command

from fedrad.synth import SynthConfig, write_consortium

pytestmark = pytest.mark.timeout(900)


def _run(sites: Path, run_dir: Path) -> subprocess.CompletedProcess[str]:
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
            "--study-id",
            "derived-study",
            "--target-epsilon",
            "4",
            "--max-grad-norm",
            "0.5",
        ),
        timeout=400,
    )


def test_derived_noise_is_spent_in_site_ledgers_and_a_later_run_is_refused(tmp_path: Path) -> None:
    # Prepare
    sites = tmp_path / "sites"
    write_consortium(
        sites, SynthConfig(sites=3, seed=5, image_size=32, samples_per_site=24), overwrite=True
    )

    # Execute: one run spends the whole target (noise derived), a second run of the study asks more
    first = _run(sites, tmp_path / "first")
    second = _run(sites, tmp_path / "second")

    # Assert: the coordinator's figure is what every site recorded, within the target
    assert first.returncode == 0, first.stdout[-4000:]
    rounds = [json.loads(line) for line in (tmp_path / "first" / "metrics.jsonl").open()]
    secure = [r["train"]["secure-aggregation"] for r in rounds]
    assert secure[0]["noise-multiplier"] == secure[1]["noise-multiplier"] > 0
    assert 0 < secure[0]["client-level-epsilon"] < secure[1]["client-level-epsilon"] <= 4.0
    ledgers = sorted((sites / ".fedrad-ledger" / "_client-level" / "derived-study").glob("*.json"))
    assert len(ledgers) == 3
    for path in ledgers:
        record = json.loads(path.read_text())
        assert [r["epsilon"] for r in record["rounds"]] == pytest.approx(
            [s["client-level-epsilon"] for s in secure], rel=1e-9
        )
    # the evaluation sums each site released are charged to its record-level ledger alone
    records = sorted((sites / ".fedrad-ledger" / "derived-study").glob("*.json"))
    assert len(records) == 3
    for path in records:
        entries = [e for r in json.loads(path.read_text())["rounds"] for e in r["history"]]
        assert entries and all(e[1:] == [1.0, 1] and e[0] > 1 for e in entries)  # releases
    summary = json.loads((tmp_path / "second" / "summary.json").read_text())
    assert second.returncode == 1 and summary["status"] == "stopped"
    assert "error 103" in summary["reason"] and "budget" in summary["reason"]
