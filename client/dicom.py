"""Reading one DICOM file safely: header, attributes kept at the site, decoded pixels.

Never ``force=True``: a file without a DICOM preamble is rejected, not guessed at. Pixel data
length is checked against the geometry and the pixels are decoded before a file is accepted,
because pydicom reads a truncated file without complaint until ``pixel_array`` is touched.
Every rejection carries a stable reason code from :data:`REASON_HELP`.
"""

from __future__ import annotations

import functools
import math
import os
import stat
import struct
import warnings
from collections.abc import Container
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import numpy as np
import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut
from pydicom.pixels.decoders.base import get_decoder
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from fedrad.core.errors import FedradError

REASON_HELP: dict[str, str] = {
    "not-dicom": "not a DICOM Part-10 file (no preamble and 'DICM' prefix): empty, text, an "
    "image format, random bytes, or not a regular file",
    "unreadable": "the file cannot be read from disk (permissions, I/O error, broken link)",
    "too-large": "over the size cap (--max-mb; not read), or its pixels would decode to more "
    "than 16 times the cap",
    "truncated": "the file ends inside an element it declares: an interrupted copy or export",
    "malformed": "the header cannot be parsed, or an image attribute holds an impossible value "
    "(Rows 0, NumberOfFrames '1A', BitsAllocated 12)",
    "missing-tags": "a required tag is absent (SOPClassUID, SOPInstanceUID, TransferSyntaxUID, "
    "Rows, Columns, BitsAllocated, BitsStored, SamplesPerPixel, PixelRepresentation, ...)",
    "unsupported-object": "not an image to learn from: RT plan, structure set or dose, "
    "structured report, waveform (ECG), presentation state, encapsulated document, key object "
    "selection, segmentation, DICOMDIR",
    "burned-in-annotation": "BurnedInAnnotation is YES: the pixels may show patient "
    "identifiers; de-identify the pixels and re-export",
    "no-pixel-data": "an image object that holds no PixelData",
    "unsupported-transfer-syntax": "no decoder is installed for the transfer syntax (e.g. "
    "MPEG video), or the transfer syntax is unknown",
    "pixel-data-length": "uncompressed pixel data shorter or longer than Rows x Columns x "
    "SamplesPerPixel x BitsAllocated/8 x NumberOfFrames (one padding byte allowed)",
    "undecodable": "the decoder failed, or the decoded pixels do not have the declared shape",
    "decode-timeout": "checking the file took longer than the timeout (--timeout); its worker "
    "process was stopped",
    "worker-crashed": "the worker process died while checking the file (crash in a decoder, "
    "out of memory)",
}
"""Every reason a file can be quarantined for: stable code -> what it means (one line)."""

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
_TAGS: dict[str, BaseTag] = {
    keyword: BaseTag(tag_for_keyword(keyword) or 0)
    for keyword in (
        *REQUIRED_IMAGE_TAGS,
        "SOPClassUID",
        "SOPInstanceUID",
        "Modality",
        "Manufacturer",
        "PatientSex",
        "PatientAge",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "InstanceNumber",
        "ImagePositionPatient",
        "BurnedInAnnotation",
        "NumberOfFrames",
        "RescaleSlope",
        "RescaleIntercept",
        "PixelData",
        "FloatPixelData",
        "DoubleFloatPixelData",
        "ModalityLUTSequence",
        "MediaStorageSOPClassUID",
        "TransferSyntaxUID",
    )
}
"""Tags of the attributes read here: indexing by BaseTag skips pydicom's keyword lookup."""
_NO_META = Dataset()
"""Stands in for the file meta of a dataset that has none (never written to)."""
_NOT_DICOM = "not a readable DICOM file (no preamble and 'DICM' prefix)"
DECODE_CAP_FACTOR = 16  # decoded pixels may be at most this many times the file size cap
READ_PIXELS_MAX_BYTES = 2**31
"""Size cap of :func:`read_pixels` (the site scan applies its own, smaller cap first)."""


