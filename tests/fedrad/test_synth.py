"""Tests of the synthetic consortium writer (fedrad.synth)."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from dataclasses import replace
from datetime import date
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import dcmread, dcmwrite
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
)

from fedrad.synth import (
    HARD_SUBGROUP,
    LABELS_HEADER,
    SynthConfig,
    SynthSummary,
    write_consortium,
)
from fedrad.synth import dicom as synth_dicom
from fedrad.synth.config import MAX_HOLDOUT, MAX_SITES
from fedrad.synth.identity import IDENTITY_FOLDER
from fedrad.synth.shapes import blur
from fedrad.synth.sites import draw_site_profiles

SMALL = SynthConfig(sites=2, seed=11, holdout=0.2, image_size=32, slices=8, samples_per_site=30)
KINDS = ["2d", "3d"]
REQUIRED_TAGS = [
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "InstitutionName",
    "PatientID",
    "PatientName",
    "PatientSex",
    "PatientAge",
    "PatientBirthDate",
    "StudyDate",
    "SeriesDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "SeriesNumber",
    "InstanceNumber",
    "Rows",
    "Columns",
    "PixelSpacing",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "WindowCenter",
    "WindowWidth",
    "PixelData",
]
CT_TAGS = [
    "SliceThickness",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceLocation",
    "RescaleIntercept",
    "RescaleSlope",
    "FrameOfReferenceUID",
]
SOP_CLASSES = {
    "CR": ComputedRadiographyImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
    "CT": CTImageStorage,
}


# ---------------------------------------------------------------- helpers


def read_labels(folder: Path) -> list[dict[str, str]]:
    with open(folder / "labels.csv", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def all_files(root: Path) -> dict[str, bytes]:
    """Every written file but the identity keys, which are fresh randomness by design."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and IDENTITY_FOLDER not in p.relative_to(root).parts
    }


def series_files(folder: Path) -> dict[str, list[Path]]:
    """Map SeriesInstanceUID to its slice files, read from the DICOM headers."""
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("series/*/*.dcm")):
        uid = dcmread(path, stop_before_pixels=True).SeriesInstanceUID
        found.setdefault(uid, []).append(path)
    return found


def load_samples(folder: Path, kind: str) -> dict[str, tuple[str, str, np.ndarray]]:
    """Map each sample's path (2D file, 3D series folder) to (label, sex, pixels by z)."""
    labels = {row["id"]: row["label"] for row in read_labels(folder)}
    samples = {}
    if kind == "2d":
        for sample_id, label in labels.items():
            ds = dcmread(folder / sample_id)
            samples[sample_id] = (label, ds.PatientSex, ds.pixel_array.astype(float))
        return samples
    for series_dir in sorted((folder / "series").iterdir()):
        slices = sorted(
            (dcmread(p) for p in series_dir.glob("*.dcm")),
            key=lambda ds: float(ds.ImagePositionPatient[2]),
        )
        pixels = np.stack([ds.pixel_array for ds in slices]).astype(float)
        samples[series_dir.name] = (
            labels[slices[0].SeriesInstanceUID],
            slices[0].PatientSex,
            pixels,
        )
    return samples


def rank_auc(positives: list[float], negatives: list[float]) -> float:
    pos, neg = np.asarray(positives)[:, None], np.asarray(negatives)[None, :]
    return float((pos > neg).mean() + 0.5 * (pos == neg).mean())


