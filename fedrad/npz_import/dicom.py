"""Writing imported images as DICOM: one template per folder, a few changed elements per file.

Every file is Secondary Capture Image Storage, whatever ``Modality`` says: MedMNIST images
are derived, resized 8-bit images, not acquisitions, and Secondary Capture is the DICOM
object for converted images. 3D volumes get nominal 1 mm voxels (MedMNIST keeps no spacing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID, SecondaryCaptureImageStorage, generate_uid

from fedrad.npz_import.archive import ImageKind
from fedrad.synth.dicom import InstanceWriter, encode_elements
from fedrad.synth.layout import write_labels

MODALITIES = ("CR", "DX", "US", "CT", "MR", "OT", "XC")
IMPORT_MARKER = "fedrad import-npz: public benchmark image, no patient data"
"""DeidentificationMethod of every file written here; overwrite checks look for it."""
MANUFACTURER = "MedMNIST import"
VOXEL_MM = 1.0


@dataclass(frozen=True)
class FolderPlan:
    """What one output folder receives: sample indices into one archive split, and splits."""

    name: str
    patient_prefix: str
    source: str
    indices: np.ndarray
    splits: Sequence[str]


def make_uid(digest: str, *keys: object) -> UID:
    """Return a UID derived only from the import's ``digest`` and ``keys``, so runs repeat."""
    return generate_uid(entropy_srcs=["\x1f".join(["fedrad-import-npz", digest, *map(str, keys)])])


def folder_template(
    kind: ImageKind,
    shape: tuple[int, ...],
    *,
    modality: str,
    institution: str,
    description: str,
) -> Dataset:
    """Return the tags every file of one folder shares."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.Modality = modality
    ds.ConversionType = "WSD"
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = institution
    ds.PatientBirthDate = ds.PatientSex = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = IMPORT_MARKER
    ds.StudyDate = ds.StudyTime = ds.ReferringPhysicianName = ds.AccessionNumber = ""
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.SeriesDescription = description[:64]
    ds.BurnedInAnnotation = "NO"
    ds.Rows, ds.Columns = shape[:2] if kind.channels == 3 else shape[-2:]
    ds.SamplesPerPixel = kind.channels
    ds.PhotometricInterpretation = "RGB" if kind.channels == 3 else "MONOCHROME2"
    if kind.channels == 3:
        ds.PlanarConfiguration = 0  # colour-by-pixel: MedMNIST's channels-last bytes as they are
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if kind.kind == "3d":
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [VOXEL_MM, VOXEL_MM]
        ds.SliceThickness = ds.SpacingBetweenSlices = VOXEL_MM
        ds.PositionReferenceIndicator = ""
    else:
        ds.PatientOrientation = ""
    return ds


def write_folder(
    folder: Path,
    plan: FolderPlan,
    images: np.ndarray,
    labels: np.ndarray,
    kind: ImageKind,
    *,
    modality: str,
    digest: str,
    description: str,
) -> int:
    """Write the planned samples into ``folder`` with its ``labels.csv``; return the file count.

    2D: ``images/img-000001.dcm`` (id: that path). 3D: ``series/000001/slice-001.dcm`` per
    slice, one series per volume (id: its SeriesInstanceUID).
    """
    template = folder_template(
        kind,
        images.shape[1:],
        modality=modality,
        institution=plan.name.split("/")[0],
        description=description,
    )
    writer = InstanceWriter(template)
    width = max(6, len(str(plan.indices.size)))
    folder.mkdir(parents=True)
    (folder / ("series" if kind.kind == "3d" else "images")).mkdir()
    rows: list[tuple[str, int, str]] = []
    n_files = 0
    for number, (index, split) in enumerate(zip(plan.indices, plan.splits, strict=True), 1):
        uid = partial(make_uid, digest, plan.name, number)
        study = Dataset()
        study.PatientID = f"{plan.patient_prefix}-{number:0{width}d}"
        study.PatientName = study.PatientID
        study.StudyInstanceUID, study.SeriesInstanceUID = uid("study"), uid("series")
        study.ImageComments = f"{plan.source}[{int(index)}]"
        if kind.kind == "3d":
            study.FrameOfReferenceUID = uid("frame")
        encoded = encode_elements(study, writer.encoding)
        if kind.kind == "3d":
            series_dir = folder / "series" / f"{number:0{width}d}"
            series_dir.mkdir()
            volume = images[index]
            slice_width = max(3, len(str(volume.shape[0])))
            for position, pixels in enumerate(volume):
                instance = _instance(uid("sop", position), pixels, position + 1)
                z = position * VOXEL_MM
                instance.ImagePositionPatient = [0.0, 0.0, z]
                instance.SliceLocation = z
                writer.write(
                    series_dir / f"slice-{position + 1:0{slice_width}d}.dcm", encoded, instance
                )
            sample_id, n_files = str(study.SeriesInstanceUID), n_files + volume.shape[0]
        else:
            sample_id = f"images/img-{number:0{width}d}.dcm"
            writer.write(folder / sample_id, encoded, _instance(uid("sop"), images[index], 1))
            n_files += 1
        rows.append((sample_id, int(labels[index]), split))
    write_labels(folder, rows)
    return n_files


def _instance(sop_uid: UID, pixels: np.ndarray, instance_number: int) -> Dataset:
    """Return the per-file tags: SOPInstanceUID, InstanceNumber and 8-bit PixelData."""
    ds = Dataset()
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = instance_number
    ds.add_new(0x7FE00010, "OB", np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    return ds
