import json
import logging
import os
import shutil
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML

from client.scan import (
    QUARANTINE_REASONS,
    REASON_HELP,
    AcceptedFile,
    QuarantinedFile,
    check_file,
    scan_folder,
)

pytestmark = pytest.mark.timeout(120)

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
ALL_TEST_FILES = sorted(p for p in TEST_FILES.rglob("*") if p.is_file())
MAX_BYTES = 64 * 2**20
BROKEN = {  # pydicom's intentionally broken files: what pydicom says, what the scan says
    "MR_truncated.dcm": "truncated",  # reads silently; pixel data 8130 of 8192 bytes
    "badVR.dcm": "unsupported-object",  # an RT Dose whose NumberOfFrames is '1A'
    "meta_missing_tsyntax.dcm": "missing-tags",  # no TransferSyntaxUID, no SOPClassUID
    "nested_priv_SQ.dcm": "missing-tags",  # no SOPClassUID, no image attributes
}
EXPECTED = {
    **BROKEN,
    "CT_small.dcm": "accepted",
    "693_J2KI.dcm": "accepted",
    "JPGExtended.dcm": "accepted",
    "MR_small_RLE.dcm": "accepted",
    "MR_small_jpeg_ls_lossless.dcm": "accepted",
    "examples_ybr_color.dcm": "accepted",
    "image_dfl.dcm": "accepted",
    "MR_small_padded.dcm": "pixel-data-length",
    "JPEG-lossy.dcm": "undecodable",
    "rtplan.dcm": "unsupported-object",
    "rtplan_truncated.dcm": "truncated",
    "rtdose.dcm": "unsupported-object",
    "test-SR.dcm": "unsupported-object",
    "waveform_ecg.dcm": "unsupported-object",
    "liver_1frame.dcm": "unsupported-object",
    "dicomdirtests/DICOMDIR": "unsupported-object",
    "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM000000": "no-pixel-data",
    "no_meta.dcm": "not-dicom",
    "README.txt": "not-dicom",
    "zipMR.gz": "not-dicom",
}
MUTATION_SOURCES = (
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "SC_rgb_jpeg_gdcm.dcm",
    "SC_rgb_dcmtk_+eb+cr.dcm",
)
NATIVE_SOURCES = ("CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm")


def _shape(result: AcceptedFile) -> tuple[int, ...]:
    frames = (result.frames,) if result.frames > 1 else ()
    samples = (result.samples_per_pixel,) if result.samples_per_pixel > 1 else ()
    return (*frames, result.rows, result.columns, *samples)


