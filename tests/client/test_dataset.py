import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from client.dataset import age_band, load_site
from client.transforms import TransformConfig
from fedrad.core.errors import DataError

CONFIG_2D = TransformConfig(kind="2d", image_size=32)
CONFIG_3D = TransformConfig(kind="3d", image_size=32, slices=8)


def test_loads_synth_2d_site(sites_2d):
    dataset = load_site(sites_2d / "site-1", CONFIG_2D, num_classes=2)

    assert len(dataset) > 0 and not dataset.skipped
    image, label = dataset[0]
    assert tuple(image.shape) == (1, 32, 32)
    assert label in (0, 1)
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    assert {s.split for s in dataset.samples} == {"train", "val"}
    assert {s.attributes["sex"] for s in dataset.samples} <= {"M", "F"}


def test_loads_synth_3d_series_in_position_order(sites_3d):
    site = sites_3d / "site-1"
    dataset = load_site(site, CONFIG_3D, num_classes=2)
    sample = dataset.samples[0]
    files = [
        p
        for p in site.rglob("*.dcm")
        if pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID == sample.id
    ]
    by_position = sorted(files, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    expected = np.stack(
        [pydicom.dcmread(p).pixel_array.astype(np.float32).mean() for p in by_position]
    )

    profile = sample.image[0].mean(dim=(1, 2)).numpy()

    assert tuple(sample.image.shape) == (1, 8, 32, 32)
    assert len(files) == 8
    # slice means of the volume follow the position order of the files, not file-name order
    assert np.corrcoef(profile, expected)[0, 1] > 0.9


def _site_from_files(tmp_path: Path, names: list[str]) -> Path:
    site = tmp_path / "site"
    site.mkdir()
    rows = ["id,label"]
    for i, name in enumerate(names):
        shutil.copy(get_testdata_file(name), site / name)
        rows.append(f"{name},{i % 2}")
    (site / "labels.csv").write_text("\n".join(rows) + "\n")
    return site


def test_loads_pydicom_ct_and_mr(tmp_path):
    site = _site_from_files(tmp_path, ["CT_small.dcm", "MR_small.dcm"])

    dataset = load_site(site, CONFIG_2D, num_classes=2)

    assert [s.attributes["modality"] for s in dataset.samples] == ["CT", "MR"]
    assert all(tuple(s.image.shape) == (1, 32, 32) for s in dataset.samples)
    assert all(float(s.image.std()) > 0.01 for s in dataset.samples)


def test_ids_may_be_series_or_study_uids(tmp_path):
    site = _site_from_files(tmp_path, ["CT_small.dcm", "MR_small.dcm"])
    ct = pydicom.dcmread(site / "CT_small.dcm")
    mr = pydicom.dcmread(site / "MR_small.dcm")
    (site / "labels.csv").write_text(
        f"id,label\n{ct.SeriesInstanceUID},1\n{mr.StudyInstanceUID},0\n"
    )

    dataset = load_site(site, CONFIG_2D, num_classes=2)

    assert sorted(s.attributes["modality"] for s in dataset.samples) == ["CT", "MR"]


def test_missing_folder_names_the_fix(tmp_path):
    with pytest.raises(DataError, match="does not exist.*data-dir"):
        load_site(tmp_path / "nope", CONFIG_2D, num_classes=2)


def test_labels_naming_missing_files_are_listed(tmp_path):
    site = _site_from_files(tmp_path, ["CT_small.dcm"])
    (site / "labels.csv").write_text("id,label\nCT_small.dcm,1\nimages/gone.dcm,0\n")

    with pytest.raises(DataError, match=r"1 id\(s\) name no file.*'images/gone.dcm' \(line 3\)"):
        load_site(site, CONFIG_2D, num_classes=2)


def test_site_without_usable_samples_is_refused(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "a.dcm").write_bytes(b"not a dicom file at all" * 10)
    (site / "labels.csv").write_text("id,label\na.dcm,1\n")

    with pytest.raises(DataError, match="no usable samples.*DICOM"):
        load_site(site, CONFIG_2D, num_classes=2)


def test_corrupt_file_is_skipped_with_reason_not_trained_on(tmp_path, caplog):
    site = _site_from_files(tmp_path, ["CT_small.dcm", "MR_small.dcm"])
    data = (site / "MR_small.dcm").read_bytes()
    (site / "MR_small.dcm").write_bytes(data[: len(data) // 2])

    with caplog.at_level("WARNING", logger="client.dataset"):
        dataset = load_site(site, CONFIG_2D, num_classes=2)

    # the site's own console gives the reason counts and the next step
    warning = next(r.getMessage() for r in caplog.records if "skipped 1 sample" in r.getMessage())
    reason_kind = dataset.skipped[0][1].split(":", 1)[0]
    assert f"(1 {reason_kind})" in warning
    assert f"fedrad site check {site}" in warning

    assert [s.id for s in dataset.samples] == ["CT_small.dcm"]
    assert dataset.skipped[0][0] == "MR_small.dcm"
    assert "truncated" in dataset.skipped[0][1] or "decoded" in dataset.skipped[0][1]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("name,label\nx,1\n", "lacks column"),
        ("id,label\nCT_small.dcm,yes\n", "not an integer class"),
        ("id,label,split\nCT_small.dcm,1,holdout\n", "split 'holdout' must be one of"),
        ("id,label\nCT_small.dcm,1\nCT_small.dcm,0\n", "already labelled on line 2"),
        ("id,label\nCT_small.dcm,5\n", "not below num-classes=2"),
    ],
)
def test_bad_labels_file_is_explained(tmp_path, content, message):
    site = _site_from_files(tmp_path, ["CT_small.dcm"])
    (site / "labels.csv").write_text(content)

    with pytest.raises(DataError, match=message):
        load_site(site, CONFIG_2D, num_classes=2)


@pytest.mark.parametrize(
    ("age", "band"), [(None, "unknown"), (5, "0-9"), (45, "40-49"), (97, "90+")]
)
def test_age_band_coarsens(age, band):
    assert age_band(age) == band
