"""DICOM encoding of the phantoms: deterministic UIDs, per-site templates, Part-10 files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from fedrad.synth.ct import RESCALE_INTERCEPT
from fedrad.synth.sites import SiteProfile

SOP_CLASSES = {
    "CR": ComputedRadiographyImageStorage,
    "DX": DigitalXRayImageStorageForPresentation,
    "CT": CTImageStorage,
}
_META_GROUP_LENGTH, _MEDIA_SOP_INSTANCE = BaseTag(0x00020000), BaseTag(0x00020003)
SYNTH_MARKER = "fedrad synth: synthetic phantom, not a patient"
"""DeidentificationMethod of every file written here; overwrite checks look for it."""
CT_KERNELS = {
    "SIEMENS": "B30f",
    "GE MEDICAL SYSTEMS": "STANDARD",
    "Philips": "B",
    "Canon Medical Systems": "FC13",
    "United Imaging": "B_SOFT_B",
    "TOSHIBA": "FC13",
}


def make_uid(*keys: object) -> UID:
    """Return a UID derived only from ``keys`` (joined unambiguously), so runs repeat."""
    return generate_uid(entropy_srcs=["\x1f".join(["fedrad-synth", *map(str, keys)])])


@dataclass(frozen=True)
class StudyTags:
    """The per-patient, per-study and per-series values of one image or series."""

    patient_number: int
    sex: str
    age: int
    birth_date: str
    study_date: str
    study_time: str
    study_uid: UID
    series_uid: UID
    frame_uid: UID


def _common_template(site: SiteProfile) -> Dataset:
    """Return a dataset with the tags every file of ``site`` shares."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = SOP_CLASSES[site.modality]
    ds.Modality = site.modality
    ds.Manufacturer = site.manufacturer
    ds.ManufacturerModelName = site.model
    ds.InstitutionName = site.institution
    ds.StationName = f"SYN{site.index:02d}"
    ds.ReferringPhysicianName = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = SYNTH_MARKER
    ds.BodyPartExamined = "CHEST"
    ds.BurnedInAnnotation = "NO"
    ds.Rows = ds.Columns = site.size
    ds.PixelSpacing = [site.pixel_spacing, site.pixel_spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope = "1"
    return ds


def xray_template(site: SiteProfile) -> Dataset:
    """Return the shared tags of a CR or DX site; the window spans its body-to-air range."""
    ds = _common_template(site)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SeriesNumber = 1
    ds.ViewPosition = "PA"
    ds.ImagerPixelSpacing = [site.pixel_spacing, site.pixel_spacing]
    ds.KVP = "120"
    if site.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1
        ds.PresentationLUTShape = "IDENTITY"
    ds.RescaleIntercept, ds.RescaleType = "0", "US"
    low, high = (4095 * (site.gain * x**site.gamma + site.offset) for x in (0.05, 0.9))
    ds.WindowCenter, ds.WindowWidth = str(round((low + high) / 2)), str(round(high - low))
    return ds


def ct_template(site: SiteProfile) -> Dataset:
    """Return the shared tags of a CT site (axial, head first supine, lung window)."""
    ds = _common_template(site)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SeriesNumber = 2
    ds.PatientPosition = "HFS"
    ds.KVP = "120"
    ds.ConvolutionKernel = CT_KERNELS.get(site.manufacturer, "STANDARD")
    ds.SliceThickness = site.slice_thickness
    ds.SpacingBetweenSlices = site.slice_thickness
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PositionReferenceIndicator = ""
    ds.AcquisitionNumber = 1
    ds.RescaleIntercept, ds.RescaleType = str(RESCALE_INTERCEPT), "HU"
    ds.WindowCenter, ds.WindowWidth = "-600", "1500"
    return ds


def study_dataset(tags: StudyTags, modality: str) -> Dataset:
    """Return the patient, study and series tags of one image or series."""
    ds = Dataset()
    number = tags.patient_number
    ds.PatientName = f"SYN^P{number:06d}"
    ds.PatientID = f"P{number:06d}"
    ds.PatientSex = tags.sex
    ds.PatientAge = f"{tags.age:03d}Y"
    ds.PatientBirthDate = tags.birth_date
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = tags.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = tags.study_time
    ds.StudyInstanceUID = tags.study_uid
    ds.SeriesInstanceUID = tags.series_uid
    ds.AccessionNumber = f"A{number:08d}"
    ds.StudyID = f"S{number:07d}"
    if modality == "CT":
        ds.FrameOfReferenceUID = tags.frame_uid
    return ds


def instance_dataset(sop_uid: UID, pixels: np.ndarray, instance_number: int = 1) -> Dataset:
    """Return the per-file tags: SOPInstanceUID, InstanceNumber and 16-bit PixelData."""
    ds = Dataset()
    ds.SOPInstanceUID = sop_uid
    ds.InstanceNumber = instance_number
    ds.add_new(0x7FE00010, "OW", np.ascontiguousarray(pixels, dtype="<u2").tobytes())
    return ds


def set_slice_position(ds: Dataset, template: Dataset, position: int, slices: int) -> None:
    """Place ``ds`` as slice ``position`` (0-based, z up) of a centred axial stack."""
    half_width = (template.Rows - 1) / 2 * float(template.PixelSpacing[0])
    z = round((position - (slices - 1) / 2) * float(template.SliceThickness), 4)
    ds.InstanceNumber = position + 1
    ds.ImagePositionPatient = [round(-half_width, 4), round(-half_width, 4), z]
    ds.SliceLocation = z


def encode_element(element: DataElement, encoding: str | list[str]) -> bytes:
    """Encode one element as Explicit VR Little Endian bytes."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_data_element(buffer, element, encoding)
    return buffer.getvalue()


def encode_elements(ds: Dataset, encoding: str | list[str]) -> dict[BaseTag, bytes]:
    """Encode each element of ``ds`` as Explicit VR Little Endian bytes, keyed by tag."""
    return {tag: encode_element(ds[tag], encoding) for tag in ds.keys()}


class InstanceWriter:
    """Write Part-10 files that share one template, encoding the template only once.

    A file is template + study + instance elements; the result is byte for byte
    what ``dcmwrite(path, merged, enforce_file_format=True)`` writes (a test checks
    it), at a fraction of the cost when a CT series repeats its study tags per slice.
    """

    def __init__(self, template: Dataset) -> None:
        self.template = template
        self.encoding: str | list[str] = template.get("SpecificCharacterSet", "iso8859")
        self._constant = encode_elements(template, self.encoding)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = template.SOPClassUID
        meta.MediaStorageSOPInstanceUID = UID("1.2")  # placeholder, encoded per file
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        validate_file_meta(meta, enforce_standard=True)  # adds version and implementation
        self._meta = encode_elements(meta, "iso8859")

    def write(self, path: Path, study: dict[BaseTag, bytes], instance: Dataset) -> None:
        """Write one file from pre-encoded ``study`` elements and an ``instance`` dataset."""
        elements = {**self._constant, **study, **encode_elements(instance, self.encoding)}
        meta = {
            **self._meta,
            _MEDIA_SOP_INSTANCE: encode_element(
                DataElement(_MEDIA_SOP_INSTANCE, "UI", instance.SOPInstanceUID), "iso8859"
            ),
        }
        meta_body = b"".join(meta[tag] for tag in sorted(meta))
        group_length = DataElement(_META_GROUP_LENGTH, "UL", len(meta_body))
        path.write_bytes(
            b"".join(
                [
                    b"\x00" * 128,
                    b"DICM",
                    encode_element(group_length, "iso8859"),
                    meta_body,
                    *(elements[tag] for tag in sorted(elements)),
                ]
            )
        )
