"""Checks of a parsed DICOM object before its pixels are trusted: what it is, its geometry.

An object is refused when it is not an image (RT, SR, waveforms, SEG, ...), lacks its identity
tags, or declares burned-in annotation; an image when its pixel attributes are impossible, no
decoder is installed for its transfer syntax, its pixels would decode to more than
:func:`decoded_cap` bytes, a compressed frame declares a larger image than the header (decoders
allocate what the codestream says), or its (uncompressed) pixel data length does not fit the
geometry. :func:`read_checked` runs the whole chain on one file, short of decoding.
"""

from __future__ import annotations

import functools
import math
import os
import struct
from collections.abc import Container
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.utils import _get_jpg_parameters  # JPEG and JPEG-LS SOF parsing
from pydicom.uid import UID

from client.dicom.reading import TAGS, element_map, parse_dicom, read_capped, text_value
from client.dicom.reasons import DicomRejected, describe_error

__all__ = [
    "DECODE_CAP_FACTOR",
    "MAX_DECODED_BYTES",
    "REQUIRED_IMAGE_TAGS",
    "CheckedDicom",
    "PixelGeometry",
    "check_geometry",
    "check_object",
    "decoded_cap",
    "read_checked",
]

DECODE_CAP_FACTOR = 16  # decoded pixels: at most this many times the size cap (lossy JPEG ~10-20x)
MAX_DECODED_BYTES = 2**30  # and at most 1 GiB, whatever the size cap (see decoded_cap)
REQUIRED_IMAGE_TAGS = (
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PixelRepresentation",
)
_NON_IMAGE_MODALITIES = {
    "SR": "structured report",
    "KO": "key object selection",
    "PR": "presentation state",
    "DOC": "encapsulated document",
    "ECG": "ECG waveform",
    "HD": "haemodynamic waveform",
    "EPS": "electrophysiology waveform",
    "RESP": "respiratory waveform",
    "AU": "audio",
    "RTPLAN": "RT plan",
    "RTSTRUCT": "RT structure set",
    "RTDOSE": "RT dose",
    "RTRECORD": "RT treatment record",
    "SEG": "segmentation",
    "REG": "registration",
    "FID": "fiducials",
    "RWV": "real world value map",
    "PLAN": "plan",
}
_ROWS_COLUMNS = range(1, 2**16)
_CHECKED_RANGES: dict[str, Container[int]] = {
    "Rows": _ROWS_COLUMNS,
    "Columns": _ROWS_COLUMNS,
    "BitsAllocated": (1, 8, 16, 32, 64),
    "BitsStored": range(1, 65),
    "SamplesPerPixel": (1, 3),
    "PixelRepresentation": (0, 1),
}
_NO_META = Dataset()
"""Stands in for the file meta of a dataset that has none (never written to)."""


@dataclass(frozen=True)
class PixelGeometry:
    """The declared layout of an image's pixel data, checked for consistency."""

    rows: int
    columns: int
    frames: int
    samples_per_pixel: int
    bits_allocated: int
    transfer_syntax: UID
    bits_stored: int = 0
    pixel_representation: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape pydicom's ``pixel_array`` must have for this geometry."""
        frames = (self.frames,) if self.frames > 1 else ()
        samples = (self.samples_per_pixel,) if self.samples_per_pixel > 1 else ()
        return (*frames, self.rows, self.columns, *samples)


@dataclass(frozen=True)
class CheckedDicom:
    """A file read whole and parsed, that passed every check short of decoding its pixels."""

    data: bytes
    """The file's bytes, as read (for its content hash)."""
    info: os.stat_result
    """The file's status, taken from the open file while it was read."""
    dataset: Dataset
    geometry: PixelGeometry


def decoded_cap(max_bytes: int) -> int:
    """Most bytes a file's decoded pixels may take under a file size cap of ``max_bytes``."""
    return min(DECODE_CAP_FACTOR * max_bytes, MAX_DECODED_BYTES)


def read_checked(path: Path, *, max_bytes: int) -> CheckedDicom:
    """Read (capped at ``max_bytes``), parse and check one file, without decoding its pixels.

    A deflated file's data may inflate to at most ``max_bytes``; decoded pixels may take at
    most :func:`decoded_cap` of it.

    Raises
    ------
    DicomRejected
        With the code of the first check the file fails.
    """
    data, info = read_capped(path, max_bytes=max_bytes)
    ds = parse_dicom(data, path, max_inflated_bytes=max_bytes)
    check_object(ds, path)
    geometry = check_geometry(ds, path, max_decoded_bytes=decoded_cap(max_bytes))
    return CheckedDicom(data, info, ds, geometry)


