"""Hostile files cannot exhaust a site: deflate bombs, symbolic links, pixel bombs, memory.

Each attack is first shown working where the defence is switched off (unbounded inflation,
plain pydicom, a worker without a memory limit), so that no test passes vacuously.
"""

import os
import resource
import shutil
import tracemalloc
from functools import partial
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from client.dicom import (
    MAX_DECODED_BYTES,
    REASON_HELP,
    DicomRejected,
    check_geometry,
    check_object,
    decoded_cap,
    open_unlinked,
    parse_dicom,
)
from client.ingest import RECORD_SCHEMA, ingest_files
from client.scan import (
    AcceptedFile,
    QuarantinedFile,
    check_file,
    check_worker_memory,
    default_worker_memory,
    scan_folder,
)
from client.scan_worker import limit_address_space, run_in_workers
from fedrad.core.errors import ConfigError

pytestmark = pytest.mark.timeout(60)

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
MIB = 2**20
BOMB_INFLATED = 48 * MIB
LEGIT = ("CT_small.dcm", "MR_small_jp2klossless.dcm")


def _deflated(path: Path, zeros: int) -> Path:
    """Write CT_small as a deflated file carrying a private element of ``zeros`` zero bytes."""
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.SOPInstanceUID = generate_uid()  # not a duplicate of CT_small
    ds.private_block(0x0009, "FEDRAD BOMB", create=True).add_new(0x10, "OB", bytes(zeros))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _deflated(tmp_path_factory.mktemp("bomb") / "bomb.dcm", BOMB_INFLATED)


@pytest.fixture
def site(tmp_path: Path, bomb: Path) -> Path:
    folder = tmp_path / "site"
    folder.mkdir()
    for name in LEGIT:
        shutil.copy(TEST_FILES / name, folder / name)
    shutil.copy(bomb, folder / "bomb.dcm")
    return folder


def test_new_reasons_are_documented():
    assert {"inflated-too-large", "symbolic-link", "out-of-memory"} <= set(REASON_HELP)
    assert "copy the file" in REASON_HELP["symbolic-link"]
    assert "checks:2" in RECORD_SCHEMA  # verdicts cached by the older checks are redone


# ---------------------------------------------------------------- deflate bombs


def test_a_deflate_bomb_is_small_on_disk_and_passed_the_old_checks(bomb):
    data = bomb.read_bytes()

    ds = parse_dicom(data, bomb)  # unbounded, as pydicom inflates
    check_object(ds, bomb)
    geometry = check_geometry(ds, bomb, max_decoded_bytes=16 * MIB)

    assert len(data) < 100 * 1024 and (geometry.rows, geometry.columns) == (128, 128)
    assert (
        len(ds.private_block(0x0009, "FEDRAD BOMB")[0x10].value) == BOMB_INFLATED
    )  # 48 MiB held from a file of < 100 KiB


def test_a_deflate_bomb_is_refused_without_inflating_it_whole(bomb):
    tracemalloc.start()
    try:
        result = check_file(bomb, max_bytes=MIB)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert isinstance(result, QuarantinedFile) and result.reason == "inflated-too-large"
    assert "more than 1048576 bytes" in result.detail
    assert peak < 8 * MIB  # inflated in 1 MiB steps, each dropped


def test_a_deflated_file_that_inflates_within_the_cap_is_accepted(tmp_path):
    path = _deflated(tmp_path / "small.dcm", 256 * 1024)

    result = check_file(path, max_bytes=MIB)

    assert isinstance(result, AcceptedFile)
    assert result.transfer_syntax == DeflatedExplicitVRLittleEndian


def test_inflation_is_bounded_by_the_cap_itself(tmp_path):
    path = _deflated(tmp_path / "edge.dcm", 2 * MIB)

    refused = check_file(path, max_bytes=2 * MIB)  # the rest of the dataset tips it over
    accepted = check_file(path, max_bytes=3 * MIB)

    assert (refused.reason, type(accepted)) == ("inflated-too-large", AcceptedFile)  # type: ignore[union-attr]


