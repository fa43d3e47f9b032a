import gzip
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from client.dicom import DicomRejected
from client.nifti import read_nifti

pytestmark = pytest.mark.timeout(60)

LIMIT = 10_000_000
X, Y, Z = 4, 5, 6
ZOOMS_RAS = (0.5, 0.75, 2.0)


def _ras_volume() -> np.ndarray:
    """data[x, y, z] = 100 z + 10 y + x: each voxel says where it is."""
    x, y, z = np.meshgrid(np.arange(X), np.arange(Y), np.arange(Z), indexing="ij")
    return (100 * z + 10 * y + x).astype(np.float32)


def _stored(storage: str) -> tuple[np.ndarray, np.ndarray]:
    """The same anatomy stored three ways: (data, affine) with identical world positions."""
    ras, (sx, sy, sz) = _ras_volume(), ZOOMS_RAS
    if storage == "ras":
        return ras, np.diag([sx, sy, sz, 1.0])
    if storage == "lps":  # as ITK / dcm2niix write it: x and y voxel axes flipped
        affine = np.array(
            [[-sx, 0, 0, sx * (X - 1)], [0, -sy, 0, sy * (Y - 1)], [0, 0, sz, 0], [0, 0, 0, 1.0]]
        )
        return np.ascontiguousarray(ras[::-1, ::-1, :]), affine
    # sagittal acquisition: voxel axis 0 runs along z, axis 2 along x
    affine = np.array([[0, 0, sx, 0], [0, sy, 0, 0], [sz, 0, 0, 0], [0, 0, 0, 1.0]])
    return np.ascontiguousarray(ras.transpose(2, 1, 0)), affine


def _save(path: Path, data: np.ndarray, affine: np.ndarray | None = None) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("storage", ["ras", "lps", "sagittal"])
def test_3d_volume_has_dicom_layout_whatever_the_storage(tmp_path, storage, suffix):
    data, affine = _stored(storage)
    path = _save(tmp_path / f"vol{suffix}", data, affine)
    d, h, w = np.meshgrid(np.arange(Z), np.arange(Y), np.arange(X), indexing="ij")

    volume = read_nifti(path, max_bytes=LIMIT)

    # D runs inferior -> superior, H anterior -> posterior, W patient right -> left
    assert volume.values.shape == (Z, Y, X)
    assert volume.values.dtype == np.float32
    np.testing.assert_array_equal(volume.values, 100 * d + 10 * (Y - 1 - h) + (X - 1 - w))
    assert volume.spacing == pytest.approx(ZOOMS_RAS[::-1])
    assert volume.modality == "OT"


@pytest.mark.parametrize("shape", [(7, 5), (7, 5, 1), (7, 5, 1, 1)])
def test_2d_image_as_itk_writes_it_keeps_its_picture(tmp_path, shape):
    picture = np.arange(35, dtype=np.float32).reshape(5, 7)  # rows x columns
    data = picture.T.reshape(shape)  # ITK: voxel axis 0 is the column, in LPS
    path = _save(tmp_path / "xray.nii.gz", data, np.diag([-1.0, -1.0, 1.0, 1.0]))

    image = read_nifti(path, max_bytes=LIMIT)

    np.testing.assert_array_equal(image.values, picture)
    assert image.spacing == (1.0, 1.0)


def test_coronal_2d_image_has_superior_at_the_top(tmp_path):
    x, z = np.meshgrid(np.arange(4), np.arange(6), indexing="ij")
    data = (10 * z + x).astype(np.float32).reshape(4, 1, 6)
    path = _save(tmp_path / "coronal.nii", data)

    image = read_nifti(path, max_bytes=LIMIT)

    h, w = np.meshgrid(np.arange(6), np.arange(4), indexing="ij")
    np.testing.assert_array_equal(image.values, 10 * (5 - h) + (3 - w))


def test_scaling_from_header_is_applied(tmp_path):
    image = nib.Nifti1Image(np.full((4, 4, 3), 7, dtype=np.int16), np.eye(4))
    image.header.set_slope_inter(2.0, -1000.0)
    path = tmp_path / "ct.nii.gz"
    nib.save(image, path)

    volume = read_nifti(path, max_bytes=LIMIT)

    np.testing.assert_array_equal(volume.values, np.full((3, 4, 4), -986.0, np.float32))