def check_object(ds: Dataset, path: Path) -> None:
    """Refuse objects that are not images, those lacking identity tags, burned-in text.

    Raises
    ------
    DicomRejected
        ``unsupported-object``, ``missing-tags`` or ``burned-in-annotation``.
    """
    meta = getattr(ds, "file_meta", None)
    meta = _NO_META if meta is None else meta
    sop_class = text_value(ds, "SOPClassUID") or text_value(meta, "MediaStorageSOPClassUID")
    refusal = _object_refusal(sop_class, text_value(ds, "Modality").upper())
    if refusal is not None:
        raise DicomRejected(path, refusal, code="unsupported-object")
    missing = [kw for kw in ("SOPClassUID", "SOPInstanceUID") if not text_value(ds, kw)]
    if not text_value(meta, "TransferSyntaxUID"):
        missing.append("TransferSyntaxUID (file meta)")
    if missing:
        raise DicomRejected(path, f"missing {', '.join(missing)}", code="missing-tags")
    if text_value(ds, "BurnedInAnnotation").upper() == "YES":
        raise DicomRejected(
            path,
            "BurnedInAnnotation is YES: pixels may show identifiers",
            code="burned-in-annotation",
        )


@functools.lru_cache(maxsize=256)
def _object_refusal(sop_class: str, modality: str) -> str | None:
    """Say why an object is not an image, or None (cached: a folder repeats a few classes)."""
    uid = UID(sop_class)
    if uid.type == "SOP Class" and "Image Storage" not in uid.name:
        return f"{uid.name} ({uid}) is not an image"
    if modality in _NON_IMAGE_MODALITIES:
        return f"Modality {modality} ({_NON_IMAGE_MODALITIES[modality]}) is not an image"
    return None


def check_geometry(ds: Dataset, path: Path, *, max_decoded_bytes: int) -> PixelGeometry:
    """Check an image's pixel attributes, decoder and (uncompressed) pixel data length.

    Raises
    ------
    DicomRejected
        ``no-pixel-data``, ``missing-tags``, ``malformed``, ``unsupported-transfer-syntax``,
        ``too-large`` or ``pixel-data-length``.
    """
    elements = element_map(ds)
    if TAGS["PixelData"] not in elements:
        raise DicomRejected(path, "no PixelData element", code="no-pixel-data")
    missing = [kw for kw in REQUIRED_IMAGE_TAGS if TAGS[kw] not in elements]
    if missing:
        raise DicomRejected(path, f"missing {', '.join(missing)}", code="missing-tags")
    geometry = _geometry(ds, path)
    refusal = _transfer_syntax(str(geometry.transfer_syntax))[1]
    if refusal is not None:
        raise DicomRejected(path, refusal, code="unsupported-transfer-syntax")
    expected = _expected_length(geometry, text_value(ds, "PhotometricInterpretation"))
    if expected > max_decoded_bytes:
        raise DicomRejected(
            path,
            f"pixels would decode to {expected} bytes, over the cap of {max_decoded_bytes}",
            code="too-large",
        )
    if geometry.transfer_syntax.is_encapsulated:
        _check_frames(ds.get_item(TAGS["PixelData"]).value or b"", geometry, path)
    else:
        actual = len(ds.get_item(TAGS["PixelData"]).value or b"")
        if actual not in (expected, expected + expected % 2):
            raise DicomRejected(
                path,
                f"pixel data has {actual} bytes, geometry needs {expected}",
                code="pixel-data-length",
            )
    return geometry


def _check_frames(pixel_data: bytes, geometry: PixelGeometry, path: Path) -> None:
    """Refuse a compressed frame whose codestream declares a larger image than the header.

    A frame starts at the first fragment and after each fragment that ends a codestream
    (EOI / EOC, ``FF D9``, perhaps padded). Encapsulation that cannot be read is left to
    the decoder, which reads it the same way.
    """
    starts_frame = True
    try:
        fragments = generate_fragments(pixel_data)
        next(fragments, None)  # the Basic Offset Table
        for number, fragment in enumerate(fragments, start=1):
            if starts_frame:
                declared = _frame_size(fragment)
                if declared is not None and (
                    declared[0] > geometry.rows
                    or declared[1] > geometry.columns
                    or declared[2] > geometry.samples_per_pixel
                ):
                    raise DicomRejected(
                        path,
                        f"compressed fragment {number} declares {declared[0]} x {declared[1]} "
                        f"x {declared[2]} samples, the header {geometry.rows} x "
                        f"{geometry.columns} x {geometry.samples_per_pixel}",
                        code="too-large",
                    )
            tail = fragment[-3:]
            starts_frame = tail.endswith(b"\xff\xd9") or tail.startswith(b"\xff\xd9")
    except (ValueError, struct.error):
        return


