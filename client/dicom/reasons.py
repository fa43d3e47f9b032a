"""Why a file is quarantined: the stable reason codes, their help texts, the rejection error.

Every rejection carries a code of :data:`REASON_HELP`; reports, caches and the site check's
JSON use the codes, so they never change meaning.
"""

from __future__ import annotations

from pathlib import Path

from fedrad.core.errors import FedradError

__all__ = ["REASON_HELP", "DicomRejected", "describe_error"]

REASON_HELP: dict[str, str] = {
    "not-dicom": "not a DICOM Part-10 file (no preamble and 'DICM' prefix): empty, text, an "
    "image format, random bytes, or not a regular file",
    "unreadable": "the file cannot be read from disk (permissions, I/O error)",
    "too-large": "over the size cap (--max-mb; not read), or its pixels would decode to more "
    "than 16 times the cap or 1 GiB, or a compressed frame declares a larger image than the "
    "header",
    "inflated-too-large": "a deflated (Deflated Explicit VR Little Endian) file whose data "
    "inflate to more than the size cap (--max-mb): a decompression bomb, or a file to "
    "re-export uncompressed",
    "symbolic-link": "a symbolic link, or a path through a linked folder: only files stored in "
    "the site folder are read; copy the file itself into the folder",
    "out-of-memory": "checking the file ran into its worker's memory limit: a file that "
    "expands beyond what its header declares, or a limit set too low for the site's images",
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


class DicomRejected(FedradError):
    """A file cannot be used as training data; ``reason`` says why, ``code`` is stable.

    Parameters
    ----------
    path
        The file rejected.
    reason
        What is wrong with it, for the person who exported it.
    code
        A key of :data:`REASON_HELP`.
    """

    def __init__(self, path: Path, reason: str, *, code: str = "undecodable") -> None:
        if code not in REASON_HELP:
            raise ValueError(f"unknown rejection code {code!r}; add it to REASON_HELP")
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason
        self.code = code


def describe_error(exc: BaseException) -> str:
    """Name an exception and the first line of its message (cut short), for a reason text."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{exc.__class__.__name__}: {text[:160]}" if text else exc.__class__.__name__
