import argparse
import csv
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import pytest

from client.dataset import load_site
from client.transforms import TransformConfig
from fedrad.commands.import_npz import add_parser
from fedrad.core.errors import ConfigError, DataError
from fedrad.npz_import import MANIFEST_FILE, ImportSummary, import_npz
from fedrad.npz_import.archive import detect_kind

pytestmark = pytest.mark.timeout(120)

SHAPES = {"grey": (28, 28), "rgb": (28, 28, 3), "3d": (8, 28, 28)}
N_TRAIN, N_HOLDOUT = 60, 20


def _arrays(
    kind: str, splits: dict[str, int], *, seed: int = 0, positive: float = 0.5
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in splits.items():
        arrays[f"{split}_images"] = rng.integers(0, 256, (count, *SHAPES[kind]), dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.random((count, 1)) < positive).astype(np.uint8)
    return arrays


def _save(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    np.savez(path, **arrays)
    return path


def _import(archive: Path, out: Path, **options: object) -> ImportSummary:
    settings = {"sites": 3, "split": "iid", "alpha": 0.5, "seed": 0, **options}
    return import_npz(archive, out, **settings)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Imported:
    kind: str
    arrays: dict[str, np.ndarray]
    out: Path
    summary: ImportSummary


@pytest.fixture(scope="module")
def imports(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Imported]:
    """Per kind, once: an archive with train, val and test, imported into 3 iid sites."""
    done: dict[str, Imported] = {}

    def get(kind: str) -> Imported:
        if kind not in done:
            base = tmp_path_factory.mktemp(f"import-{kind}")
            arrays = _arrays(kind, {"train": N_TRAIN, "val": N_HOLDOUT, "test": N_HOLDOUT})
            summary = _import(_save(base / "bench.npz", arrays), base / "out")
            done[kind] = Imported(kind, arrays, base / "out", summary)
        return done[kind]

    return get


@pytest.fixture(params=list(SHAPES))
def imported(request: pytest.FixtureRequest, imports: Callable[[str], Imported]) -> Imported:
    return imports(request.param)


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "labels.csv").open(newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == ["id", "label", "split"]
        return list(reader)


def _read_samples(folder: Path, kind: str) -> dict[str, tuple[np.ndarray, list]]:
    """Per labelled id: its pixels (3D: slices stacked by InstanceNumber) and its datasets."""
    ids = [row["id"] for row in _rows(folder)]
    if kind != "3d":
        return {
            i: (ds.pixel_array, [ds]) for i, ds in ((i, pydicom.dcmread(folder / i)) for i in ids)
        }
    by_series: dict[str, list] = {}
    for ds in map(pydicom.dcmread, sorted(folder.rglob("*.dcm"))):
        by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    result = {}
    for i in ids:
        series = sorted(by_series[i], key=lambda ds: int(ds.InstanceNumber))
        result[i] = (np.stack([ds.pixel_array for ds in series]), series)
    return result


def _read_sample(folder: Path, sample_id: str, kind: str) -> tuple[np.ndarray, list]:
    return _read_samples(folder, kind)[sample_id]


def _folder_pixels(folder: Path, kind: str) -> dict[str, tuple[np.ndarray, int, str]]:
    samples = _read_samples(folder, kind)
    return {
        row["id"]: (samples[row["id"]][0], int(row["label"]), row["split"]) for row in _rows(folder)
    }


def test_every_sample_is_its_source_image_with_its_label(imported):
    sources = {"site": "train", "holdout/val": "val", "holdout/test": "test"}
    for prefix, split in sources.items():
        images, labels = imported.arrays[f"{split}_images"], imported.arrays[f"{split}_labels"]
        expected = {images[i].tobytes(): int(labels[i, 0]) for i in range(len(images))}
        folders = sorted(imported.out.glob(f"{prefix}*"))

        found = [
            (pixels.tobytes(), label)
            for folder in folders
            for pixels, label, _ in _folder_pixels(folder, imported.kind).values()
        ]

        assert len(found) == len(expected)  # each source image exactly once
        assert dict(found) == expected


def test_sample_found_by_id_has_the_source_bytes(imported):
    site = imported.out / "site-2"
    sample_id = _rows(site)[3]["id"]

    pixels, files = _read_sample(site, sample_id, imported.kind)

    index = int(files[0].ImageComments.split("[")[1].rstrip("]"))
    assert files[0].ImageComments.startswith("bench.npz train[")
    assert pixels.dtype == np.uint8
    np.testing.assert_array_equal(pixels, imported.arrays["train_images"][index])
    assert pixels.shape == SHAPES[imported.kind]


def test_files_carry_no_patient_attributes_and_the_site(imported):
    site = imported.out / "site-1"
    files = sorted(site.rglob("*.dcm"))

    ds = pydicom.dcmread(files[0])

    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert (ds.Modality, ds.Manufacturer, ds.InstitutionName) == ("OT", "MedMNIST import", "site-1")
    assert ds.PatientSex == "" and "PatientAge" not in ds
    assert ds.PatientID.startswith("NPZ-site1-")
    assert (ds.BitsAllocated, ds.BitsStored, ds.PixelRepresentation) == (8, 8, 0)
    assert "RescaleIntercept" not in ds
    uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert len(uids) == len(files)


def test_colour_layout_follows_the_kind(imported):
    ds = pydicom.dcmread(next((imported.out / "site-1").rglob("*.dcm")))

    if imported.kind == "rgb":
        assert (ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration) == (
            3,
            "RGB",
            0,
        )
    else:
        assert (ds.SamplesPerPixel, ds.PhotometricInterpretation) == (1, "MONOCHROME2")


def test_3d_volume_is_one_series_ordered_in_space(imports):
    site = imports("3d").out / "site-1"
    sample_id = _rows(site)[0]["id"]

    _, series = _read_sample(site, sample_id, "3d")

    z = [float(ds.ImagePositionPatient[2]) for ds in series]
    assert len(series) == SHAPES["3d"][0]
    assert len({ds.StudyInstanceUID for ds in series}) == 1
    assert len({ds.FrameOfReferenceUID for ds in series}) == 1
    np.testing.assert_allclose(np.diff(z), float(series[0].SliceThickness))
    assert all(list(map(float, ds.ImageOrientationPatient)) == [1, 0, 0, 0, 1, 0] for ds in series)


def test_holdouts_are_whole_splits_marked_test(imported):
    names = [h.name for h in imported.summary.holdouts]

    rows = {name: _rows(imported.out / name) for name in names}

    assert names == ["holdout/val", "holdout/test"]
    assert all(
        len(r) == N_HOLDOUT and {row["split"] for row in r} == {"test"} for r in rows.values()
    )
    assert json.loads((imported.out / MANIFEST_FILE).read_text())["holdouts"][0]["samples"] == 20


def test_iid_sites_are_about_equal_and_split_train_val(imported):
    sizes = [s.n_samples for s in imported.summary.sites]
    splits = [[row["split"] for row in _rows(s.folder)] for s in imported.summary.sites]

    assert sum(sizes) == N_TRAIN and max(sizes) - min(sizes) <= 1
    for site_splits in splits:
        assert site_splits.count("val") == pytest.approx(0.2 * len(site_splits), abs=2)
        assert set(site_splits) == {"train", "val"}


@pytest.mark.parametrize("kind", ["grey", "3d"])
def test_load_site_reads_an_imported_site(imports, kind):
    imported = imports(kind)
    config = (
        TransformConfig(kind="2d", image_size=28, in_channels=1)
        if kind == "grey"
        else TransformConfig(kind="3d", image_size=28, slices=8)
    )

    dataset = load_site(imported.out / "site-1", config, num_classes=2)

    assert len(dataset) == imported.summary.sites[0].n_samples and not dataset.skipped
    assert {s.split for s in dataset.samples} == {"train", "val"}
    assert tuple(dataset[0][0].shape) == (1, *config.spatial_size)


def _site_labels(summary: ImportSummary) -> list[np.ndarray]:
    return [np.array([int(r["label"]) for r in _rows(s.folder)]) for s in summary.sites]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dirichlet_skews_labels_and_keeps_the_minimum(tmp_path, seed):
    archive = _save(tmp_path / "a.npz", _arrays("grey", {"train": 90}, seed=seed))

    summary = _import(archive, tmp_path / "out", split="dirichlet", alpha=0.1, seed=seed)

    positive = [labels.mean() for labels in _site_labels(summary)]
    assert max(positive) - min(positive) > 0.2
    assert min(s.n_samples for s in summary.sites) >= 10
    assert sum(s.n_samples for s in summary.sites) == 90


def test_size_split_gives_unequal_sites(tmp_path):
    archive = _save(tmp_path / "a.npz", _arrays("grey", {"train": 120}))

    summary = _import(archive, tmp_path / "out", sites=4, split="size", alpha=0.5)

    sizes = [s.n_samples for s in summary.sites]
    assert max(sizes) >= 1.5 * min(sizes) and min(sizes) >= 10 and sum(sizes) == 120


def _files(out: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(out)): p.read_bytes()
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }


@pytest.mark.parametrize(("seed_again", "same"), [(0, True), (1, False)])
def test_same_seed_writes_the_same_files(tmp_path, seed_again, same):
    archive = _save(tmp_path / "a.npz", _arrays("grey", {"train": 40, "test": 10}))
    _import(archive, tmp_path / "first", sites=2, split="dirichlet", seed=0)

    _import(archive, tmp_path / "second", sites=2, split="dirichlet", seed=seed_again)

    assert (_files(tmp_path / "first") == _files(tmp_path / "second")) is same


@pytest.mark.parametrize("only", ["test", "val"])
def test_archive_with_one_split_goes_to_the_sites(tmp_path, only):
    archive = _save(tmp_path / "a.npz", _arrays("grey", {only: 40}))

    summary = _import(archive, tmp_path / "out", sites=2)

    assert summary.holdouts == () and not (tmp_path / "out" / "holdout").exists()
    assert sum(s.n_samples for s in summary.sites) == 40
    assert {r["split"] for s in summary.sites for r in _rows(s.folder)} == {"train", "val"}


def test_odd_sized_images_round_trip(tmp_path):
    arrays = {
        "train_images": np.random.default_rng(5).integers(0, 256, (12, 27, 27), np.uint8),
        "train_labels": np.arange(12) % 2,
    }
    summary = _import(_save(tmp_path / "a.npz", arrays), tmp_path / "out", sites=1)

    pixels = _folder_pixels(summary.sites[0].folder, "grey")

    assert sorted(p.tobytes() for p, _, _ in pixels.values()) == sorted(
        i.tobytes() for i in arrays["train_images"]
    )


def test_overwrite_replaces_an_earlier_import(tmp_path):
    archive = _save(tmp_path / "a.npz", _arrays("grey", {"train": 40}))
    _import(archive, tmp_path / "out", sites=4)

    summary = _import(archive, tmp_path / "out", sites=2, overwrite=True)

    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        MANIFEST_FILE,
        "site-1",
        "site-2",
    ]
    assert sum(s.n_samples for s in summary.sites) == 40