class DicomRejected(FedradError):
    """A file cannot be used as training data; ``reason`` says why, ``code`` is stable."""

    def __init__(self, path: Path, reason: str, *, code: str = "undecodable") -> None:
        if code not in REASON_HELP:
            raise ValueError(f"unknown rejection code {code!r}; add it to REASON_HELP")
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.code = code


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


def _age_years(value: str) -> int | None:
    """Parse a DICOM Age String (``045Y``, ``006M``, ``003W``, ``010D``) into whole years."""
    if len(value) != 4 or not value[:3].isdigit():
        return None
    number, unit = int(value[:3]), value[3].upper()
    factor = {"Y": 1.0, "M": 1 / 12, "W": 1 / 52, "D": 1 / 365}.get(unit)
    return None if factor is None else int(number * factor)


def header_attributes(ds: Dataset) -> dict[str, object]:
    """Return the site-side attributes of a dataset; damaged optional values become empty."""
    return {
        "sop_class_uid": _text(ds, "SOPClassUID"),
        "sop_instance_uid": _text(ds, "SOPInstanceUID"),
        "series_uid": _text(ds, "SeriesInstanceUID"),
        "study_uid": _text(ds, "StudyInstanceUID"),
        "modality": _text(ds, "Modality").upper() or "OT",
        "manufacturer": _text(ds, "Manufacturer"),
        "sex": _text(ds, "PatientSex").upper(),
        "age_years": _age_years(_text(ds, "PatientAge")),
        "position_z": _position_z(ds),
        "instance_number": _optional_int(ds, "InstanceNumber"),
    }


def _elements(ds: Dataset) -> dict[BaseTag, Any]:
    """A dataset's elements by tag, as pydicom itself holds them.

    Looking tags up here skips ``Dataset.get_item`` and ``__contains__`` key conversions,
    which cost more than the checks themselves on small files. Values still raw are only
    used where they are plain bytes (never deferred: files are parsed whole).
    """
    return cast(dict[BaseTag, Any], ds._dict)  # noqa: SLF001 - pydicom's own mapping


def _text(ds: Dataset, keyword: str) -> str:
    """Return a short single string value ('' when absent or damaged).

    ASCII values still raw are decoded directly: pydicom's conversion costs about 20 us per
    element, a sizeable share of checking a small file.
    """
    tag = _TAGS[keyword]
    try:
        element = _elements(ds).get(tag)
        if element is None:
            return ""
        value = element.value
        if isinstance(element, RawDataElement) and isinstance(value, bytes) and value.isascii():
            return value.decode("ascii").strip("\x00 ")
        return str(ds[tag].value or "").strip()
    except Exception:  # noqa: BLE001 - a damaged value counts as absent
        return ""


def _position_z(ds: Dataset) -> float | None:
    tag = _TAGS["ImagePositionPatient"]
    try:
        element = _elements(ds).get(tag)
        value = None if element is None else element.value
        if isinstance(value, bytes):
            parts: list[object] = list(value.split(b"\\"))
        else:
            parts = [] if value is None else list(ds[tag].value)
        z = float(parts[2]) if len(parts) == 3 else None  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - a damaged optional value counts as absent
        return None
    return z if z is not None and math.isfinite(z) else None


def _optional_int(ds: Dataset, keyword: str) -> int | None:
    try:
        return int(_text(ds, keyword))
    except ValueError:
        return None