def _decoded_shape(path: Path) -> tuple[int, ...] | str:
    """What plain pydicom makes of a file: the pixel array's shape, or the error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return tuple(pydicom.dcmread(path).pixel_array.shape)
        except Exception as exc:  # noqa: BLE001 - the error is the answer
            return f"{exc.__class__.__name__}: {exc}"


def _outcome(result: AcceptedFile | QuarantinedFile) -> str:
    return "accepted" if isinstance(result, AcceptedFile) else result.reason


@pytest.fixture(autouse=True)
def _quiet_pydicom() -> None:
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


def test_glob_finds_all_176_test_files():
    assert len(ALL_TEST_FILES) == 176


@pytest.mark.parametrize("path", ALL_TEST_FILES, ids=lambda p: p.relative_to(TEST_FILES).as_posix())
def test_every_pydicom_file_is_accepted_decoded_or_quarantined_with_a_reason(path):
    result = check_file(path, max_bytes=MAX_BYTES)

    if isinstance(result, AcceptedFile):
        assert _decoded_shape(path) == _shape(result)
        assert len(result.sha256) == 64 and result.size == path.stat().st_size
    else:
        assert result.reason in QUARANTINE_REASONS
        assert result.detail


def test_enough_pydicom_files_decode():
    outcomes = [_outcome(check_file(p, max_bytes=MAX_BYTES)) for p in ALL_TEST_FILES]

    # 89 files decode with the plugins; 8 are RT Dose or SEG (refused) and one is padded
    assert outcomes.count("accepted") >= 80


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_known_files_get_the_expected_outcome(name):
    result = check_file(TEST_FILES / name, max_bytes=MAX_BYTES)

    assert _outcome(result) == EXPECTED[name], result


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_pydicom_files_fail_in_pydicom_and_are_quarantined(name):
    result = check_file(TEST_FILES / name, max_bytes=MAX_BYTES)

    assert isinstance(_decoded_shape(TEST_FILES / name), str)  # pydicom cannot decode them
    assert isinstance(result, QuarantinedFile) and result.reason == BROKEN[name]


def test_truncated_file_detail_says_how_much_is_missing():
    result = check_file(TEST_FILES / "MR_truncated.dcm", max_bytes=MAX_BYTES)

    assert "8192" in result.detail and "8130" in result.detail


def test_scan_of_pydicom_folder_matches_check_file_and_is_sorted():
    report = scan_folder(TEST_FILES, workers=2, max_bytes=MAX_BYTES)
    single = {
        p.relative_to(TEST_FILES).as_posix(): _outcome(check_file(p, max_bytes=MAX_BYTES))
        for p in ALL_TEST_FILES
    }
    outcomes = {
        **{a.path: "accepted" for a in report.accepted},
        **{d: "accepted" for d, _ in report.duplicates},
        **{q.path: q.reason for q in report.quarantined},
    }

    assert outcomes == single
    assert [a.path for a in report.accepted] == sorted(a.path for a in report.accepted)
    assert [q.path for q in report.quarantined] == sorted(q.path for q in report.quarantined)


def test_reason_codes_are_documented():
    assert set(QUARANTINE_REASONS) == set(REASON_HELP)
    assert {
        "not-dicom",
        "too-large",
        "truncated",
        "pixel-data-length",
        "undecodable",
        "unsupported-transfer-syntax",
        "missing-tags",
        "unsupported-object",
        "no-pixel-data",
        "burned-in-annotation",
        "decode-timeout",
        "worker-crashed",
    } <= set(QUARANTINE_REASONS)
    assert all(REASON_HELP[code] for code in QUARANTINE_REASONS)


# ---------------------------------------------------------------- damaged files


def _pixel_offset(data: bytes) -> int:
    return max(data.rfind(b"\xe0\x7f\x10\x00"), data.rfind(b"\x7f\xe0\x00\x10"))


def _byte_damages(rng: np.random.Generator, data: bytes) -> dict[str, bytes]:
    """One of each kind of damage; offsets and bits drawn from ``rng``."""
    size, pixels = len(data), _pixel_offset(data)
    damaged = {
        "cut": data[: int(rng.integers(1, size))],
        "cut-in-pixels": data[: int(rng.integers(pixels + 12, size))],
        "cut-in-header": data[: int(rng.integers(132, pixels + 12))],
    }
    for kind, low, high, flips in (
        ("flip-header", 132, pixels + 12, 6),
        ("flip-pixels", pixels + 12, size, 30),
    ):
        buffer = bytearray(data)
        for _ in range(int(rng.integers(1, flips + 1))):
            buffer[int(rng.integers(low, high))] ^= 1 << int(rng.integers(8))
        damaged[kind] = bytes(buffer)
    at = int(rng.integers(128, size - 4))
    damaged["overwrite"] = data[:at] + rng.bytes(4) + data[at + 4 :]
    return damaged


def _geometry_damages(rng: np.random.Generator, path: Path) -> dict[str, pydicom.Dataset]:
    """Valid files whose header no longer matches their pixel data."""
    damaged = {}
    for keyword in ("Rows", "Columns"):
        ds = pydicom.dcmread(path)
        setattr(ds, keyword, int(getattr(ds, keyword)) + int(rng.choice([-3, -1, 1, 5])))
        damaged[keyword.lower()] = ds
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 3
    damaged["frames"] = ds
    return damaged


def _not_dicom(rng: np.random.Generator, index: int) -> dict[str, bytes]:
    return {
        "random.dcm": rng.bytes(int(rng.integers(1, 4000))),
        "png.png": b"\x89PNG\r\n\x1a\n" + rng.bytes(200),
        "csv.csv": b"id,label\nimages/a.dcm,1\n" * (index + 1),
        "dicm.dcm": b"\0" * 128 + b"DICM" + rng.bytes(int(rng.integers(0, 300))),
    }


@pytest.fixture(scope="module")
def damaged_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Over 500 damaged copies of pydicom test files (seeded), plus non-DICOM content."""
    site = tmp_path_factory.mktemp("damaged")
    rng = np.random.default_rng(20261107)
    for name in MUTATION_SOURCES:
        data = (TEST_FILES / name).read_bytes()
        for round_ in range(10):
            for kind, blob in _byte_damages(rng, data).items():
                (site / f"{Path(name).stem}~{kind}~{round_}.dcm").write_bytes(blob)
        for kind, ds in _geometry_damages(rng, TEST_FILES / name).items():
            ds.save_as(site / f"{Path(name).stem}~{kind}.dcm")
    for index in range(8):
        for name, blob in _not_dicom(rng, index).items():
            (site / f"{index}-{name}").write_bytes(blob)
    (site / "empty.dcm").write_bytes(b"")
    return site