def blob_score(image: np.ndarray) -> float:
    """Brightest compact blob ringed by lung: ``fine - max(ring)`` where the ring is dark.

    Scanned per slice over rings 1 and 2 (x image_size / 32) pixels out; requiring a
    dark ring skips the body edges and the spine, which are bright on one side.
    """
    scale = image.shape[-1] / 32
    lead = image.ndim - 2
    fine = blur(image, (0.0,) * lead + (0.5 * scale, 0.5 * scale))
    rows, cols = image.shape[-2:]
    centre = fine[..., rows // 4 : 3 * rows // 4, cols // 8 : 7 * cols // 8]
    lung, body = np.percentile(centre, [20, 90])
    best = 0.0
    for step in (max(1, round(scale)), max(1, round(2 * scale))):
        padded = np.pad(fine, [(0, 0)] * lead + [(step, step), (step, step)], mode="edge")
        ring = np.max(
            [
                padded[..., step + dy : step + dy + rows, step + dx : step + dx + cols]
                for dy in (-step, 0, step)
                for dx in (-step, 0, step)
                if dy or dx
            ],
            axis=0,
        )
        ringed_by_lung = ring < (lung + body) / 2
        if ringed_by_lung.any():
            best = max(best, float((fine - ring)[ringed_by_lung].max()))
    return best


def age_on(birth: str, day: str) -> int:
    born = date(int(birth[:4]), int(birth[4:6]), int(birth[6:]))
    then = date(int(day[:4]), int(day[4:6]), int(day[6:]))
    return then.year - born.year - ((then.month, then.day) < (born.month, born.day))


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", params=KINDS)
def written(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[SynthSummary, SynthConfig]:
    config = replace(SMALL, kind=request.param)
    out = tmp_path_factory.mktemp(f"consortium-{request.param}")
    return write_consortium(out, config), config


# ---------------------------------------------------------------- layout and labels


def test_folders_and_labels_exist(written: tuple[SynthSummary, SynthConfig]) -> None:
    # Prepare
    summary, config = written

    # Execute
    names = sorted(p.name for p in summary.out_dir.iterdir())

    # Assert
    assert names == [IDENTITY_FOLDER, "holdout", "site-1", "site-2"]
    for folder in [s.folder for s in summary.sites] + [summary.holdout_folder]:
        assert folder is not None
        header = (folder / "labels.csv").read_text(encoding="utf-8").splitlines()[0]
        assert tuple(header.split(",")) == LABELS_HEADER
        assert {row["label"] for row in read_labels(folder)} == {"0", "1"}


def test_splits_are_stratified_in_sites_and_test_in_holdout(
    written: tuple[SynthSummary, SynthConfig],
) -> None:
    # Prepare
    summary, _ = written

    # Execute
    site_rows = [read_labels(site.folder) for site in summary.sites]
    holdout_rows = read_labels(summary.holdout_folder)  # type: ignore[arg-type]

    # Assert
    for rows in site_rows:
        for label in ("0", "1"):
            splits = [r["split"] for r in rows if r["label"] == label]
            assert set(splits) == {"train", "val"}
            assert splits.count("val") == round(0.2 * len(splits))
    assert {r["split"] for r in holdout_rows} == {"test"}


def test_every_id_resolves(written: tuple[SynthSummary, SynthConfig]) -> None:
    # Prepare
    summary, config = written
    folders = [s.folder for s in summary.sites] + [summary.holdout_folder]

    for folder in folders:
        assert folder is not None
        # Execute
        rows = read_labels(folder)

        # Assert
        ids = [row["id"] for row in rows]
        assert len(set(ids)) == len(ids)
        if config.kind == "2d":
            assert all(re.fullmatch(r"images/[^/\\]+\.dcm", i) for i in ids)
            assert all((folder / i).is_file() for i in ids)
            assert len(list(folder.rglob("*.dcm"))) == len(ids)
        else:
            series = series_files(folder)
            assert set(series) == set(ids)
            assert all(len(series[i]) == config.slices for i in ids)


def test_every_file_is_valid_dicom_with_required_tags(
    written: tuple[SynthSummary, SynthConfig],
) -> None:
    # Prepare
    summary, config = written
    paths = sorted(summary.out_dir.rglob("*.dcm"))

    for path in paths:
        # Execute
        raw = path.read_bytes()
        ds = pydicom.dcmread(path)

        # Assert
        assert raw[128:132] == b"DICM"
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        missing = [
            t for t in REQUIRED_TAGS + (CT_TAGS if config.kind == "3d" else []) if t not in ds
        ]
        assert not missing, f"{path} lacks {missing}"
        assert ds.SOPClassUID == SOP_CLASSES[ds.Modality]
        assert ds.pixel_array.shape == (ds.Rows, ds.Columns)
        assert len(ds.PixelData) == ds.Rows * ds.Columns * 2
        assert (ds.SamplesPerPixel, ds.PhotometricInterpretation) == (1, "MONOCHROME2")
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit) == (16, 12, 11)
        assert ds.pixel_array.max() <= 4095


def test_modalities_and_ct_intensities(written: tuple[SynthSummary, SynthConfig]) -> None:
    # Prepare
    summary, config = written
    files = sorted(summary.sites[0].folder.rglob("*.dcm"))[:40]

    # Execute
    datasets = [dcmread(p) for p in files]
    hu = np.concatenate(
        [
            (ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)).ravel()
            for ds in datasets
        ]
    )

    # Assert
    modalities = {ds.Modality for ds in datasets}
    if config.kind == "2d":
        assert modalities <= {"CR", "DX"}
    else:
        assert modalities == {"CT"}
        assert {float(ds.RescaleIntercept) for ds in datasets} == {-1024.0}
        assert np.percentile(hu, 1) < -900 and np.percentile(hu, 99.9) > 200
        assert hu.min() >= -1024 and hu.max() < 1000