def test_trailing_singleton_time_axis_is_a_3d_volume(tmp_path):
    data, affine = _stored("ras")
    path = _save(tmp_path / "vol.nii.gz", data[..., None], affine)

    volume = read_nifti(path, max_bytes=LIMIT)

    assert volume.values.shape == (Z, Y, X)


def _truncated(tmp_path: Path, suffix: str) -> Path:
    noise = np.random.default_rng(0).random((24, 24, 24), dtype=np.float32)
    full = _save(tmp_path / f"full{suffix}", noise)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.6)])
    return cut


def _random_bytes(tmp_path: Path, suffix: str) -> Path:
    path = tmp_path / f"noise{suffix}"
    path.write_bytes(np.random.default_rng(1).bytes(2000))
    return path


def _gzip_of_random_bytes(tmp_path: Path, suffix: str) -> Path:
    path = tmp_path / f"noise{suffix}"
    path.write_bytes(gzip.compress(np.random.default_rng(2).bytes(2000)))
    return path


def _four_d(tmp_path: Path, suffix: str) -> Path:
    return _save(tmp_path / f"fmri{suffix}", np.zeros((4, 4, 4, 3), np.float32))


def _nan(tmp_path: Path, suffix: str) -> Path:
    data = np.ones((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    return _save(tmp_path / f"nan{suffix}", data)


def _rgb(tmp_path: Path, suffix: str) -> Path:
    rgb = np.zeros((4, 4, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    return _save(tmp_path / f"rgb{suffix}", rgb)


def _singular_affine(tmp_path: Path, suffix: str) -> Path:
    # nibabel refuses to write a zero affine: patch the header as a broken converter would
    raw = bytearray(_save(tmp_path / "good.nii", np.ones((4, 4, 4), np.float32)).read_bytes())
    struct.pack_into("<hh", raw, 252, 0, 1)  # qform_code 0, sform_code 1 (scanner)
    struct.pack_into("<12f", raw, 280, *[0.0] * 12)  # srow_x, srow_y, srow_z
    path = tmp_path / f"flat{suffix}"
    path.write_bytes(gzip.compress(bytes(raw)) if suffix == ".nii.gz" else bytes(raw))
    return path


def _one_dimensional(tmp_path: Path, suffix: str) -> Path:
    return _save(tmp_path / f"line{suffix}", np.ones((9, 1, 1), np.float32))


def _wrong_name(tmp_path: Path, suffix: str) -> Path:
    return _save(tmp_path / "vol.nii", np.ones((4, 4, 4), np.float32)).rename(tmp_path / "vol.img")


def _missing(tmp_path: Path, suffix: str) -> Path:
    return tmp_path / f"absent{suffix}"


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize(
    ("make", "reason", "code"),
    [
        (_truncated, "truncated", "truncated"),
        (_random_bytes, "not a readable NIfTI", "malformed"),
        (_gzip_of_random_bytes, "not a readable NIfTI", "malformed"),
        (_four_d, "4D image", "unsupported-object"),
        (_nan, "non-finite", "undecodable"),
        (_rgb, "not a real number", "unsupported-object"),
        (_singular_affine, "affine is singular", "malformed"),
        (_one_dimensional, "not a 2D image or 3D volume", "malformed"),
        (_wrong_name, "not a NIfTI file name", "unsupported-object"),
        (_missing, "cannot be opened", "unreadable"),
    ],
)
def test_unusable_file_is_rejected_with_a_reason(tmp_path, make, reason, code, suffix):
    path = make(tmp_path, suffix)

    with pytest.raises(DicomRejected) as caught:
        read_nifti(path, max_bytes=LIMIT)

    assert reason in caught.value.reason
    assert caught.value.code == code
    assert caught.value.path == path


def test_file_larger_than_the_limit_is_rejected(tmp_path):
    path = _save(tmp_path / "vol.nii", np.ones((8, 8, 8), np.float32))

    with pytest.raises(DicomRejected, match="file too large") as caught:
        read_nifti(path, max_bytes=1000)

    assert caught.value.code == "too-large"


def test_small_compressed_file_declaring_a_huge_volume_is_rejected_before_reading(tmp_path):
    path = _save(tmp_path / "bomb.nii.gz", np.zeros((128, 128, 128), np.uint8))
    assert path.stat().st_size < 100_000

    with pytest.raises(DicomRejected, match=r"too large: shape \(128, 128, 128\)"):
        read_nifti(path, max_bytes=1_000_000)