def test_a_bomb_is_quarantined_and_the_scan_goes_on(site):
    report = scan_folder(site, max_bytes=MIB)

    assert [(q.path, q.reason) for q in report.quarantined] == [("bomb.dcm", "inflated-too-large")]
    assert sorted(a.path for a in report.accepted) == sorted(LEGIT)


def test_the_ingest_pass_quarantines_a_bomb_too(site):
    results = ingest_files(
        site, ["bomb.dcm", "CT_small.dcm"], transform=None, workers=1, timeout_s=20, max_bytes=MIB
    )

    assert results["bomb.dcm"].verdict.reason == "inflated-too-large"  # type: ignore[union-attr]
    assert isinstance(results["CT_small.dcm"].verdict, AcceptedFile)


# ---------------------------------------------------------------- symbolic links


@pytest.fixture
def linked_site(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(TEST_FILES / "MR_small.dcm", outside / "elsewhere.dcm")
    folder = tmp_path / "site"
    folder.mkdir()
    shutil.copy(TEST_FILES / "CT_small.dcm", folder / "CT_small.dcm")
    (folder / "out.dcm").symlink_to(outside / "elsewhere.dcm")
    (folder / "in.dcm").symlink_to(folder / "CT_small.dcm")
    (folder / "linked").symlink_to(outside, target_is_directory=True)
    return folder


def test_a_link_leads_plain_pydicom_out_of_the_site_folder(linked_site):
    ds = pydicom.dcmread(linked_site / "out.dcm")

    assert ds.Modality == "MR"  # the file outside, read as if it were the site's


def test_every_symbolic_link_is_refused_with_a_reason(linked_site):
    report = scan_folder(linked_site)

    assert [(q.path, q.reason) for q in report.quarantined] == [
        ("in.dcm", "symbolic-link"),
        ("linked", "symbolic-link"),
        ("out.dcm", "symbolic-link"),
    ]
    assert all("copy the file itself" in q.detail for q in report.quarantined)
    assert [a.path for a in report.accepted] == ["CT_small.dcm"]


def test_a_folder_swapped_for_a_link_after_listing_is_refused(tmp_path, monkeypatch):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(TEST_FILES / "CT_small.dcm", outside / "x.dcm")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sub").symlink_to(outside, target_is_directory=True)  # was a folder when listed
    monkeypatch.chdir(site)

    with pytest.raises(DicomRejected) as caught:
        open_unlinked(Path("sub/x.dcm"))

    assert Path("sub/x.dcm").read_bytes()  # plain open follows the link
    assert caught.value.code == "symbolic-link" and "linked folder sub" in caught.value.reason


def test_a_link_is_refused_by_the_ingest_pass(linked_site):
    results = ingest_files(
        linked_site,
        ["out.dcm", "CT_small.dcm"],
        transform=None,
        workers=1,
        timeout_s=20,
        max_bytes=MIB,
    )

    assert results["out.dcm"].verdict.reason == "symbolic-link"  # type: ignore[union-attr]
    assert isinstance(results["CT_small.dcm"].verdict, AcceptedFile)


# ---------------------------------------------------------------- pixel bombs


def test_decoded_pixels_are_capped_at_1_gib_whatever_the_size_cap(tmp_path):
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    ds.Rows = ds.Columns = 4096
    ds.NumberOfFrames = 40  # 1.25 GiB of 16-bit pixels; 16 times a 2 GiB cap allowed it
    ds.save_as(tmp_path / "big.dcm")

    result = check_file(tmp_path / "big.dcm", max_bytes=2**31)

    assert decoded_cap(2**31) == MAX_DECODED_BYTES == 2**30 and decoded_cap(MIB) == 16 * MIB
    assert result.reason == "too-large"  # type: ignore[union-attr]
    assert "decode to 1342177280 bytes, over the cap of 1073741824" in result.detail  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("name", "declared"),
    [
        ("JPGExtended.dcm", "1024 x 256 x 1"),  # JPEG SOF
        ("MR_small_jp2klossless.dcm", "64 x 64 x 1"),  # JPEG 2000 SIZ
        ("MR_small_jpeg_ls_lossless.dcm", "64 x 64 x 1"),  # JPEG-LS SOF55
    ],
)
def test_a_codestream_larger_than_its_header_is_refused_before_decoding(tmp_path, name, declared):
    ds = pydicom.dcmread(TEST_FILES / name)
    ds.Rows, ds.Columns = ds.Rows // 2, ds.Columns // 2  # the decoder allocates 4x this
    ds.save_as(tmp_path / name)

    result = check_file(tmp_path / name, max_bytes=MIB)

    assert result.reason == "too-large"  # type: ignore[union-attr]
    assert f"fragment 1 declares {declared}" in result.detail  # type: ignore[union-attr]