@pytest.fixture(scope="module")
def damaged_report(damaged_site):
    return scan_folder(damaged_site, workers=2, timeout_s=20.0)


def _outcomes(report) -> dict[str, str]:
    return {
        **{a.path: "accepted" for a in report.accepted},
        **{d: "accepted" for d, _ in report.duplicates},
        **{q.path: q.reason for q in report.quarantined},
    }


def test_damaged_files_are_all_accounted_for_without_crashes(damaged_site, damaged_report):
    outcomes = _outcomes(damaged_report)

    assert len(outcomes) == len(list(damaged_site.iterdir())) >= 500
    assert set(outcomes.values()) <= {"accepted", *QUARANTINE_REASONS}
    assert not {"worker-crashed", "decode-timeout"} & set(outcomes.values())
    assert [q for q in damaged_report.quarantined if q.detail.startswith("unexpected")] == []


def test_damaged_files_accepted_only_if_plain_pydicom_decodes_them(damaged_site, damaged_report):
    by_path = {a.path: a for a in damaged_report.accepted}
    checked = [(path, by_path[path]) for path in by_path]
    checked += [(dup, by_path[original]) for dup, original in damaged_report.duplicates]

    wrong = [
        (path, _decoded_shape(damaged_site / path))
        for path, accepted in checked
        if _decoded_shape(damaged_site / path) != _shape(accepted)
    ]

    assert len(checked) > 50 and wrong == []


@pytest.mark.parametrize(
    ("pattern", "reasons"),
    [
        ("*-random.dcm", {"not-dicom"}),
        ("*-png.png", {"not-dicom"}),
        ("*-csv.csv", {"not-dicom"}),
        ("empty.dcm", {"not-dicom"}),
        ("*-dicm.dcm", {"truncated", "malformed", "missing-tags", "not-dicom"}),
        ("*~cut-in-pixels~*", {"truncated"}),
        ("*~cut-in-header~*", {"truncated", "no-pixel-data", "missing-tags", "not-dicom"}),
        *[
            (f"{Path(n).stem}~{kind}.dcm", {"pixel-data-length"})
            for n in NATIVE_SOURCES
            for kind in ("rows", "columns", "frames")
        ],
    ],
)
def test_each_damage_gets_its_specific_reason(damaged_site, damaged_report, pattern, reasons):
    outcomes = _outcomes(damaged_report)
    names = sorted(p.name for p in damaged_site.glob(pattern))

    assert names and {outcomes[name] for name in names} <= reasons


def test_compressed_files_with_wrong_geometry_are_not_accepted(damaged_report):
    outcomes = _outcomes(damaged_report)
    compressed = [
        f"{Path(n).stem}~{kind}.dcm"
        for n in MUTATION_SOURCES
        if n not in NATIVE_SOURCES
        for kind in ("rows", "columns", "frames")
    ]

    assert {name: outcomes[name] for name in compressed if outcomes[name] == "accepted"} == {}


# ---------------------------------------------------------------- hangs and crashes