def test_patients_are_plausible(written: tuple[SynthSummary, SynthConfig]) -> None:
    # Prepare
    summary, _ = written
    files = sorted(summary.out_dir.rglob("*.dcm"))

    # Execute
    headers = [dcmread(p, stop_before_pixels=True) for p in files]

    # Assert
    assert {ds.PatientSex for ds in headers} == {"M", "F"}
    for ds in headers:
        assert re.fullmatch(r"0(1[89]|[2-8]\d|90)Y", ds.PatientAge)
        assert age_on(ds.PatientBirthDate, ds.StudyDate) == int(ds.PatientAge[:3])
        assert str(ds.PatientName).startswith("SYN^P")


def test_summary_matches_disk_and_is_json(written: tuple[SynthSummary, SynthConfig]) -> None:
    # Prepare
    summary, config = written

    # Execute
    data = json.loads(json.dumps(summary.to_dict()))

    # Assert
    per_sample = 1 if config.kind == "2d" else config.slices
    for site in summary.sites:
        rows = read_labels(site.folder)
        assert site.n_samples == len(rows)
        assert site.n_files == len(rows) * per_sample
        assert site.prevalence == round(sum(r["label"] == "1" for r in rows) / len(rows), 4)
    holdout = read_labels(summary.holdout_folder)  # type: ignore[arg-type]
    assert summary.holdout_samples == len(holdout)
    assert data["hard_subgroup"] == HARD_SUBGROUP == "PatientSex=F"
    assert data["sites"][0]["folder"] == str(summary.sites[0].folder)


def test_holdout_is_a_fraction_of_the_whole_from_every_site(
    written: tuple[SynthSummary, SynthConfig],
) -> None:
    # Prepare
    summary, config = written
    in_sites = sum(site.n_samples for site in summary.sites)

    # Execute
    manufacturers = {
        dcmread(p, stop_before_pixels=True).Manufacturer
        for p in summary.holdout_folder.rglob("*.dcm")
    }  # type: ignore[union-attr]

    # Assert
    share = summary.holdout_samples / (summary.holdout_samples + in_sites)
    assert share == pytest.approx(config.holdout, abs=0.01)
    assert manufacturers == {site.manufacturer for site in summary.sites}


# ---------------------------------------------------------------- determinism


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_gives_identical_bytes(tmp_path: Path, kind: str) -> None:
    # Prepare
    config = replace(SMALL, kind=kind, sites=1, samples_per_site=20)

    # Execute
    write_consortium(tmp_path / "a", config)
    write_consortium(tmp_path / "b", config)
    write_consortium(tmp_path / "c", replace(config, seed=config.seed + 1))

    # Assert
    first, second = all_files(tmp_path / "a"), all_files(tmp_path / "b")
    assert first == second
    assert first != all_files(tmp_path / "c")


# ---------------------------------------------------------------- heterogeneity


@pytest.mark.parametrize("kind", KINDS)
def test_sites_differ(kind: str) -> None:
    # Prepare
    config = replace(SMALL, kind=kind, sites=4, samples_per_site=200)

    # Execute
    sites = draw_site_profiles(config)

    # Assert
    assert len({s.manufacturer for s in sites}) == 4
    assert len({s.institution for s in sites}) == 4
    assert len({round(s.n_positive / s.n_samples, 2) for s in sites}) == 4
    assert len({s.n_samples for s in sites}) == 4
    assert len({s.noise for s in sites}) == 4
    assert all(0.5 * 200 <= s.n_samples <= 1.5 * 200 for s in sites)
    assert all(0.19 <= s.n_positive / s.n_samples <= 0.61 for s in sites)
    assert all(28 <= s.size <= 40 for s in sites)


def test_written_sites_differ(written: tuple[SynthSummary, SynthConfig]) -> None:
    # Prepare
    summary, _ = written

    # Execute
    first, second = summary.sites

    # Assert
    assert first.manufacturer != second.manufacturer
    assert first.prevalence != second.prevalence
    assert first.n_samples != second.n_samples


# ---------------------------------------------------------------- 3D geometry


