"""PHI canary: unique markers planted in every identifying attribute must never leave a site.

Markers go into every attribute of the DICOM PS3.15 Basic Application Level Confidentiality
Profile that the synthetic files carry (plus a few more the profile lists), into private tags
and into nested sequences. Then a federation runs over those sites, and every message a site
sends, every file the run writes and every log line are searched for the markers.
"""

from __future__ import annotations

import itertools
import json
import secrets
from pathlib import Path

import numpy as np
import pydicom
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.serde import message_to_proto
from helpers import fedrad_command, run_command
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from fedrad.core import keys
from fedrad.core.config import RunConfig
from fedrad.synth import SynthConfig, write_consortium
from server.initial_model import initial_arrays, model_spec
from server.strategies import numpy_to_arrays

pytestmark = pytest.mark.timeout(400)

# PS3.15 Table E.1-1 (Basic Profile) attributes; those a file carries are all marked.
BASIC_PROFILE = (
    "AccessionNumber",
    "AcquisitionDate",
    "AcquisitionDateTime",
    "AcquisitionTime",
    "AdditionalPatientHistory",
    "AdmittingDiagnosesDescription",
    "ContentDate",
    "ContentTime",
    "DerivationDescription",
    "DeviceSerialNumber",
    "EthnicGroup",
    "FrameOfReferenceUID",
    "ImageComments",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "InstanceCreatorUID",
    "InstitutionAddress",
    "InstitutionName",
    "InstitutionalDepartmentName",
    "IssuerOfPatientID",
    "MedicalRecordLocator",
    "MilitaryRank",
    "NameOfPhysiciansReadingStudy",
    "Occupation",
    "OperatorsName",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientAddress",
    "PatientAge",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientComments",
    "PatientID",
    "PatientName",
    "PatientSex",
    "PatientSize",
    "PatientTelephoneNumbers",
    "PatientWeight",
    "PerformedProcedureStepDescription",
    "PerformedProcedureStepID",
    "PerformingPhysicianName",
    "PhysiciansOfRecord",
    "ProtocolName",
    "ReferringPhysicianName",
    "RequestingPhysician",
    "SeriesDate",
    "SeriesDescription",
    "SeriesInstanceUID",
    "SeriesTime",
    "SOPInstanceUID",
    "StationName",
    "StudyDate",
    "StudyDescription",
    "StudyID",
    "StudyInstanceUID",
    "StudyTime",
)
ALWAYS_ADDED = (
    "PatientAddress",
    "OtherPatientIDs",
    "PatientComments",
    "StudyDescription",
    "SeriesDescription",
    "OperatorsName",
    "ImageComments",
    "PatientTelephoneNumbers",
)


class Markers:
    """Unique, searchable marker values per value representation."""

    def __init__(self) -> None:
        self.values: list[str] = []
        self._n = itertools.count()
        self._salt = secrets.token_hex(2).upper()

    def text(self) -> str:
        value = f"CANARY{self._salt}{next(self._n):05d}"
        self.values.append(value)
        return value

    def for_vr(self, vr: str) -> str:
        n = next(self._n)
        if vr == "UI":
            value = f"2.25.{int(self._salt, 16)}{n:08d}777"
        elif vr == "DA":
            value = f"18{n % 100:02d}0{1 + n % 9}1{n % 10}"
        elif vr in ("TM", "DT"):
            value = f"23{n % 60:02d}{n % 60:02d}.{n:06d}"
        elif vr == "AS":
            return f"{n % 900:03d}D"  # too short to search for: planted, not checked
        elif vr in ("DS", "IS"):
            return str(1000 + n % 7000)
        else:
            return self.text()
        self.values.append(value)
        return value