def read_header(path: Path) -> DicomHeader:
    """Read a file's header without pixels; raise DicomRejected if it is not usable DICOM."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        raise DicomRejected(path, _NOT_DICOM, code="not-dicom") from None
    except OSError as exc:
        raise DicomRejected(path, f"cannot be read ({exc.strerror})", code="unreadable") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure means "reject this file"
        raise DicomRejected(
            path, f"header cannot be parsed ({exc.__class__.__name__})", code="malformed"
        ) from None
    missing = [tag for tag in ("SOPInstanceUID", "Rows", "Columns") if tag not in ds]
    if missing:
        raise DicomRejected(path, f"required tag {missing[0]} missing", code="missing-tags")
    attributes = header_attributes(ds)
    del attributes["sop_class_uid"]
    return DicomHeader(path=path, **attributes)  # type: ignore[arg-type]


def read_capped(path: Path, *, max_bytes: int) -> tuple[bytes, os.stat_result]:
    """Read a whole regular file, refusing one over ``max_bytes`` before reading it.

    The file is opened non-blocking, so a FIFO planted in the folder cannot hang the reader.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise DicomRejected(path, f"cannot be opened ({exc.strerror})", code="unreadable") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "a FIFO, device or socket"
            raise DicomRejected(path, f"not a regular file but {kind}", code="not-dicom")
        if info.st_size > max_bytes:
            raise DicomRejected(
                path, f"{info.st_size} bytes, over the cap of {max_bytes}", code="too-large"
            )
        data = _read_fd(fd, info.st_size + 1)
    except OSError as exc:
        raise DicomRejected(path, f"read failed ({exc.strerror})", code="unreadable") from None
    finally:
        os.close(fd)
    if len(data) != info.st_size:
        raise DicomRejected(
            path, "changed size while being read (still being copied?)", code="unreadable"
        )
    return data, info


def _read_fd(fd: int, limit: int) -> bytes:
    """Read up to ``limit`` bytes (a single read may return less, e.g. past 2 GiB)."""
    chunks: list[bytes] = []
    total = 0
    while total < limit:
        chunk = os.read(fd, min(limit - total, 2**30))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def parse_dicom(data: bytes, path: Path) -> Dataset:
    """Parse a whole Part-10 file held in memory (never forced) and check it is complete."""
    if not data:
        raise DicomRejected(path, "empty file (0 bytes)", code="not-dicom")
    try:
        ds = pydicom.dcmread(BytesIO(data))
    except InvalidDicomError:
        raise DicomRejected(path, _NOT_DICOM, code="not-dicom") from None
    except (EOFError, OSError, struct.error) as exc:  # pydicom's ways of meeting the end
        reason = f"file truncated inside the header ({_brief(exc)})"
        raise DicomRejected(path, reason, code="truncated") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure means "reject this file"
        reason = f"header cannot be parsed ({_brief(exc)})"
        raise DicomRejected(path, reason, code="malformed") from None
    _check_complete(ds, len(data), path)
    return ds