@pytest.mark.parametrize("written", ["3d"], indirect=True)
def test_ct_slices_are_shuffled_on_disk_and_stacked_by_position(
    written: tuple[SynthSummary, SynthConfig],
) -> None:
    # Prepare
    summary, config = written
    series_dirs = sorted((summary.sites[0].folder / "series").iterdir())

    for series_dir in series_dirs:
        # Execute
        by_name = [
            dcmread(series_dir / f"slice-{k}.dcm", stop_before_pixels=True)
            for k in range(1, config.slices + 1)
        ]
        by_position = sorted(by_name, key=lambda ds: int(ds.InstanceNumber))

        # Assert
        assert [int(ds.InstanceNumber) for ds in by_name] != list(range(1, config.slices + 1))
        assert [int(ds.InstanceNumber) for ds in by_position] == list(range(1, config.slices + 1))
        z = np.array([float(ds.ImagePositionPatient[2]) for ds in by_position])
        assert np.allclose(np.diff(z), float(by_name[0].SliceThickness))
        assert np.allclose(z, [float(ds.SliceLocation) for ds in by_position])
        assert len({(ds.StudyInstanceUID, ds.SeriesInstanceUID) for ds in by_name}) == 1
        assert len({ds.SOPInstanceUID for ds in by_name}) == config.slices
        assert all(
            [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0] for ds in by_name
        )


# ---------------------------------------------------------------- the finding


@pytest.mark.parametrize("kind", KINDS)
def test_finding_is_visible_to_a_simple_statistic(tmp_path: Path, kind: str) -> None:
    # Prepare
    config = SynthConfig(
        sites=1,
        seed=5,
        kind=kind,
        image_size=48,
        slices=8,
        samples_per_site=120 if kind == "2d" else 40,
        subgroup_difficulty=0.0,
    )
    folder = write_consortium(tmp_path, config).sites[0].folder

    # Execute
    scores: dict[str, list[float]] = {"0": [], "1": []}
    for label, _, pixels in load_samples(folder, kind).values():
        scores[label].append(blob_score(pixels))
    positives, negatives = np.array(scores["1"]), np.array(scores["0"])

    # Assert: many findings are obvious, many faint (a CNN is needed for those)
    assert positives.mean() > 1.5 * negatives.mean()
    assert np.mean(positives > np.percentile(negatives, 95)) > 0.15
    assert rank_auc(scores["1"], scores["0"]) > 0.55


@pytest.mark.parametrize("kind", KINDS)
def test_hard_subgroup_findings_are_fainter(tmp_path: Path, kind: str) -> None:
    # Prepare: the same consortium with and without the subgroup effect
    config = SynthConfig(
        sites=1,
        seed=9,
        kind=kind,
        image_size=32,
        slices=8,
        samples_per_site=40,
        subgroup_difficulty=0.0,
    )
    easy = load_samples(write_consortium(tmp_path / "easy", config).sites[0].folder, kind)
    hard_config = replace(config, subgroup_difficulty=1.0)
    hard = load_samples(write_consortium(tmp_path / "hard", hard_config).sites[0].folder, kind)

    # Execute: the pixel difference is the finding contrast the subgroup lost
    lost: dict[tuple[str, str], list[float]] = {}
    for key, (label, sex, pixels) in easy.items():
        assert hard[key][:2] == (label, sex)
        lost.setdefault((label, sex), []).append(float((pixels - hard[key][2]).sum()))

    # Assert
    assert len(lost[("1", "F")]) >= 3
    assert all(v > 0 for v in lost[("1", "F")])
    for group in [("1", "M"), ("0", "M"), ("0", "F")]:
        assert all(v == 0 for v in lost[group])


# ---------------------------------------------------------------- writer equivalence