# ---------------------------------------------------------------- worker memory limit


def _rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        line = next(line for line in fh if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _measured_check(out: Path, path: Path, *, max_bytes: int) -> AcceptedFile | QuarantinedFile:
    """check_file, noting how far the worker's peak memory rose above its memory before.

    Two rises: resident memory (which may also grow into pages the worker had mapped but not
    touched before) and address space (what the limit caps).
    """
    before, mapped = _rss_bytes(), _vm_kib("VmSize")
    result = check_file(path, max_bytes=max_bytes)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    (out / f"{path.name}.rise").write_text(str(peak - before))
    (out / f"{path.name}.mapped").write_text(str(_vm_kib("VmPeak") - mapped))
    return result


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("limited", [False, True])
def test_a_worker_memory_limit_stops_an_explosion_the_checks_let_through(site, tmp_path, limited):
    out = tmp_path / "rise"
    out.mkdir()
    budget = 32 * MIB if limited else 2**34  # the bomb needs 2 x 48 MiB to parse

    report = scan_folder(  # a 1 GiB size cap lets the bomb inflate past the checks
        site, max_bytes=2**30, worker_memory_bytes=budget, _check=partial(_measured_check, out)
    )

    rise = int((out / "bomb.dcm.rise").read_text())
    assert sorted(a.path for a in report.accepted) == sorted(LEGIT) + (
        [] if limited else ["bomb.dcm"]
    )
    if limited:
        (quarantined,) = report.quarantined
        assert (quarantined.path, quarantined.reason) == ("bomb.dcm", "out-of-memory")
        assert "worker address-space limit" in quarantined.detail
        mapped = int((out / "bomb.dcm.mapped").read_text())
        assert mapped < 32 * MIB  # the address space stayed under the limit
        assert rise < BOMB_INFLATED  # the 2 x 48 MiB explosion was stopped before one copy
    else:
        assert rise > BOMB_INFLATED  # under a loose limit, the worker took what the bomb asked


def _allocate(size: str) -> str:
    try:
        return str(len(bytearray(int(size))))
    except MemoryError:
        return "MemoryError"


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_a_worker_allocation_past_its_limit_raises_memory_error(tmp_path):
    results = run_in_workers(
        _allocate,
        [str(MIB), str(512 * MIB), str(MIB)],
        cwd=tmp_path,
        workers=1,
        timeout_s=20,
        on_lost=lambda item, kind, detail: f"lost: {detail}",
        memory_limit_bytes=64 * MIB,
    )

    assert results == [str(MIB), "MemoryError", str(MIB)]  # the worker lives on


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
def test_the_limit_is_relative_to_what_a_process_maps_already():
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    pid = os.fork()
    if pid == 0:  # child: set a limit, then exit with whether it is as documented
        limit = limit_address_space(16 * MIB)
        ok = limit is not None and resource.getrlimit(resource.RLIMIT_AS)[0] == limit
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)

    assert os.waitstatus_to_exitcode(status) == 0
    assert resource.getrlimit(resource.RLIMIT_AS) == (soft, hard)  # the parent is untouched


def test_worker_memory_defaults_and_checks():
    assert default_worker_memory(MIB) == 2**30 + 4 * MIB + 256 * MIB
    assert default_worker_memory(256 * MIB) == 2**30 + 2**30 + 16 * 2**30
    assert check_worker_memory(None, MIB) == default_worker_memory(MIB)
    assert check_worker_memory(5 * MIB, MIB) == 5 * MIB
    with pytest.raises(ConfigError, match="must be positive, not 0 bytes; leave it unset"):
        check_worker_memory(0, MIB)
