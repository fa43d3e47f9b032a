"""Reading one DICOM file: a size-capped read, a complete parse, the attributes kept at the site.

Never ``force=True``: a file without a DICOM preamble is rejected, not guessed at. A file cut
short is rejected here, because pydicom reads a truncated file without complaint. Attribute
access goes straight to the dataset's elements (:func:`text_value`): pydicom's own lookups
cost more than the checks on small files.
"""

from __future__ import annotations

import math
import os
import stat
import struct
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import pydicom
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from client.dicom.reasons import DicomRejected, describe_error

__all__ = ["TAGS", "element_map", "header_attributes", "parse_dicom", "read_capped", "text_value"]

TAGS: dict[str, BaseTag] = {
    keyword: BaseTag(tag_for_keyword(keyword) or 0)
    for keyword in (
        "Rows",
        "Columns",
        "BitsAllocated",
        "BitsStored",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "PixelRepresentation",
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
_NOT_DICOM = "not a readable DICOM file (no preamble and 'DICM' prefix)"


def read_capped(path: Path, *, max_bytes: int) -> tuple[bytes, os.stat_result]:
    """Read a whole regular file, refusing one over ``max_bytes`` before reading it.

    The file is opened non-blocking, so a FIFO planted in the folder cannot hang the reader.

    Raises
    ------
    DicomRejected
        ``unreadable``, ``not-dicom`` (not a regular file) or ``too-large``.
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
    """Parse a whole Part-10 file held in memory (never forced) and check it is complete.

    Raises
    ------
    DicomRejected
        ``not-dicom``, ``truncated`` or ``malformed``.
    """
    if not data:
        raise DicomRejected(path, "empty file (0 bytes)", code="not-dicom")
    try:
        ds = pydicom.dcmread(BytesIO(data))
    except InvalidDicomError:
        raise DicomRejected(path, _NOT_DICOM, code="not-dicom") from None
    except (EOFError, OSError, struct.error) as exc:  # pydicom's ways of meeting the end
        reason = f"file truncated inside the header ({describe_error(exc)})"
        raise DicomRejected(path, reason, code="truncated") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure means "reject this file"
        reason = f"header cannot be parsed ({describe_error(exc)})"
        raise DicomRejected(path, reason, code="malformed") from None
    _check_complete(ds, len(data), path)
    return ds


def _check_complete(ds: Dataset, size: int, path: Path) -> None:
    """Reject a file cut inside its last element's value or inside the next element's header.

    pydicom reads a cut-off value silently, and stops silently when fewer than the 8 bytes of
    an element header remain: only the last element read can show the cut.
    """
    elements = element_map(ds)
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
    return keyword_for_tag(tag) or str(tag)


def element_map(ds: Dataset) -> dict[BaseTag, Any]:
    """Return a dataset's elements by tag, as pydicom itself holds them.

    Looking tags up here skips ``Dataset.get_item`` and ``__contains__`` key conversions,
    which cost more than the checks themselves on small files. Values still raw are only
    used where they are plain bytes (never deferred: files are parsed whole).
    """
    return cast(dict[BaseTag, Any], ds._dict)  # noqa: SLF001 - pydicom's own mapping


def text_value(ds: Dataset, keyword: str) -> str:
    """Return a short single string value ('' when absent or damaged).

    ASCII values still raw are decoded directly: pydicom's conversion costs about 20 us per
    element, a sizeable share of checking a small file. ``keyword`` is a key of :data:`TAGS`.
    """
    tag = TAGS[keyword]
    try:
        element = element_map(ds).get(tag)
        if element is None:
            return ""
        value = element.value
        if isinstance(element, RawDataElement) and isinstance(value, bytes) and value.isascii():
            return value.decode("ascii").strip("\x00 ")
        return str(ds[tag].value or "").strip()
    except Exception:  # noqa: BLE001 - a damaged value counts as absent
        return ""


def header_attributes(ds: Dataset) -> dict[str, object]:
    """Return the site-side attributes of a dataset; damaged optional values become empty.

    The keys are fields of ``client.scan.AcceptedFile``; patient attributes among them never
    leave the site as they are.
    """
    return {
        "sop_class_uid": text_value(ds, "SOPClassUID"),
        "sop_instance_uid": text_value(ds, "SOPInstanceUID"),
        "series_uid": text_value(ds, "SeriesInstanceUID"),
        "study_uid": text_value(ds, "StudyInstanceUID"),
        "modality": text_value(ds, "Modality").upper() or "OT",
        "manufacturer": text_value(ds, "Manufacturer"),
        "sex": text_value(ds, "PatientSex").upper(),
        "age_years": _age_years(text_value(ds, "PatientAge")),
        "position_z": _position_z(ds),
        "instance_number": _optional_int(ds, "InstanceNumber"),
    }


def _age_years(value: str) -> int | None:
    """Parse a DICOM Age String (``045Y``, ``006M``, ``003W``, ``010D``) into whole years."""
    if len(value) != 4 or not value[:3].isdigit():
        return None
    number, unit = int(value[:3]), value[3].upper()
    factor = {"Y": 1.0, "M": 1 / 12, "W": 1 / 52, "D": 1 / 365}.get(unit)
    return None if factor is None else int(number * factor)


def _position_z(ds: Dataset) -> float | None:
    tag = TAGS["ImagePositionPatient"]
    try:
        element = element_map(ds).get(tag)
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
        return int(text_value(ds, keyword))
    except ValueError:
        return None
