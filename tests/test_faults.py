"""A damaged run directory stops a resume loudly, naming the file and what to do.

The run directories here are written by the real :class:`server.rundir.RunDir` (the same calls
the round loop makes), then damaged the way a disk or a crash damages them: a truncated
safetensors file, a broken JSON line, a checkpoint that does not match the digest metrics.jsonl
recorded for it, a missing round. ``fedrad study start`` on such a study fails before starting
anything (no ``flwr run`` log appears), with the path in its message.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedrad.commands.consortium import Consortium
from fedrad.commands.study import STUDY_FILE, Study, start_study
from fedrad.core.config import RunConfig
from fedrad.core.errors import FedradError, RunDirError
from server.rundir import RunDir
from tests.helpers import fedrad_command, run_command

pytestmark = pytest.mark.timeout(120)

MODEL = {"name": "cnn"}


def _run_dir(path: Path, rounds: int) -> RunDir:
    """A run directory with ``rounds`` completed, checkpointed rounds."""
    path.mkdir(parents=True, exist_ok=True)
    run_dir = RunDir(path)
    run_dir.write_run_record(RunConfig(num_server_rounds=3), sites=[], resumed_from=0)
    for n in range(1, rounds + 1):
        arrays = {"w": np.full((4, 4), float(n), dtype=np.float32)}
        digest = run_dir.save_checkpoint(n, arrays, {}, MODEL)
        run_dir.append_metrics({"round": n, "status": "completed", "model-sha256": digest})
    return run_dir


def test_an_intact_run_resumes_after_its_last_recorded_round(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path / "run", rounds=2)
    checkpoint = run_dir.resume_point()
    assert checkpoint.round == 2
    assert float(checkpoint.arrays["w"][0, 0]) == 2.0


def test_a_round_checkpointed_but_not_recorded_is_trained_again(tmp_path: Path) -> None:
    # the coordinator died between saving round 2's checkpoint and writing its metrics line
    run_dir = _run_dir(tmp_path / "run", rounds=1)
    run_dir.save_checkpoint(2, {"w": np.zeros((4, 4), dtype=np.float32)}, {}, MODEL)
    assert run_dir.resume_point().round == 1


def test_truncated_checkpoint_fails_naming_the_file(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path / "run", rounds=2)
    model = run_dir.round_dir(2) / "model.safetensors"
    model.write_bytes(model.read_bytes()[:40])
    with pytest.raises(RunDirError) as err:
        run_dir.resume_point()
    assert str(model) in str(err.value)
    assert "damaged" in str(err.value) and "restore it from a backup" in str(err.value)


def test_broken_metrics_line_fails_naming_the_line(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path / "run", rounds=2)
    with (run_dir.path / "metrics.jsonl").open("a") as fh:
        fh.write('{"round": 3, "stat\n')
    with pytest.raises(RunDirError, match=r"metrics.jsonl line 3 is not valid JSON"):
        run_dir.resume_point()


def test_bad_model_json_fails(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path / "run", rounds=1)
    (run_dir.round_dir(1) / "model.json").write_text("{not json")
    with pytest.raises(RunDirError, match=r"round-0001/model.json is not valid JSON"):
        run_dir.resume_point()


def test_checkpoint_replaced_behind_the_records_back_fails_on_the_digest(tmp_path: Path) -> None:
    # a consistent checkpoint (its own model.json agrees) that is not the model the run recorded
    run_dir = _run_dir(tmp_path / "run", rounds=2)
    records = run_dir.read_metrics()
    run_dir.save_checkpoint(2, {"w": np.ones((4, 4), dtype=np.float32) * 7}, {}, MODEL)
    with pytest.raises(RunDirError) as err:
        run_dir.resume_point()
    assert records[1]["model-sha256"] in str(err.value)
    assert "round 2" in str(err.value)


def test_a_gap_in_the_completed_rounds_fails(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path / "run", rounds=2)
    lines = (run_dir.path / "metrics.jsonl").read_text().splitlines()
    (run_dir.path / "metrics.jsonl").write_text(lines[1] + "\n")  # round 1's line lost
    with pytest.raises(RunDirError, match=r"completed rounds \[2\], not 1..1"):
        run_dir.resume_point()


def test_nothing_to_resume_says_so(tmp_path: Path) -> None:
    run_dir = _run_dir(tmp_path / "run", rounds=0)
    with pytest.raises(RunDirError, match="no completed, checkpointed round"):
        run_dir.resume_point()


def _consortium(root: Path, study_id: str, *, rounds: int) -> tuple[Consortium, Study]:
    """A consortium folder with one interrupted study (what a coordinator crash leaves)."""
    consortium = Consortium(root)
    root.mkdir(parents=True)
    consortium.manifest.write_text(json.dumps({"sites": ["site-1", "site-2"]}))
    consortium.flwr_home.mkdir(parents=True)
    (consortium.flwr_home / "config.toml").write_text(
        '[superlink.fedrad]\naddress = "127.0.0.1:1"\n'
    )
    study = Study(consortium, study_id)
    _run_dir(study.folder, rounds=rounds)
    record = {"status": "running", "pid": 0, "run-id": "1", "config": {"study-id": study_id}}
    (study.folder / STUDY_FILE).write_text(json.dumps(record))
    return consortium, study


def test_study_start_on_a_damaged_checkpoint_fails_before_starting_anything(
    tmp_path: Path,
) -> None:
    consortium, study = _consortium(tmp_path / "consortium", "s1", rounds=2)
    model = study.folder / "rounds" / "round-0002" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-8])
    metrics_before = (study.folder / "metrics.jsonl").read_text()

    with pytest.raises(RunDirError, match=str(model)):
        start_study(consortium, {"study-id": "s1"})
    result = run_command(
        fedrad_command("study", "start", str(consortium.root), "--study-id", "s1"), timeout=90
    )

    assert result.returncode == 2, result.stdout
    assert "round-0002/model.safetensors" in result.stdout.replace("\n", "")
    assert not study.log.exists()  # no flwr run was started
    assert (study.folder / "metrics.jsonl").read_text() == metrics_before
    assert json.loads(study.file.read_text())["status"] == "running"  # record left as it was


def test_study_start_on_a_damaged_study_record_fails(tmp_path: Path) -> None:
    consortium, study = _consortium(tmp_path / "consortium", "s1", rounds=1)
    study.file.write_text('{"status": "runn')
    with pytest.raises(FedradError, match=rf"{study.file} is not valid JSON"):
        start_study(consortium, {"study-id": "s1"})


def test_study_start_refuses_a_completed_study_and_a_foreign_folder(tmp_path: Path) -> None:
    consortium, study = _consortium(tmp_path / "consortium", "s1", rounds=1)
    study.file.write_text(json.dumps({"status": "completed"}))
    with pytest.raises(FedradError, match="is completed"):
        start_study(consortium, {"study-id": "s1"})
    foreign = consortium.studies / "s2"
    foreign.mkdir()
    (foreign / "metrics.jsonl").write_text("")
    with pytest.raises(FedradError, match="exists without study.json"):
        start_study(consortium, {"study-id": "s2"})
