"""Reading one NIfTI file (``.nii``, ``.nii.gz``) safely into the layout DICOM volumes have.

Orientation comes from nibabel: the volume is reoriented to the closest canonical RAS+
orientation (``nib.as_closest_canonical``), then laid out as an axial DICOM series is after
sorting by ImagePositionPatient: ``(D, H, W)`` = (inferior -> superior, anterior ->
posterior, patient right -> left). So D runs along the canonical third voxel axis, and a
NIfTI volume and the DICOM series it was converted from give the same array. A 2D image
(one axis of length 1) is shown as a radiograph is: rows superior -> inferior (or anterior
-> posterior for an axial slice), columns patient right -> left.

Rejections carry the stable codes of ``client.dicom.REASON_HELP`` (``malformed``,
``truncated``, ``too-large``, ``unsupported-object``, ``unreadable``, ``undecodable``).

Modality: a NIfTI header does not say it, and guessing "CT" from intensities would make the
site apply its Hounsfield window to data that may not be in HU; ``modality`` is always
``"OT"``, and a site that knows better says so in its own configuration.

4D files (time series, multi-echo) are refused rather than cut to their first volume: which
volume was labelled is not in the file. Trailing axes of length 1 are dropped first.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from client.dicom import DicomRejected

SUFFIXES = (".nii", ".nii.gz")
MODALITY = "OT"


@dataclass(frozen=True)
class NiftiVolume:
    """Decoded voxel values, ``(D, H, W)`` or ``(H, W)`` float32, and their spacing in mm."""

    values: np.ndarray
    modality: str
    spacing: tuple[float, ...]


def read_nifti(path: Path, *, max_bytes: int) -> NiftiVolume:
    """Read a 2D or 3D NIfTI file; raise DicomRejected with a specific reason if unusable.

    ``max_bytes`` bounds both the file on disk and the voxel data it declares (stored or as
    float32, whichever is larger), checked from the header before any voxel is read, so a
    small compressed file cannot expand into a huge array.
    """
    name = path.name.lower()
    if not name.endswith(SUFFIXES):
        raise DicomRejected(
            path, "not a NIfTI file name (expected .nii or .nii.gz)", code="unsupported-object"
        )
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DicomRejected(
            path, f"cannot be opened ({exc.__class__.__name__})", code="unreadable"
        ) from None
    if size > max_bytes:
        raise DicomRejected(
            path, f"file too large: {size} bytes, limit {max_bytes}", code="too-large"
        )
    try:
        image = nib.load(path, mmap=False)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types for a bad header
        raise DicomRejected(
            path, f"not a readable NIfTI file ({_why(exc)})", code="malformed"
        ) from None
    if not isinstance(image, nib.Nifti1Image):
        raise DicomRejected(
            path, f"not a NIfTI image ({type(image).__name__})", code="unsupported-object"
        )
    shape = _spatial_shape(path, tuple(int(n) for n in image.shape))
    _check_size(path, image, shape, max_bytes)
    affine = image.affine
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise DicomRejected(
            path, "affine is singular or non-finite: orientation unknown", code="malformed"
        )
    try:
        data = np.asarray(image.get_fdata(dtype=np.float32)).reshape(shape)
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt voxel data
        code = "truncated" if isinstance(exc, EOFError | OSError) else "undecodable"
        raise DicomRejected(
            path, f"voxel data unreadable or truncated ({_why(exc)})", code=code
        ) from None
    if not np.isfinite(data).all():
        raise DicomRejected(
            path, "voxel data holds non-finite values (NaN or infinity)", code="undecodable"
        )
    # nibabel's functions carry no type hints: each call says so to mypy
    volume = nib.Nifti1Image(data.reshape(_as_3d(shape)), affine)  # type: ignore[no-untyped-call]
    canonical = nib.as_closest_canonical(volume)  # type: ignore[no-untyped-call]
    ras = np.asarray(canonical.dataobj, dtype=np.float32)
    voxel_sizes = nib.affines.voxel_sizes(canonical.affine)  # type: ignore[no-untyped-call]
    zooms = tuple(float(z) for z in voxel_sizes)
    values, spacing = (
        _dicom_layout(ras, zooms)
        if len(shape) == 3 and 1 not in shape
        else _radiograph_layout(ras, zooms)
    )
    return NiftiVolume(np.ascontiguousarray(values), MODALITY, spacing)


def _why(exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{exc.__class__.__name__}: {text[:120]}" if text else exc.__class__.__name__


def _spatial_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop trailing length-1 axes beyond the third; refuse what is not 2D or 3D."""
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) > 3:
        raise DicomRejected(
            path,
            f"{len(shape)}D image of shape {shape} ({int(np.prod(shape[3:]))} volumes): "
            "only 2D and 3D are used; export the labelled volume as its own 3D file",
            code="unsupported-object",
        )
    if len(shape) < 2 or min(shape) < 1 or sum(n > 1 for n in shape) < 2:
        raise DicomRejected(path, f"shape {shape} is not a 2D image or 3D volume", code="malformed")
    return shape


def _check_size(path: Path, image: nib.Nifti1Image, shape: tuple[int, ...], limit: int) -> None:
    dtype = image.header.get_data_dtype()  # type: ignore[no-untyped-call]
    if (
        dtype.fields is not None
        or not np.issubdtype(dtype, np.number)
        or (np.issubdtype(dtype, np.complexfloating))
    ):
        raise DicomRejected(
            path,
            f"voxel type {dtype} is not a real number (RGB or complex?)",
            code="unsupported-object",
        )
    needed = int(np.prod(shape, dtype=np.float64)) * max(dtype.itemsize, 4)
    if needed > limit:
        raise DicomRejected(
            path, f"too large: shape {shape} needs {needed} bytes, limit {limit}", code="too-large"
        )


def _as_3d(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape if len(shape) == 3 else (*shape, 1)


def _dicom_layout(
    ras: np.ndarray, zooms: tuple[float, ...]
) -> tuple[np.ndarray, tuple[float, ...]]:
    """RAS+ ``(x, y, z)`` -> ``(D, H, W)`` = (S up, A -> P, R -> L), spacing in that order."""
    return ras.transpose(2, 1, 0)[:, ::-1, ::-1], (zooms[2], zooms[1], zooms[0])


def _radiograph_layout(
    ras: np.ndarray, zooms: tuple[float, ...]
) -> tuple[np.ndarray, tuple[float, ...]]:
    """Lay out a RAS+ array with one axis of length 1 as ``(H, W)``, as radiographs are shown."""
    flat = int(np.argmin(ras.shape))
    if flat == 2:  # axial: rows anterior -> posterior, columns right -> left
        return ras[::-1, ::-1, 0].T, (zooms[1], zooms[0])
    if flat == 1:  # coronal: rows superior -> inferior, columns right -> left
        return ras[::-1, 0, ::-1].T, (zooms[2], zooms[0])
    return ras[0, ::-1, ::-1].T, (zooms[2], zooms[1])  # sagittal: rows S -> I, columns A -> P
