"""Reading one DICOM file safely: header, attributes kept at the site, decoded pixels.

Never ``force=True``: a file without a DICOM preamble is rejected, not guessed at. Pixel data
length is checked against the geometry and the pixels are decoded before a file is accepted,
because pydicom reads a truncated file without complaint until ``pixel_array`` is touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

from fedrad.errors import FedradError


class DicomRejected(FedradError):
    """A file cannot be used as training data; ``reason`` says why."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class DicomHeader:
    """What a site needs from a header; patient attributes never leave the site as they are."""

    path: Path
    sop_instance_uid: str
    series_uid: str
    study_uid: str
    modality: str
    manufacturer: str
    sex: str
    age_years: int | None
    position_z: float | None
    instance_number: int | None


def _age_years(value: str) -> int | None:
    """Parse a DICOM Age String (``045Y``, ``006M``, ``003W``, ``010D``) into whole years."""
    if len(value) != 4 or not value[:3].isdigit():
        return None
    number, unit = int(value[:3]), value[3].upper()
    factor = {"Y": 1.0, "M": 1 / 12, "W": 1 / 52, "D": 1 / 365}.get(unit)
    return None if factor is None else int(number * factor)


def read_header(path: Path) -> DicomHeader:
    """Read a file's header without pixels; raise DicomRejected if it is not usable DICOM."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, ValueError, KeyError, TypeError, EOFError) as exc:
        raise DicomRejected(path, f"not a readable DICOM file ({exc.__class__.__name__})") from None
    for tag in ("SOPInstanceUID", "Rows", "Columns"):
        if tag not in ds:
            raise DicomRejected(path, f"required tag {tag} missing")
    position = ds.get("ImagePositionPatient")
    return DicomHeader(
        path=path,
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        modality=str(ds.get("Modality", "OT")).upper(),
        manufacturer=str(ds.get("Manufacturer", "")),
        sex=str(ds.get("PatientSex", "")).upper(),
        age_years=_age_years(str(ds.get("PatientAge", ""))),
        position_z=float(position[2]) if position is not None and len(position) == 3 else None,
        instance_number=int(ds.InstanceNumber) if "InstanceNumber" in ds else None,
    )


def _expected_length(ds: Dataset) -> int:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1))
    bits = int(ds.get("BitsAllocated", 8))
    bits_total = int(ds.Rows) * int(ds.Columns) * samples * frames * bits
    return (bits_total + 7) // 8


def read_pixels(path: Path) -> np.ndarray:
    """Decode one file's pixels into float32 modality values (e.g. Hounsfield units for CT).

    Returns an array of shape ``(H, W)`` for grey-scale, ``(H, W, 3)`` for colour; a
    multi-frame file yields ``(F, H, W)``. MONOCHROME1 is inverted so that high is bright.
    """
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, ValueError, KeyError, TypeError, EOFError) as exc:
        raise DicomRejected(path, f"not a readable DICOM file ({exc.__class__.__name__})") from None
    if "PixelData" not in ds:
        raise DicomRejected(path, "no pixel data (not an image object)")
    if not ds.file_meta.TransferSyntaxUID.is_compressed:
        expected, actual = _expected_length(ds), len(ds.PixelData)
        if actual < expected:
            raise DicomRejected(
                path, f"pixel data has {actual} bytes, geometry needs {expected} (truncated?)"
            )
    try:
        pixels = ds.pixel_array
        values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - any decoder failure means "reject this file"
        raise DicomRejected(path, f"pixel data cannot be decoded ({exc})") from None
    if not np.isfinite(values).all():
        raise DicomRejected(path, "pixel data holds non-finite values")
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        values = values.max() - values
    return values