def _plant(ds: Dataset, markers: Markers) -> None:
    for keyword in BASIC_PROFILE:
        if keyword in ds or keyword in ALWAYS_ADDED:
            vr = pydicom.datadict.dictionary_VR(pydicom.datadict.tag_for_keyword(keyword))
            setattr(ds, keyword, markers.for_vr(vr))
    block = ds.private_block(0x0011, "CANARY PRIVATE", create=True)
    block.add_new(0x01, "LO", markers.text())
    block.add_new(0x02, "UT", markers.text())
    inner = Dataset()
    inner.PatientName = markers.text()
    inner.PatientID = markers.text()
    inner.ReferencedSOPInstanceUID = markers.for_vr("UI")
    ds.ReferencedPatientSequence = Sequence([inner])
    request = Dataset()
    request.RequestedProcedureDescription = markers.text()
    request.ScheduledProcedureStepID = markers.text()
    nested = Dataset()
    nested.PatientName = markers.text()
    request.ReferencedStudySequence = Sequence([nested])
    ds.RequestAttributesSequence = Sequence([request])


@pytest.fixture(scope="module")
def canary_sites(tmp_path_factory) -> tuple[Path, list[str]]:
    out = tmp_path_factory.mktemp("canary")
    write_consortium(
        out, SynthConfig(sites=2, seed=7, image_size=32, samples_per_site=40), overwrite=True
    )
    markers = Markers()
    for path in sorted(out.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        _plant(ds, markers)
        ds.save_as(path, enforce_file_format=True)
    return out, markers.values


def _leaks(blob: bytes, markers: list[str]) -> list[str]:
    return [m for m in markers if m.encode() in blob]


def test_markers_were_planted(canary_sites):
    sites, markers = canary_sites
    ds = pydicom.dcmread(next((sites / "site-1").rglob("*.dcm")))

    assert str(ds.PatientName) in markers and str(ds.StudyInstanceUID) in markers
    assert len(markers) > 1000


@pytest.fixture
def task_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1, raising=False)


@pytest.mark.parametrize("message_type", ["train", "evaluate"])
def test_no_marker_in_any_message_a_site_sends(canary_sites, task_identity, message_type):
    from client.app import evaluate, train

    sites, markers = canary_sites
    config = RunConfig(image_size=32, batch_size=16)
    spec = model_spec(config)
    values = {
        k: v
        for k, v in config.to_user_config().items()
        if k not in ("sites-dir", "out-dir", "resume-from")
    }
    values.update(
        {keys.MODEL_SPEC: json.dumps(spec.to_dict()), keys.SERVER_ROUND: 1, keys.SPLIT: "val"}
    )
    content = RecordDict(
        {
            keys.ARRAYS: numpy_to_arrays(initial_arrays(spec, 0).items()),
            keys.CONFIG: ConfigRecord(values),
        }
    )
    context = Context(
        run_id=1,
        node_id=1,
        state=RecordDict(),
        run_config={},
        node_config={
            "data-dir": str(sites / "site-1"),
            "cache-dir": str(sites / "node-cache"),
            "ledger-dir": str(sites / "node-ledger"),
            "min-cell-count": 1,
        },
    )
    handler = train if message_type == "train" else evaluate

    reply = handler(Message(content, dst_node_id=1, message_type=message_type), context)

    assert not reply.has_error(), reply.error
    wire = message_to_proto(reply).SerializeToString()
    assert _leaks(wire, markers) == []
    if message_type == "evaluate":  # attributes did leave, coarsened into subgroup counts
        layout = config.fairness_layout
        vector = np.asarray(reply.content[keys.METRICS][keys.FAIRNESS])
        assert sum(layout.count(vector, c) for c in layout.cells) > 0


def test_no_marker_in_run_files_or_logs(canary_sites, tmp_path):
    sites, markers = canary_sites
    run_dir = tmp_path / "run"

    result = run_command(
        fedrad_command(
            "-v",
            "simulate",
            str(sites),
            "--out",
            str(run_dir),
            "--num-server-rounds",
            "1",
            "--image-size",
            "32",
            "--batch-size",
            "16",
        ),
        timeout=300,
    )

    assert result.returncode == 0, result.stdout[-3000:]
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in written)
    for path in written:
        assert _leaks(path.read_bytes(), markers) == [], path
    assert _leaks(result.stdout.encode(), markers) == []
    assert "round 1/1" in result.stdout