@pytest.mark.parametrize("kind", KINDS)
def test_writer_matches_dcmwrite_byte_for_byte(tmp_path: Path, kind: str) -> None:
    # Prepare
    site = draw_site_profiles(replace(SMALL, kind=kind))[0]
    template = synth_dicom.xray_template(site) if kind == "2d" else synth_dicom.ct_template(site)
    tags = synth_dicom.StudyTags(
        7,
        "F",
        64,
        "19600203",
        "20240305",
        "101500",
        *(synth_dicom.make_uid("test", w) for w in "abc"),
    )
    study = synth_dicom.study_dataset(tags, site.modality)
    pixels = np.arange(site.size**2, dtype=np.uint16).reshape(site.size, site.size) % 4096
    instance = synth_dicom.instance_dataset(synth_dicom.make_uid("test", "sop"), pixels)
    if kind == "3d":
        synth_dicom.set_slice_position(instance, template, 2, 8)
    merged = template.copy()
    merged.update(study)
    merged.update(instance)
    merged.file_meta = FileMetaDataset()
    merged.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    expected = io.BytesIO()
    dcmwrite(expected, merged, enforce_file_format=True)
    writer = synth_dicom.InstanceWriter(template)

    # Execute
    writer.write(tmp_path / "x.dcm", synth_dicom.encode_elements(study, writer.encoding), instance)

    # Assert
    assert (tmp_path / "x.dcm").read_bytes() == expected.getvalue()


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("sites", 0),
        ("sites", MAX_SITES + 1),
        ("sites", 2.0),
        ("sites", True),
        ("seed", -1),
        ("seed", "1"),
        ("kind", "4d"),
        ("kind", "2D"),
        ("holdout", -0.1),
        ("holdout", MAX_HOLDOUT),
        ("holdout", float("nan")),
        ("holdout", "0.2"),
        ("image_size", 8),
        ("image_size", 4096),
        ("slices", 2),
        ("samples_per_site", 10),
        ("subgroup_difficulty", -0.5),
        ("subgroup_difficulty", 1.5),
    ],
)
def test_invalid_config_names_the_field_and_a_fix(field: str, value: object) -> None:
    # Prepare
    arguments = {field: value}

    # Execute / Assert
    with pytest.raises(ValueError, match=rf"^{field} must be .+: .+") as caught:
        SynthConfig(**arguments)  # type: ignore[arg-type]
    assert repr(value) in str(caught.value)


def test_valid_edges_are_accepted() -> None:
    # Prepare / Execute
    config = SynthConfig(sites=64, holdout=0.89, subgroup_difficulty=1.0, samples_per_site=20)

    # Assert
    assert config.subgroup_contrast_factor == pytest.approx(0.4)


# ---------------------------------------------------------------- refusing to overwrite


TINY = SynthConfig(sites=2, seed=1, image_size=16, samples_per_site=20)


def test_refuses_a_foreign_non_empty_directory(tmp_path: Path) -> None:
    # Prepare
    (tmp_path / "notes.txt").write_text("mine", encoding="utf-8")

    # Execute / Assert
    with pytest.raises(ValueError, match="does not look like fedrad synth output"):
        write_consortium(tmp_path, TINY, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_refuses_a_site_folder_of_real_dicom(tmp_path: Path) -> None:
    # Prepare: real data laid out like a site
    (tmp_path / "site-1" / "images").mkdir(parents=True)
    real = get_testdata_file("CT_small.dcm")
    assert isinstance(real, str)
    shutil.copy(real, tmp_path / "site-1" / "images" / "a.dcm")

    # Execute / Assert
    with pytest.raises(ValueError, match="site-1"):
        write_consortium(tmp_path, TINY, overwrite=True)
    assert (tmp_path / "site-1" / "images" / "a.dcm").is_file()


def test_refuses_existing_sites_without_overwrite(tmp_path: Path) -> None:
    # Prepare
    write_consortium(tmp_path, TINY)
    before = all_files(tmp_path)

    # Execute / Assert
    with pytest.raises(ValueError, match="overwrite=True"):
        write_consortium(tmp_path, replace(TINY, seed=2))
    assert all_files(tmp_path) == before


def test_overwrite_replaces_only_the_folders_it_writes(tmp_path: Path) -> None:
    # Prepare
    write_consortium(tmp_path, replace(TINY, sites=3))
    third = all_files(tmp_path / "site-3")
    first = all_files(tmp_path / "site-1")

    # Execute
    summary = write_consortium(tmp_path, replace(TINY, seed=2), overwrite=True)

    # Assert
    assert [s.name for s in summary.sites] == ["site-1", "site-2"]
    assert all_files(tmp_path / "site-3") == third
    assert all_files(tmp_path / "site-1") != first


def test_writes_into_an_empty_existing_directory(tmp_path: Path) -> None:
    # Prepare
    out = tmp_path / "empty"
    out.mkdir()

    # Execute
    summary = write_consortium(out, TINY)

    # Assert
    assert summary.holdout_folder is None
    assert summary.holdout_samples == 0
    assert sorted(p.name for p in out.iterdir()) == [IDENTITY_FOLDER, "site-1", "site-2"]


def test_a_hundred_sites_get_distinct_institutions_and_the_first_64_keep_theirs() -> None:
    # Execute: past the 64 named town x kind combinations (bench/scale.py federates 100)
    many = draw_site_profiles(SynthConfig(sites=100, samples_per_site=20))
    few = draw_site_profiles(SynthConfig(sites=64, samples_per_site=20))

    # Assert
    names = [site.institution for site in many]
    assert len(set(names)) == 100
    assert names[64].endswith(" 2") and names[64][: -len(" 2")] in names[:64]
    assert [site.institution for site in few] == names[:64]
