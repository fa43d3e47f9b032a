import argparse
import json
import shutil
from pathlib import Path

import pydicom
import pytest

from fedrad.commands.site_check import add_parser
from fedrad.synth import SynthConfig, write_consortium

pytestmark = pytest.mark.timeout(120)

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def _run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="fedrad")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["site", "check", *argv])
    return args.handler(args)


@pytest.fixture(scope="module")
def synth_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    write_consortium(out, SynthConfig(sites=1, samples_per_site=20, image_size=32), overwrite=True)
    return out / "site-1"


@pytest.fixture
def site(synth_site: Path, tmp_path: Path) -> Path:
    """The synthetic site plus planted problems: bad files, a copy, an unlabelled image,
    and a label that names no file."""
    site = tmp_path / "site"
    shutil.copytree(synth_site, site)
    for name in ("MR_truncated.dcm", "rtplan.dcm", "CT_small.dcm"):
        shutil.copy(TEST_FILES / name, site / name)
    (site / "notes.txt").write_text("not an image\n")
    first = sorted((site / "images").iterdir())[0]
    shutil.copy(first, site / "images" / "zz-copy.dcm")
    with (site / "labels.csv").open("a") as fh:
        fh.write("images/missing.dcm,1,\nMR_truncated.dcm,0,\n")
    return site


def test_report_counts_reasons_duplicates_and_labels(site, tmp_path):
    report_path = tmp_path / "out" / "report.json"

    code = _run(str(site), "--json", str(report_path), "--workers", "2")
    report = json.loads(report_path.read_text())

    assert code == 0
    assert report["counts"] == {"files": 25, "accepted": 21, "quarantined": 3, "duplicates": 1}
    assert {q["path"]: q["reason"] for q in report["quarantined"]} == {
        "MR_truncated.dcm": "truncated",
        "rtplan.dcm": "unsupported-object",
        "notes.txt": "not-dicom",
    }
    original = "images/" + sorted(p.name for p in (site / "images").iterdir())[0]
    assert report["duplicates"] == [{"path": "images/zz-copy.dcm", "duplicate-of": original}]
    labels = report["labels"]
    assert labels["usable-samples"] == 20
    assert [r["id"] for r in labels["labels-without-images"]] == ["images/missing.dcm"]
    assert labels["labelled-but-quarantined"] == [
        {"id": "MR_truncated.dcm", "line": 23, "reason": "truncated"}
    ]
    assert labels["images-without-labels"] == ["CT_small.dcm"]


def test_report_counts_classes_and_subgroups(site, tmp_path):
    report_path = tmp_path / "report.json"
    rows = (site / "labels.csv").read_text().splitlines()[1:21]

    _run(str(site), "--json", str(report_path))
    report = json.loads(report_path.read_text())

    expected = {label: sum(r.split(",")[1] == label for r in rows) for label in ("0", "1")}
    assert report["class-balance"] == expected
    assert {name: sum(counts.values()) for name, counts in report["subgroups"].items()} == {
        "sex": 21,
        "age-band": 21,
        "manufacturer": 21,
        "modality": 21,
    }
    assert report["subgroups"]["modality"]["CT"] == 1
    assert report["accepted-by-modality"]["CT"] == {
        "files": 1,
        "series": 1,
        "shapes": {"128x128": 1},
    }


def test_report_holds_no_patient_names_or_ids(site, tmp_path):
    report_path = tmp_path / "report.json"
    names = {str(pydicom.dcmread(p).PatientName) for p in (site / "images").iterdir()}
    ids = {str(pydicom.dcmread(p).PatientID) for p in (site / "images").iterdir()}

    _run(str(site), "--json", str(report_path))
    text = report_path.read_text()

    assert [value for value in names | ids if value and value in text] == []


def test_terminal_shows_tables_and_ends_with_a_summary_line(site, capsys):
    code = _run(str(site))
    printed = capsys.readouterr().out

    assert code == 0
    assert "quarantined, by reason" in printed and "truncated" in printed
    assert printed.strip().splitlines()[-1].startswith(f"site check of {site}: 21 accepted")


def test_missing_folder_exits_2_and_says_how_to_fix(tmp_path, capsys):
    code = _run(str(tmp_path / "nowhere"))

    assert code == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "holds no files"),
        ({"notes.txt": b"text", "empty.dcm": b""}, "none of the 2 file(s) is usable"),
    ],
)
def test_unusable_folder_exits_2_with_the_reason(tmp_path, capsys, files, message):
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)

    code = _run(str(tmp_path))

    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_labels_are_reported_and_no_sample_is_usable(site, tmp_path, capsys):
    (site / "labels.csv").unlink()
    report_path = tmp_path / "report.json"

    code = _run(str(site), "--json", str(report_path))
    report = json.loads(report_path.read_text())

    assert code == 2 and "no labels" in capsys.readouterr().err
    assert report["labels"]["status"] == "missing" and report["counts"]["accepted"] == 21
    assert len(report["labels"]["images-without-labels"]) == 21


@pytest.mark.parametrize("kind", ["path", "series", "study"])
def test_label_ids_may_be_paths_series_or_study_uids(tmp_path, kind):
    shutil.copy(TEST_FILES / "CT_small.dcm", tmp_path / "ct.dcm")
    shutil.copy(TEST_FILES / "MR_small.dcm", tmp_path / "mr.dcm")
    ds = pydicom.dcmread(tmp_path / "ct.dcm")
    sample_id = {"path": "ct.dcm", "series": ds.SeriesInstanceUID, "study": ds.StudyInstanceUID}
    (tmp_path / "labels.csv").write_text(f"id,label\n{sample_id[kind]},1\n")
    report_path = tmp_path / "report.json"

    code = _run(str(tmp_path), "--json", str(report_path))
    labels = json.loads(report_path.read_text())["labels"]

    assert code == 0
    assert (labels["usable-samples"], labels["images-without-labels"]) == (1, ["mr.dcm"])


@pytest.mark.parametrize("argv", [["site", "--help"], ["site", "check", "--help"]])
def test_help_works_on_both_levels(capsys, argv):
    parser = argparse.ArgumentParser(prog="fedrad")
    add_parser(parser.add_subparsers(dest="command", required=True))

    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(argv)

    assert exit_info.value.code == 0
    assert ("check" if argv == ["site", "--help"] else "--max-mb") in capsys.readouterr().out


@pytest.mark.parametrize("option", ["--workers=0", "--timeout=-1", "--max-mb=abc"])
def test_bad_options_are_refused_by_the_parser(option, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run(str(tmp_path), option)

    assert exit_info.value.code == 2
    assert option.split("=")[0] in capsys.readouterr().err