def _frame_size(codestream: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) a JPEG, JPEG-LS or JPEG 2000 codestream declares."""
    if codestream.startswith(b"\xff\xd8"):  # SOI: JPEG or JPEG-LS
        info = _get_jpg_parameters(codestream)
        if "height" not in info:
            return None
        return int(info["height"]), int(info["width"]), int(info["components"])
    offset = 0
    if codestream.startswith(b"\x00\x00\x00\x0cjP  "):  # a JP2 file: find the codestream
        offset = codestream.find(b"\xff\x4f\xff\x51", 12, 1 << 16)
    if offset < 0 or codestream[offset : offset + 4] != b"\xff\x4f\xff\x51":  # SOC, SIZ
        return None
    siz = codestream[offset + 4 : offset + 42]  # Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz ... Csiz
    if len(siz) < 38:
        return None
    x, y, x_offset, y_offset = struct.unpack(">IIII", siz[4:20])
    (components,) = struct.unpack(">H", siz[36:38])
    return y - y_offset, x - x_offset, components


@functools.lru_cache(maxsize=64)
def _transfer_syntax(text: str) -> tuple[UID, str | None]:
    """Return the transfer syntax and why it cannot be decoded here, or None (cached)."""
    syntax = UID(text)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        if syntax.name == str(syntax):
            return syntax, f"transfer syntax '{syntax}' is unknown"
        return syntax, f"transfer syntax {syntax.name} ({syntax}) has no pixel decoder"
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin"
        return syntax, f"no decoder installed for {syntax.name}: {missing}"
    return syntax, None


def _expected_length(geometry: PixelGeometry, photometric: str) -> int:
    """Bytes of uncompressed pixel data (pydicom's rule: 1-bit packed, YBR_FULL_422 2/3)."""
    pixels = geometry.rows * geometry.columns * geometry.samples_per_pixel * geometry.frames
    if geometry.bits_allocated == 1:
        length = (pixels + 7) // 8
    else:
        length = pixels * (geometry.bits_allocated // 8)
    return length // 3 * 2 if photometric == "YBR_FULL_422" else length


def _integer(ds: Dataset, keyword: str, path: Path) -> int:
    """Return an integer image attribute; a damaged value is a 'malformed' rejection."""
    element = element_map(ds).get(TAGS[keyword])
    if (  # a plain little-endian US value: read it directly, as pydicom would convert it
        type(element) is RawDataElement
        and element.is_little_endian
        and element.VR in ("US", None)  # None: implicit VR, where these tags are US
        and element.length == 2
        and isinstance(element.value, bytes)
        and len(element.value) == 2
    ):
        return int.from_bytes(element.value, "little")
    try:
        return int(ds[TAGS[keyword]].value)
    except Exception as exc:  # noqa: BLE001 - damaged values surface as any error type
        reason = f"{keyword} is not an integer ({describe_error(exc)})"
        raise DicomRejected(path, reason, code="malformed") from None


def _geometry(ds: Dataset, path: Path) -> PixelGeometry:
    """Read the image attributes as integers and check their ranges."""
    values = {kw: _integer(ds, kw, path) for kw in _CHECKED_RANGES}
    problems = [f"{kw} {values[kw]}" for kw, ok in _CHECKED_RANGES.items() if values[kw] not in ok]
    frames_text = text_value(ds, "NumberOfFrames")
    try:
        frames = int(frames_text or 1) or 1  # pydicom reads 0 as 1 frame too
        for keyword in ("RescaleSlope", "RescaleIntercept"):
            if not math.isfinite(float(text_value(ds, keyword) or 0)):
                problems.append(f"{keyword} not finite")
    except ValueError as exc:
        raise DicomRejected(path, f"invalid image attribute ({exc})", code="malformed") from None
    if frames < 1:
        problems.append(f"NumberOfFrames {frames}")
    if values["BitsStored"] > values["BitsAllocated"]:
        problems.append(f"BitsStored {values['BitsStored']} > BitsAllocated")
    if problems:
        raise DicomRejected(path, f"impossible value(s): {', '.join(problems)}", code="malformed")
    return PixelGeometry(
        rows=values["Rows"],
        columns=values["Columns"],
        frames=frames,
        samples_per_pixel=values["SamplesPerPixel"],
        bits_allocated=values["BitsAllocated"],
        transfer_syntax=_transfer_syntax(text_value(ds.file_meta, "TransferSyntaxUID"))[0],
        bits_stored=values["BitsStored"],
        pixel_representation=values["PixelRepresentation"],
    )