@pytest.mark.parametrize(
    ("shape", "kind", "expected"),
    [
        ((5, 28, 28), None, "2d-grey"),
        ((5, 28, 28, 1), None, "2d-grey"),
        ((5, 28, 28, 3), None, "2d-rgb"),
        ((5, 28, 28, 28), None, "3d"),
        ((5, 3, 28, 28), "3d", "3d"),
        ((5, 28, 28, 3), "3d", "3d"),
        ((5, 28, 28, 3), "2d", "2d-rgb"),
    ],
)
def test_kind_from_shape(shape, kind, expected):
    assert detect_kind(shape, kind).label == expected


@pytest.mark.parametrize(
    ("shape", "kind", "phrase"),
    [
        ((5, 3, 28, 28), None, "ambiguous"),
        ((5, 28, 28), "3d", "do not fit"),
        ((5, 8, 28, 28), "2d", "do not fit"),
        ((5, 28), None, "do not fit"),
    ],
)
def test_kind_that_cannot_be_told_is_refused(shape, kind, phrase):
    with pytest.raises(DataError, match=phrase):
        detect_kind(shape, kind)


def _write_archive(arrays: dict[str, np.ndarray]):
    def make(tmp_path: Path) -> Path:
        return _save(tmp_path / "a.npz", arrays)

    return make