def _misbehaving_check(path: Path, *, max_bytes: int) -> AcceptedFile | QuarantinedFile:
    """A check that hangs, dies or raises on files named for it, else checks normally."""
    if path.name.startswith("hang"):
        time.sleep(120)
    if path.name.startswith("exit"):
        os._exit(3)
    if path.name.startswith("segfault"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if path.name.startswith("memory"):
        raise MemoryError
    return check_file(path, max_bytes=max_bytes)


@pytest.fixture
def small_site(tmp_path: Path) -> Path:
    for name in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm"):
        shutil.copy(TEST_FILES / name, tmp_path / name)
    return tmp_path


@pytest.mark.parametrize("workers", [1, 2])
def test_a_hanging_file_times_out_and_the_scan_goes_on(small_site, workers):
    shutil.copy(TEST_FILES / "CT_small.dcm", small_site / "hang.dcm")
    started = time.monotonic()

    report = scan_folder(small_site, workers=workers, timeout_s=1.0, _check=_misbehaving_check)

    assert time.monotonic() - started < 15
    assert [(q.path, q.reason) for q in report.quarantined] == [("hang.dcm", "decode-timeout")]
    assert len(report.accepted) == 4


@pytest.mark.parametrize(
    ("name", "detail"),
    [
        ("exit.dcm", "exit code 3"),
        ("segfault.dcm", "SIGSEGV"),
        ("memory.dcm", "MemoryError"),
    ],
)
@pytest.mark.parametrize("workers", [1, 2])
def test_a_worker_that_dies_costs_one_file(small_site, workers, name, detail):
    shutil.copy(TEST_FILES / "CT_small.dcm", small_site / name)

    report = scan_folder(small_site, workers=workers, timeout_s=20.0, _check=_misbehaving_check)

    assert [(q.path, q.reason) for q in report.quarantined] == [(name, "worker-crashed")]
    assert detail in report.quarantined[0].detail
    assert len(report.accepted) == 4


def test_many_crashes_in_one_chunk_each_cost_one_file(small_site):
    for index in range(5):
        shutil.copy(TEST_FILES / "CT_small.dcm", small_site / f"exit-{index}.dcm")

    report = scan_folder(small_site, workers=2, _check=_misbehaving_check)

    assert {q.reason for q in report.quarantined} == {"worker-crashed"}
    assert len(report.quarantined) == 5 and len(report.accepted) == 4


# ---------------------------------------------------------------- size, duplicates, walking


def test_a_file_over_the_cap_is_refused_without_reading_it(tmp_path, monkeypatch):
    big = tmp_path / "big.dcm"
    with big.open("wb") as fh:
        fh.truncate(2 * MAX_BYTES)  # sparse: no disk space used
    reads: list[int] = []
    real_read = os.read
    monkeypatch.setattr(os, "read", lambda fd, n: reads.append(n) or real_read(fd, n))

    result = check_file(big, max_bytes=MAX_BYTES)

    assert (result.reason, reads) == ("too-large", [])
    assert str(2 * MAX_BYTES) in result.detail


def test_scan_refuses_a_huge_file_quickly(small_site):
    with (small_site / "huge.dcm").open("wb") as fh:
        fh.truncate(300 * 2**20)
    started = time.monotonic()

    report = scan_folder(small_site, max_bytes=256 * 2**20)

    assert [(q.path, q.reason) for q in report.quarantined] == [("huge.dcm", "too-large")]
    assert time.monotonic() - started < 10


def test_pixels_that_would_decode_too_large_are_refused(tmp_path):
    ds = pydicom.dcmread(TEST_FILES / "JPGExtended.dcm")
    ds.Rows = ds.Columns = 65535
    ds.NumberOfFrames = 100
    ds.save_as(tmp_path / "bomb.dcm")

    result = check_file(tmp_path / "bomb.dcm", max_bytes=MAX_BYTES)

    assert result.reason == "too-large" and "decode" in result.detail


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("MR_small.dcm", "MR_small.dcm"),  # the same bytes
        ("MR_small.dcm", "MR_small_implicit.dcm"),  # the same SOPInstanceUID, other encoding
    ],
)
def test_a_duplicate_is_reported_and_accepted_once(tmp_path, first, second):
    shutil.copy(TEST_FILES / first, tmp_path / "a.dcm")
    (tmp_path / "sub").mkdir()
    shutil.copy(TEST_FILES / second, tmp_path / "sub" / "b.dcm")

    report = scan_folder(tmp_path)

    assert [a.path for a in report.accepted] == ["a.dcm"]
    assert report.duplicates == [("sub/b.dcm", "a.dcm")]