def _brief(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{exc.__class__.__name__}: {text[:160]}" if text else exc.__class__.__name__


def _check_complete(ds: Dataset, size: int, path: Path) -> None:
    """Reject a file cut inside its last element's value or inside the next element's header.

    pydicom reads a cut-off value silently, and stops silently when fewer than the 8 bytes of
    an element header remain: only the last element read can show the cut.
    """
    elements = _elements(ds)
    last = next(reversed(elements), None)  # the elements are in the order read
    if last is None:
        raise DicomRejected(path, "file truncated after the file meta", code="truncated")
    raw = elements[last]
    if not isinstance(raw, RawDataElement) or raw.value is None or raw.length == 0xFFFFFFFF:
        return
    if len(raw.value) < raw.length:
        raise DicomRejected(
            path,
            f"file truncated: {_name(raw.tag)} declares {raw.length} bytes, the file holds "
            f"{len(raw.value)} (cut-off copy, or a damaged length)",
            code="truncated",
        )
    trailing = size - (raw.value_tell + raw.length)
    if 0 < trailing < 8:
        deflated = ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
        if not deflated:  # offsets of a deflated file are in the inflated data
            raise DicomRejected(
                path,
                f"file truncated {trailing} byte(s) into the element after {_name(raw.tag)}",
                code="truncated",
            )


def _name(tag: BaseTag) -> str:
    return pydicom.datadict.keyword_for_tag(tag) or str(tag)


def check_object(ds: Dataset, path: Path) -> None:
    """Refuse objects that are not images, those lacking identity tags, burned-in text."""
    meta = getattr(ds, "file_meta", None)
    meta = _NO_META if meta is None else meta
    sop_class = _text(ds, "SOPClassUID") or _text(meta, "MediaStorageSOPClassUID")
    refusal = _object_refusal(sop_class, _text(ds, "Modality").upper())
    if refusal is not None:
        raise DicomRejected(path, refusal, code="unsupported-object")
    missing = [kw for kw in ("SOPClassUID", "SOPInstanceUID") if not _text(ds, kw)]
    if not _text(meta, "TransferSyntaxUID"):
        missing.append("TransferSyntaxUID (file meta)")
    if missing:
        raise DicomRejected(path, f"missing {', '.join(missing)}", code="missing-tags")
    if _text(ds, "BurnedInAnnotation").upper() == "YES":
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
    """Check an image's pixel attributes, decoder and (uncompressed) pixel data length."""
    elements = _elements(ds)
    if _TAGS["PixelData"] not in elements:
        raise DicomRejected(path, "no PixelData element", code="no-pixel-data")
    missing = [kw for kw in REQUIRED_IMAGE_TAGS if _TAGS[kw] not in elements]
    if missing:
        raise DicomRejected(path, f"missing {', '.join(missing)}", code="missing-tags")
    geometry = _geometry(ds, path)
    refusal = _transfer_syntax(str(geometry.transfer_syntax))[1]
    if refusal is not None:
        raise DicomRejected(path, refusal, code="unsupported-transfer-syntax")
    expected = _expected_length(geometry, _text(ds, "PhotometricInterpretation"))
    if expected > max_decoded_bytes:
        raise DicomRejected(
            path,
            f"pixels would decode to {expected} bytes, over the cap of {max_decoded_bytes}",
            code="too-large",
        )
    if not geometry.transfer_syntax.is_encapsulated:
        actual = len(ds.get_item(_TAGS["PixelData"]).value or b"")
        if actual not in (expected, expected + expected % 2):
            raise DicomRejected(
                path,
                f"pixel data has {actual} bytes, geometry needs {expected}",
                code="pixel-data-length",
            )
    return geometry


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
    element = _elements(ds).get(_TAGS[keyword])
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
        return int(ds[_TAGS[keyword]].value)
    except Exception as exc:  # noqa: BLE001 - damaged values surface as any error type
        reason = f"{keyword} is not an integer ({_brief(exc)})"
        raise DicomRejected(path, reason, code="malformed") from None


def _geometry(ds: Dataset, path: Path) -> PixelGeometry:
    """Read the image attributes as integers and check their ranges."""
    values = {kw: _integer(ds, kw, path) for kw in _CHECKED_RANGES}
    problems = [f"{kw} {values[kw]}" for kw, ok in _CHECKED_RANGES.items() if values[kw] not in ok]
    frames_text = _text(ds, "NumberOfFrames")
    try:
        frames = int(frames_text or 1) or 1  # pydicom reads 0 as 1 frame too
        for keyword in ("RescaleSlope", "RescaleIntercept"):
            if not math.isfinite(float(_text(ds, keyword) or 0)):
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
        transfer_syntax=_transfer_syntax(_text(ds.file_meta, "TransferSyntaxUID"))[0],
        bits_stored=values["BitsStored"],
        pixel_representation=values["PixelRepresentation"],
    )


def decode_pixels(ds: Dataset, geometry: PixelGeometry, path: Path) -> np.ndarray:
    """Decode the pixel data and check it has the declared shape and finite values.

    A decoder warning counts as a failure: pydicom warns, then guesses, when the compressed
    data do not fit the header (an RLE segment longer than Rows x Columns, for instance).
    """
    pixels = _native_grey(ds, geometry)
    if pixels is not None:
        return pixels
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            pixels = pydicom.pixels.pixel_array(ds)  # ds.pixel_array, without its cache checks
        except MemoryError:
            raise DicomRejected(path, "decoding ran out of memory", code="too-large") from None
        except Exception as exc:  # noqa: BLE001 - any decoder failure means "reject this file"
            raise DicomRejected(path, f"pixel data cannot be decoded ({_brief(exc)})") from None
    if caught:
        raise DicomRejected(path, f"the decoder had to guess: {str(caught[0].message)[:200]}")
    if pixels.shape != geometry.shape:
        raise DicomRejected(path, f"decoded shape {pixels.shape}, header declares {geometry.shape}")
    if pixels.dtype.kind == "f" and not np.isfinite(pixels).all():
        raise DicomRejected(path, "pixel data holds non-finite values")
    return pixels