def _text_file(tmp_path: Path) -> Path:
    path = tmp_path / "a.npz"
    path.write_text("id,label\n")
    return path


def _npy_file(tmp_path: Path) -> Path:
    path = tmp_path / "a.npz"
    with path.open("wb") as fh:
        np.save(fh, np.zeros(3))
    return path


_GOOD = _arrays("grey", {"train": 40})
_IMAGES = _GOOD["train_images"]


@pytest.mark.parametrize(
    ("make", "options", "error", "phrase"),
    [
        (lambda tmp: tmp / "absent.npz", {}, DataError, "not found"),
        (_text_file, {}, DataError, "not a readable .npz"),
        (_npy_file, {}, DataError, "single array"),
        (_write_archive({"x_images": _IMAGES}), {}, DataError, "holds no MedMNIST split"),
        (_write_archive({"train_images": _IMAGES}), {}, DataError, "no train_labels"),
        (
            _write_archive({"train_images": _IMAGES, "train_labels": np.zeros(39, int)}),
            {},
            DataError,
            "holds 39 labels but its images hold 40",
        ),
        (
            _write_archive({"train_images": _IMAGES, "train_labels": np.zeros((40, 14), int)}),
            {},
            DataError,
            "multi-label",
        ),
        (
            _write_archive({"train_images": _IMAGES, "train_labels": -np.ones(40, int)}),
            {},
            DataError,
            "negative label",
        ),
        (
            _write_archive({"train_images": _IMAGES / 255.0, "train_labels": np.zeros(40, int)}),
            {},
            DataError,
            "uint8",
        ),
        (
            _write_archive(
                {
                    "train_images": _IMAGES,
                    "train_labels": np.zeros(40, int),
                    "test_images": _IMAGES[:, :20],
                    "test_labels": np.zeros(40, int),
                }
            ),
            {},
            DataError,
            "different shapes",
        ),
        (_write_archive(_GOOD), {"alpha": 0.0}, ConfigError, "alpha must be positive"),
        (_write_archive(_GOOD), {"alpha": -1.0}, ConfigError, "alpha must be positive"),
        (_write_archive(_GOOD), {"sites": 0}, ConfigError, "sites must be at least 1"),
        (_write_archive(_GOOD), {"sites": 5}, DataError, "lower --sites to 4"),
        (_write_archive(_GOOD), {"split": "random"}, ConfigError, "split must be one of"),
        (_write_archive(_GOOD), {"modality": "CT"}, ConfigError, "not Hounsfield units"),
        (_write_archive(_GOOD), {"modality": "PET"}, ConfigError, "modality must be one of"),
        (_write_archive(_GOOD), {"val_fraction": 1.0}, ConfigError, "val-fraction"),
    ],
)
def test_bad_input_is_refused_with_a_clear_message(tmp_path, make, options, error, phrase):
    archive = make(tmp_path)

    with pytest.raises(error, match=phrase):
        _import(archive, tmp_path / "out", **options)

    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("overwrite", "phrase"), [(False, "is not empty"), (True, "import-npz did not write")]
)
def test_out_dir_with_other_files_is_left_alone(tmp_path, overwrite, phrase):
    archive = _save(tmp_path / "a.npz", _GOOD)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("keep me")

    with pytest.raises(ConfigError, match=phrase):
        _import(archive, tmp_path / "out", overwrite=overwrite)

    assert [p.name for p in (tmp_path / "out").iterdir()] == ["notes.txt"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedrad")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_command_writes_and_prints_one_line_summary(tmp_path, capsys):
    archive = _save(tmp_path / "a.npz", _arrays("grey", {"train": 40, "test": 10}))
    args = _parser().parse_args(
        [
            "import-npz",
            str(archive),
            str(tmp_path / "out"),
            "--sites",
            "2",
            "--split",
            "size",
            "--modality",
            "cr",
        ]
    )

    code = args.handler(args)

    printed = capsys.readouterr().out
    assert code == 0
    assert "wrote 2 site folder(s) with 40 samples and holdout folder(s) holdout/test (10)" in (
        " ".join(printed.split())
    )
    assert pydicom.dcmread(next((tmp_path / "out" / "site-1").rglob("*.dcm"))).Modality == "CR"


def test_help_states_the_routing_rule(capsys):
    with pytest.raises(SystemExit):
        _parser().parse_args(["import-npz", "--help"])

    assert "holdout/<split>" in capsys.readouterr().out
