"""One DICOM file, read safely: checked, then decoded into modality values.

The way of a file, one module per step:

- :mod:`client.dicom.reading`: a size-capped read that never follows a symbolic link, a parse
  that is never forced, bounds a deflated file's inflation and rejects a truncated file, and
  the attributes kept at the site (:func:`header_attributes`);
- :mod:`client.dicom.checks`: the object (an image, with its identity, no burned-in text) and
  its pixel geometry (:func:`read_checked` runs reading and checks on one file);
- :mod:`client.dicom.pixels`: decoding, checked against the declared shape, and modality
  values (:func:`read_pixels` does it all for one file);
- :mod:`client.dicom.reasons`: why a file is refused, as a stable code of
  :data:`REASON_HELP` carried by :class:`DicomRejected`.

The site scan and the ingest pass (``client.scan``, ``client.ingest``) accept a file through
``client.scan.accept_dicom``, which builds on :func:`read_checked`.
"""

from client.dicom.checks import (
    DECODE_CAP_FACTOR,
    MAX_DECODED_BYTES,
    REQUIRED_IMAGE_TAGS,
    CheckedDicom,
    PixelGeometry,
    check_geometry,
    check_object,
    decoded_cap,
    read_checked,
)
from client.dicom.pixels import READ_PIXELS_MAX_BYTES, decode_pixels, modality_values, read_pixels
from client.dicom.reading import header_attributes, open_unlinked, parse_dicom, read_capped
from client.dicom.reasons import REASON_HELP, DicomRejected

__all__ = [
    "DECODE_CAP_FACTOR",
    "MAX_DECODED_BYTES",
    "READ_PIXELS_MAX_BYTES",
    "REASON_HELP",
    "REQUIRED_IMAGE_TAGS",
    "CheckedDicom",
    "DicomRejected",
    "PixelGeometry",
    "check_geometry",
    "check_object",
    "decode_pixels",
    "decoded_cap",
    "header_attributes",
    "modality_values",
    "open_unlinked",
    "parse_dicom",
    "read_capped",
    "read_checked",
    "read_pixels",
]
