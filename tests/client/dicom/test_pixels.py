"""The fast paths of client.dicom.pixels (native grey-scale decode, rescale) equal plain pydicom."""

import logging
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from client.dicom import DicomRejected, read_pixels

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
ALL_TEST_FILES = sorted(p for p in TEST_FILES.rglob("*") if p.is_file())


def _pydicom_values(path: Path) -> np.ndarray:
    """What read_pixels must return, computed with pydicom alone."""
    ds = pydicom.dcmread(path)
    values = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        values = values.max() - values
    return values


@pytest.fixture(autouse=True)
def _quiet_pydicom() -> None:
    logging.getLogger("pydicom").setLevel(logging.CRITICAL)


@pytest.mark.parametrize("path", ALL_TEST_FILES, ids=lambda p: p.relative_to(TEST_FILES).as_posix())
def test_every_accepted_pydicom_file_reads_as_plain_pydicom_does(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            values = read_pixels(path)
        except DicomRejected:
            pytest.skip("refused by the checks")
        expected = _pydicom_values(path)

    assert values.dtype == np.float32
    np.testing.assert_array_equal(values, expected)


def _write(tmp_path: Path, pixels: np.ndarray, *, implicit: bool, **attributes: object) -> Path:
    """A grey-scale CT_small copy holding ``pixels`` (raw bytes) and ``attributes``."""
    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    data = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    ds.PixelData = data + b"\0" * (len(data) % 2)
    ds["PixelData"].VR = "OB" if ds.BitsAllocated == 8 else "OW"
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    for keyword, value in attributes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    path = tmp_path / "image.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


RNG = np.random.default_rng(7)
CASES = {
    "uint16-12-bits-stored": (RNG.integers(0, 2**16, (9, 7), dtype=np.uint16), {"BitsStored": 12}),
    "int16-12-bits-stored": (
        RNG.integers(-(2**15), 2**15, (9, 7), dtype=np.int16),
        {"BitsStored": 12},
    ),
    "uint8-odd-length": (RNG.integers(0, 256, (3, 5), dtype=np.uint8), {}),
    "int8-5-bits-stored": (RNG.integers(-128, 128, (4, 4), dtype=np.int8), {"BitsStored": 5}),
    "uint32": (RNG.integers(0, 2**32, (6, 6), dtype=np.uint32), {}),
    "int32-20-bits-stored": (
        RNG.integers(-(2**31), 2**31, (6, 6), dtype=np.int32),
        {"BitsStored": 20},
    ),
    "multi-frame": (RNG.integers(0, 4096, (3, 8, 8), dtype=np.uint16), {}),
    "monochrome1-rescaled": (
        RNG.integers(0, 4096, (8, 8), dtype=np.uint16),
        {
            "PhotometricInterpretation": "MONOCHROME1",
            "RescaleSlope": "0.37",
            "RescaleIntercept": "-12.5",
        },
    ),
    "identity-rescale": (
        RNG.integers(0, 2**16, (8, 8), dtype=np.uint16),
        {"RescaleSlope": "1", "RescaleIntercept": "0"},
    ),
    "slope-only": (RNG.integers(0, 4096, (8, 8), dtype=np.uint16), {"RescaleIntercept": None}),
    "no-rescale": (
        RNG.integers(-500, 500, (8, 8), dtype=np.int16),
        {"RescaleSlope": None, "RescaleIntercept": None},
    ),
    "implicit-vr": (RNG.integers(0, 4096, (8, 8), dtype=np.uint16), {}),
}


@pytest.mark.parametrize("name", CASES)
def test_native_grey_scale_variants_read_as_plain_pydicom_does(tmp_path, name):
    pixels, attributes = CASES[name]
    path = _write(tmp_path, pixels, implicit=name == "implicit-vr", **attributes)

    values = read_pixels(path)

    np.testing.assert_array_equal(values, _pydicom_values(path))
