"""``fedrad report RUN_DIR``: regenerates fairness.json and report.html, or says what is missing."""

from __future__ import annotations

import json

import pytest
from report_helpers import write_run

from fedrad.commands.cli import main
from server.report import FAIRNESS_FILE, REPORT_FILE

pytestmark = pytest.mark.timeout(120)


def test_the_report_is_regenerated_and_its_gaps_printed(tmp_path, capsys):
    # Prepare: a run whose report files were lost
    run = write_run(tmp_path / "run")

    # Execute
    code = main(["report", str(run)])

    # Assert: both files, their paths, one table row per breakdown with its gaps
    captured = capsys.readouterr()
    assert code == 0, captured.err
    body = json.loads((run / FAIRNESS_FILE).read_text())
    assert (run / REPORT_FILE).read_text().startswith("<!DOCTYPE html>")
    text = " ".join(captured.out.split())
    assert str(run / FAIRNESS_FILE) in text and str(run / REPORT_FILE) in text
    assert "fairness gaps of round 2" in text
    sex = body["final"]["families"][0]["classes"]["1"]["gaps"]
    for name in ("demographic-parity-difference", "equal-opportunity-difference"):
        assert f"{sex[name]:.3f}" in text
    assert "sex" in text and "age-band" in text
    assert f"({len(body['final']['suppressed'])} suppressed cell(s))" in text


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    # Execute
    code = main(["report", str(tmp_path)])

    # Assert: non-zero, saying what is missing and what to give instead
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert f"{tmp_path} has no run.json: it is not a fedrad run directory" in err
    assert "fedrad simulate" in err
    assert not (tmp_path / REPORT_FILE).exists()


def test_a_missing_folder_is_refused(tmp_path, capsys):
    code = main(["report", str(tmp_path / "nowhere")])

    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_run_without_fairness_counts_is_refused(tmp_path, capsys):
    # Prepare: a run directory whose evaluations brought no subgroup counts
    run = write_run(tmp_path / "run", counts=False)

    # Execute
    code = main(["report", str(run)])

    # Assert
    err = " ".join(capsys.readouterr().err.split())
    assert code == 2
    assert "holds no fairness counts" in err and "round-NNN.json" in err
    assert "Run the study again" in err
    assert not (run / FAIRNESS_FILE).exists()


def test_help_describes_the_command(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["report", "--help"])

    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "fairness.json" in text and "report.html" in text and "RUN_DIR" in text
