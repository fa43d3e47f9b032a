"""Decoding a checked DICOM image into pixels, then into float32 modality values.

A decoder warning counts as a failure, and decoded pixels must have the declared shape. The
plainest layouts (uncompressed little-endian grey-scale, integer pixels with a linear rescale)
are done here directly, with the same arithmetic as pydicom; everything else goes to pydicom.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut
from pydicom.pixels.utils import pixel_array
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from client.dicom.checks import PixelGeometry, read_checked
from client.dicom.reading import TAGS, element_map, text_value
from client.dicom.reasons import DicomRejected, describe_error

__all__ = ["READ_PIXELS_MAX_BYTES", "decode_pixels", "modality_values", "read_pixels"]

READ_PIXELS_MAX_BYTES = 2**31
"""Size cap of :func:`read_pixels` (the site scan applies its own, smaller cap first)."""
_NATIVE_LITTLE_ENDIAN = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)


def read_pixels(path: Path) -> np.ndarray:
    """Decode one file's pixels into float32 modality values (e.g. Hounsfield units for CT).

    Returns an array of shape ``(H, W)`` for grey-scale, ``(H, W, 3)`` for colour; a
    multi-frame file yields ``(F, H, W)``. MONOCHROME1 is inverted so that high is bright.
    The file passes the same checks as the site scan (``client.scan.check_file``).

    Raises
    ------
    DicomRejected
        When the file fails a check or cannot be decoded.
    """
    checked = read_checked(path, max_bytes=READ_PIXELS_MAX_BYTES)
    pixels = decode_pixels(checked.dataset, checked.geometry, path)
    return modality_values(pixels, checked.dataset, path)


def decode_pixels(ds: Dataset, geometry: PixelGeometry, path: Path) -> np.ndarray:
    """Decode the pixel data and check it has the declared shape and finite values.

    A decoder warning counts as a failure: pydicom warns, then guesses, when the compressed
    data do not fit the header (an RLE segment longer than Rows x Columns, for instance).

    Raises
    ------
    DicomRejected
        ``undecodable``, or ``out-of-memory`` when decoding runs out of memory.
    """
    pixels = _native_grey(ds, geometry)
    if pixels is not None:
        return pixels
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pixels = pixel_array(ds)  # ds.pixel_array, without its cache checks
        except MemoryError:
            raise DicomRejected(path, "decoding ran out of memory", code="out-of-memory") from None
        except Exception as exc:  # noqa: BLE001 - any decoder failure means "reject this file"
            reason = f"pixel data cannot be decoded ({describe_error(exc)})"
            raise DicomRejected(path, reason) from None
    if caught:
        raise DicomRejected(path, f"the decoder had to guess: {str(caught[0].message)[:200]}")
    if pixels.shape != geometry.shape:
        raise DicomRejected(path, f"decoded shape {pixels.shape}, header declares {geometry.shape}")
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        raise DicomRejected(path, "pixel data holds non-finite values")
    return pixels


def _native_grey(ds: Dataset, geometry: PixelGeometry) -> np.ndarray | None:
    """Uncompressed little-endian grey-scale pixels, read as pydicom's native decoder does.

    pydicom's ``pixel_array`` spends over 100 us per file gathering options the checks
    already hold. Only the plainest layout is read here (bits beyond BitsStored masked, or
    sign-extended for signed data, like pydicom); None leaves every other case to pydicom.
    The pixel data length was checked by :func:`client.dicom.checks.check_geometry`.
    """
    elements = element_map(ds)
    if (
        geometry.transfer_syntax not in _NATIVE_LITTLE_ENDIAN
        or geometry.samples_per_pixel != 1
        or geometry.bits_allocated not in (8, 16, 32)
        or text_value(ds, "PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2")
        or TAGS["FloatPixelData"] in elements
        or TAGS["DoubleFloatPixelData"] in elements
    ):
        return None
    if TAGS["NumberOfFrames"] in elements:
        frames = text_value(ds, "NumberOfFrames")
        if not (frames.isdigit() and int(frames) >= 1):
            return None  # pydicom warns and assumes one frame: its decoder decides
    data = ds.get_item(TAGS["PixelData"]).value
    if not isinstance(data, bytes):
        return None
    kind = "i" if geometry.pixel_representation == 1 else "u"
    dtype = np.dtype(f"<{kind}{geometry.bits_allocated // 8}")
    count = geometry.rows * geometry.columns * geometry.frames
    pixels = np.frombuffer(data, dtype=dtype, count=count).reshape(geometry.shape).copy()
    spare = geometry.bits_allocated - geometry.bits_stored
    if spare and kind == "i":
        pixels <<= spare
        pixels >>= spare  # arithmetic shift: sign-extends from BitsStored
    elif spare:
        pixels &= dtype.type((1 << geometry.bits_stored) - 1)
    return pixels


def modality_values(pixels: np.ndarray, ds: Dataset, path: Path) -> np.ndarray:
    """Decoded pixels as float32 modality values; MONOCHROME1 inverted so that high is bright.

    Raises
    ------
    DicomRejected
        ``undecodable``: a damaged modality LUT, or values that are not finite.
    """
    values = _rescaled(pixels, ds)
    if values is None:
        try:
            values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
        except MemoryError:
            reason = "applying the modality LUT ran out of memory"
            raise DicomRejected(path, reason, code="out-of-memory") from None
        except Exception as exc:  # noqa: BLE001 - a damaged LUT means "reject this file"
            reason = f"modality LUT cannot be applied ({describe_error(exc)})"
            raise DicomRejected(path, reason) from None
    if not np.isfinite(values).all():
        raise DicomRejected(path, "pixel data holds non-finite values")
    if text_value(ds, "PhotometricInterpretation") == "MONOCHROME1":
        values = values.max() - values
    return values


def _rescaled(pixels: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Integer pixels through RescaleSlope/Intercept as float32, or None to use pydicom.

    The same arithmetic as pydicom's ``apply_modality_lut`` (float64, then cast), without its
    attribute conversions; a Modality LUT Sequence or an unusual value goes to pydicom.
    """
    elements = element_map(ds)
    if pixels.dtype.kind not in "iu" or TAGS["ModalityLUTSequence"] in elements:
        return None
    if TAGS["RescaleSlope"] not in elements or TAGS["RescaleIntercept"] not in elements:
        return pixels.astype(np.float32)
    try:
        slope = float(text_value(ds, "RescaleSlope"))
        intercept = float(text_value(ds, "RescaleIntercept"))
    except ValueError:
        return None
    if slope == 1.0 and intercept == 0.0 and pixels.dtype.itemsize <= 4:
        return pixels.astype(np.float32)  # exact in float64 first: the same result
    values = pixels.astype(np.float64) * slope
    values += intercept
    return values.astype(np.float32)