_NATIVE_LITTLE_ENDIAN = (ImplicitVRLittleEndian, ExplicitVRLittleEndian)


def _native_grey(ds: Dataset, geometry: PixelGeometry) -> np.ndarray | None:
    """Uncompressed little-endian grey-scale pixels, read as pydicom's native decoder does.

    pydicom's ``pixel_array`` spends over 100 us per file gathering options the checks above
    already hold. Only the plainest layout is read here (bits beyond BitsStored masked, or
    sign-extended for signed data, like pydicom); None leaves every other case to pydicom.
    The pixel data length was checked by :func:`check_geometry`.
    """
    if (
        geometry.transfer_syntax not in _NATIVE_LITTLE_ENDIAN
        or geometry.samples_per_pixel != 1
        or geometry.bits_allocated not in (8, 16, 32)
        or _text(ds, "PhotometricInterpretation") not in ("MONOCHROME1", "MONOCHROME2")
        or _TAGS["FloatPixelData"] in _elements(ds)
        or _TAGS["DoubleFloatPixelData"] in _elements(ds)
    ):
        return None
    if _TAGS["NumberOfFrames"] in _elements(ds):
        frames = _text(ds, "NumberOfFrames")
        if not (frames.isdigit() and int(frames) >= 1):
            return None  # pydicom warns and assumes one frame: its decoder decides
    data = ds.get_item(_TAGS["PixelData"]).value
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


def read_pixels(path: Path) -> np.ndarray:
    """Decode one file's pixels into float32 modality values (e.g. Hounsfield units for CT).

    Returns an array of shape ``(H, W)`` for grey-scale, ``(H, W, 3)`` for colour; a
    multi-frame file yields ``(F, H, W)``. MONOCHROME1 is inverted so that high is bright.
    The file passes the same checks as the site scan (``client.scan.check_file``).
    """
    data, _ = read_capped(path, max_bytes=READ_PIXELS_MAX_BYTES)
    ds = parse_dicom(data, path)
    check_object(ds, path)
    geometry = check_geometry(ds, path, max_decoded_bytes=DECODE_CAP_FACTOR * READ_PIXELS_MAX_BYTES)
    return modality_values(decode_pixels(ds, geometry, path), ds, path)


def modality_values(pixels: np.ndarray, ds: Dataset, path: Path) -> np.ndarray:
    """Decoded pixels as float32 modality values; MONOCHROME1 inverted so that high is bright."""
    values = _rescaled(pixels, ds)
    if values is None:
        try:
            values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
        except Exception as exc:  # noqa: BLE001 - a damaged LUT means "reject this file"
            reason = f"modality LUT cannot be applied ({_brief(exc)})"
            raise DicomRejected(path, reason) from None
    if not np.isfinite(values).all():
        raise DicomRejected(path, "pixel data holds non-finite values")
    if _text(ds, "PhotometricInterpretation") == "MONOCHROME1":
        values = values.max() - values
    return values


def _rescaled(pixels: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Integer pixels through RescaleSlope/Intercept as float32, or None to use pydicom.

    The same arithmetic as pydicom's ``apply_modality_lut`` (float64, then cast), without its
    attribute conversions; a Modality LUT Sequence or an unusual value goes to pydicom.
    """
    elements = _elements(ds)
    if pixels.dtype.kind not in "iu" or _TAGS["ModalityLUTSequence"] in elements:
        return None
    if _TAGS["RescaleSlope"] not in elements or _TAGS["RescaleIntercept"] not in elements:
        return pixels.astype(np.float32)
    try:
        slope = float(_text(ds, "RescaleSlope"))
        intercept = float(_text(ds, "RescaleIntercept"))
    except ValueError:
        return None
    if slope == 1.0 and intercept == 0.0 and pixels.dtype.itemsize <= 4:
        return pixels.astype(np.float32)  # exact in float64 first: the same result
    values = pixels.astype(np.float64) * slope
    values += intercept
    return values.astype(np.float32)
