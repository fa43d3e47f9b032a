"""Reading one DICOM file: a size-capped read, a complete parse, the attributes kept at the site.

Never ``force=True``: a file without a DICOM preamble is rejected, not guessed at. A file cut
short is rejected here, because pydicom reads a truncated file without complaint. A symbolic
link is never followed (:func:`open_unlinked`), and a deflated file is inflated only when its
data inflate to no more than the size cap: pydicom inflates whole, unbounded. Attribute
access goes straight to the dataset's elements (:func:`text_value`): pydicom's own lookups
cost more than the checks on small files.
"""

from __future__ import annotations

import errno
import math
import os
import stat
import struct
import zlib
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import pydicom
from pydicom.datadict import keyword_for_tag, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import (  # what dcmread runs before it inflates
    _read_command_set_elements,
    _read_file_meta_info,
    read_preamble,
)
from pydicom.tag import BaseTag
from pydicom.uid import DeflatedExplicitVRLittleEndian

from client.dicom.reasons import DicomRejected, describe_error

__all__ = [
    "TAGS",
    "element_map",
    "header_attributes",
    "open_unlinked",
    "parse_dicom",
    "read_capped",
    "text_value",
]

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
_OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)
_FOLDER_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_DEFLATED_UID = str(DeflatedExplicitVRLittleEndian).encode("ascii")
_INFLATE_IN, _INFLATE_OUT = 2**16, 2**20  # bytes fed to and taken from zlib per call
_COPY_IN = "copy the file itself into the site folder"


def open_unlinked(path: Path) -> int:
    """Open a file for reading (non-blocking) without following a symbolic link on the way.

    The file is opened with ``O_NOFOLLOW``. The folders of a relative path (relative to the
    working directory: a scan worker's is the site folder) are opened one by one, each with
    ``O_NOFOLLOW`` and relative to the one before, so that a link planted anywhere on the
    way, even after the folder was listed, cannot lead out of the folder. The folders of an
    absolute path are the caller's choice and are followed.

    Returns
    -------
    int
        The open file descriptor (the caller closes it).

    Raises
    ------
    DicomRejected
        ``symbolic-link`` or ``unreadable``.
    """
    parts = path.parts
    folder_fd: int | None = None
    try:
        if not path.is_absolute():
            for index, part in enumerate(parts[:-1]):
                try:
                    next_fd = os.open(part, _FOLDER_FLAGS | _NO_FOLLOW, dir_fd=folder_fd)
                except OSError as exc:
                    where = "/".join(parts[: index + 1])
                    link = f"reached through the linked folder {where}"
                    raise _open_error(path, exc, where, link) from None
                if folder_fd is not None:
                    os.close(folder_fd)
                folder_fd = next_fd
        name = parts[-1] if folder_fd is not None else str(path)
        try:
            return os.open(name, _OPEN_FLAGS | _NO_FOLLOW, dir_fd=folder_fd)
        except OSError as exc:
            raise _open_error(path, exc, str(path), "a symbolic link") from None
    finally:
        if folder_fd is not None:
            os.close(folder_fd)


def _open_error(path: Path, exc: OSError, where: str, link: str) -> DicomRejected:
    """The rejection for a failed open of ``where``: a link met there, or unreadable."""
    if exc.errno == errno.ELOOP or os.path.islink(where):
        return DicomRejected(path, f"{link}: {_COPY_IN}", code="symbolic-link")
    return DicomRejected(path, f"cannot be opened ({exc.strerror})", code="unreadable")


def read_capped(path: Path, *, max_bytes: int) -> tuple[bytes, os.stat_result]:
    """Read a whole regular file, refusing one over ``max_bytes`` before reading it.

    The file is opened non-blocking, so a FIFO planted in the folder cannot hang the reader,
    and never through a symbolic link (:func:`open_unlinked`).

    Raises
    ------
    DicomRejected
        ``symbolic-link``, ``unreadable``, ``not-dicom`` (not a regular file) or ``too-large``.
    """
    fd = open_unlinked(path)
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


def parse_dicom(data: bytes, path: Path, *, max_inflated_bytes: int | None = None) -> Dataset:
    """Parse a whole Part-10 file held in memory (never forced) and check it is complete.

    A deflated file is parsed only when its data inflate to at most ``max_inflated_bytes``
    (measured in small steps first, never held whole); None leaves inflation unbounded.

    Raises
    ------
    DicomRejected
        ``not-dicom``, ``inflated-too-large``, ``truncated``, ``malformed`` or
        ``out-of-memory``.
    """
    if not data:
        raise DicomRejected(path, "empty file (0 bytes)", code="not-dicom")
    if max_inflated_bytes is not None and _DEFLATED_UID in data:  # a fast scan of the bytes
        _check_inflated_size(data, path, max_inflated_bytes)
    try:
        ds = pydicom.dcmread(BytesIO(data))
    except InvalidDicomError:
        raise DicomRejected(path, _NOT_DICOM, code="not-dicom") from None
    except MemoryError:
        raise DicomRejected(path, "parsing ran out of memory", code="out-of-memory") from None
    except (EOFError, OSError, struct.error) as exc:  # pydicom's ways of meeting the end
        reason = f"file truncated inside the header ({describe_error(exc)})"
        raise DicomRejected(path, reason, code="truncated") from None
    except Exception as exc:  # noqa: BLE001 - any parser failure means "reject this file"
        reason = f"header cannot be parsed ({describe_error(exc)})"
        raise DicomRejected(path, reason, code="malformed") from None
    _check_complete(ds, len(data), path)
    return ds


def _deflated_start(data: bytes) -> int | None:
    """Where a deflated file's deflated data begin (as dcmread finds them), else None."""
    stream = BytesIO(data)
    try:
        read_preamble(stream, False)
        meta = _read_file_meta_info(stream)
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return None
        _read_command_set_elements(stream)
    except Exception:  # noqa: BLE001 - not parseable: the full parse says why
        return None
    return stream.tell()


def _check_inflated_size(data: bytes, path: Path, limit: int) -> None:
    """Refuse a deflated file whose data inflate to more than ``limit`` bytes.

    The data are inflated in steps of at most 1 MiB of output, each dropped at once. A
    stream that zlib cannot inflate is left to the full parse, which fails at the same
    point: the decoder is deterministic, so it never gets further than measured here.
    """
    start = _deflated_start(data)
    if start is None:
        return
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    view = memoryview(data)
    total = 0
    try:
        for offset in range(start, len(data), _INFLATE_IN):
            pending: bytes | memoryview = view[offset : offset + _INFLATE_IN]
            while pending and not inflater.eof:
                total += len(inflater.decompress(pending, _INFLATE_OUT))
                if total > limit:
                    raise DicomRejected(
                        path,
                        f"deflated data inflate to more than {limit} bytes, the size cap "
                        f"(the file has {len(data)})",
                        code="inflated-too-large",
                    )
                pending = inflater.unconsumed_tail
            if inflater.eof:
                return
    except zlib.error:
        return


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