def test_hidden_files_labels_and_skipped_paths_are_not_scanned(small_site):
    (small_site / ".hidden").mkdir()
    shutil.copy(TEST_FILES / "CT_small.dcm", small_site / ".hidden" / "x.dcm")
    (small_site / ".DS_Store").write_bytes(b"junk")
    (small_site / "labels.csv").write_text("id,label\nCT_small.dcm,1\n")
    (small_site / "cache").mkdir()
    (small_site / "cache" / "blob.bin").write_bytes(b"junk")

    report = scan_folder(small_site, skip=lambda p: p.name == "cache")

    assert report.quarantined == [] and len(report.accepted) == 4
    assert [a.path for a in report.accepted] == sorted(a.path for a in report.accepted)


def test_a_fifo_does_not_hang_the_scan(small_site):
    os.mkfifo(small_site / "pipe.dcm")

    report = scan_folder(small_site, timeout_s=5.0)

    assert [(q.path, q.reason) for q in report.quarantined] == [("pipe.dcm", "not-dicom")]


def _as_mpeg2(ds: pydicom.Dataset) -> None:
    ds.PixelData = encapsulate([ds.PixelData])
    ds.file_meta.TransferSyntaxUID = MPEG2MPML


def _edited(tmp_path: Path, name: str, edit) -> Path:
    ds = pydicom.dcmread(TEST_FILES / name)
    edit(ds)
    path = tmp_path / f"edited-{name}"
    ds.save_as(path)
    return path


@pytest.mark.parametrize(
    ("edit", "reason", "detail"),
    [
        (lambda ds: setattr(ds, "BurnedInAnnotation", "YES"), "burned-in-annotation", "YES"),
        (lambda ds: delattr(ds, "Rows"), "missing-tags", "Rows"),
        (lambda ds: delattr(ds, "SOPInstanceUID"), "missing-tags", "SOPInstanceUID"),
        (lambda ds: delattr(ds, "PixelData"), "no-pixel-data", "PixelData"),
        (lambda ds: setattr(ds, "Modality", "SR"), "unsupported-object", "structured report"),
        (lambda ds: setattr(ds, "BitsAllocated", 12), "malformed", "BitsAllocated 12"),
        (_as_mpeg2, "unsupported-transfer-syntax", "MPEG2"),
    ],
)
def test_header_problems_get_specific_reasons(tmp_path, monkeypatch, edit, reason, detail):
    monkeypatch.setattr(pydicom.config.settings, "writing_validation_mode", pydicom.config.IGNORE)
    path = _edited(tmp_path, "CT_small.dcm", edit)

    result = check_file(path, max_bytes=MAX_BYTES)

    assert (result.reason, detail in result.detail) == (reason, True), result


def test_a_value_pydicom_cannot_read_is_malformed(tmp_path):
    path = _edited(tmp_path, "CT_small.dcm", lambda ds: setattr(ds, "NumberOfFrames", "91"))
    data = path.read_bytes()
    path.write_bytes(data.replace(b"IS\x02\x0091", b"IS\x02\x001A"))  # as in badVR.dcm

    result = check_file(path, max_bytes=MAX_BYTES)

    assert b"IS\x02\x0091" in data
    assert (result.reason, "1A" in result.detail) == ("malformed", True), result


def test_accepted_file_holds_site_attributes(tmp_path):
    result = check_file(TEST_FILES / "CT_small.dcm", max_bytes=MAX_BYTES)

    assert isinstance(result, AcceptedFile)
    assert (result.modality, result.rows, result.columns, result.frames) == ("CT", 128, 128, 1)
    assert result.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    assert result.transfer_syntax == "1.2.840.10008.1.2.1"
    assert result.position_z is not None and result.instance_number is not None


def test_to_dict_is_json_ready(small_site):
    report = scan_folder(small_site)

    data = json.loads(json.dumps(report.to_dict()))

    assert data["counts"] == {"files": 4, "accepted": 4, "quarantined": 0, "duplicates": 0}
    assert data["accepted"][0]["path"] == "CT_small.dcm"
    assert "sop-instance-uid" in data["accepted"][0]
