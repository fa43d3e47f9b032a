"""One pass over a site folder: check each file, decode it once, preprocess, cache.

The worker task does everything a file needs in one read: size cap, content hash, DICOM
checks (the same as ``fedrad site check``), decode, modality LUT and, for 2D samples, the
MONAI preprocessing. Results and their verdicts go to the on-disk cache, so later passes
(every round, every fresh ClientApp process) only ``stat`` the files and read one pack.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from client.dicom import (
    DECODE_CAP_FACTOR,
    DicomRejected,
    check_geometry,
    check_object,
    decode_pixels,
    header_attributes,
    modality_values,
    parse_dicom,
    read_capped,
)
from client.nifti import SUFFIXES as NIFTI_SUFFIXES
from client.nifti import read_nifti
from client.scan import AcceptedFile, QuarantinedFile, _lost, _quiet_worker
from client.scan_worker import run_in_workers
from client.transforms import TransformConfig, preprocess

Verdict = AcceptedFile | QuarantinedFile


@dataclass(frozen=True)
class Ingested:
    """A worker's result for one file: its verdict and, if accepted, its pixels.

    ``image`` is the preprocessed ``(C, H, W)`` sample for 2D; ``values`` the decoded modality
    values of a slice (3D samples are assembled and preprocessed once all slices are in).
    """

    verdict: Verdict
    image: np.ndarray | None = None
    values: np.ndarray | None = None


def _nifti(path: Path, label: str, max_bytes: int) -> tuple[AcceptedFile, np.ndarray]:
    volume = read_nifti(path, max_bytes=max_bytes)
    data = path.read_bytes()
    info = path.stat()
    shape = volume.values.shape
    return AcceptedFile(
        path=label,
        sha256=hashlib.sha256(data).hexdigest(),
        size=info.st_size,
        mtime_ns=info.st_mtime_ns,
        modality=volume.modality,
        sop_class_uid="nifti",
        sop_instance_uid="",
        series_uid="",
        study_uid="",
        rows=shape[-2],
        columns=shape[-1],
        frames=shape[0] if len(shape) == 3 else 1,
        samples_per_pixel=1,
        transfer_syntax="nifti",
        position_z=None,
        instance_number=None,
        sex="",
        age_years=None,
        manufacturer="",
    ), volume.values


def _accept(path: Path, label: str, max_bytes: int) -> tuple[AcceptedFile, np.ndarray]:
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return _nifti(path, label, max_bytes)
    data, info = read_capped(path, max_bytes=max_bytes)
    ds = parse_dicom(data, path)
    check_object(ds, path)
    geometry = check_geometry(ds, path, max_decoded_bytes=DECODE_CAP_FACTOR * max_bytes)
    values = modality_values(decode_pixels(ds, geometry, path), ds, path)
    verdict = AcceptedFile(
        path=label,
        sha256=hashlib.sha256(data).hexdigest(),
        size=info.st_size,
        mtime_ns=info.st_mtime_ns,
        rows=geometry.rows,
        columns=geometry.columns,
        frames=geometry.frames,
        samples_per_pixel=geometry.samples_per_pixel,
        transfer_syntax=str(geometry.transfer_syntax),
        **header_attributes(ds),  # type: ignore[arg-type]
    )
    return verdict, values


def ingest_file(transform: TransformConfig | None, max_bytes: int, relative: str) -> Ingested:
    """Worker task (cwd = site folder): check, decode and, for 2D, preprocess one file."""
    path = Path(relative)
    try:
        verdict, values = _accept(path, relative, max_bytes)
        if transform is not None and transform.kind == "2d":
            image = preprocess(values, modality=verdict.modality, config=transform).numpy()
            return Ingested(verdict, image=image)
        return Ingested(verdict, values=values)
    except DicomRejected as exc:
        return Ingested(QuarantinedFile(relative, exc.code, exc.reason))
    except MemoryError:
        return Ingested(QuarantinedFile(relative, "too-large", "ran out of memory"))
    except Exception as exc:  # noqa: BLE001 - a file must never stop a pass
        return Ingested(QuarantinedFile(relative, "malformed", f"{exc.__class__.__name__}: {exc}"))


def _worker_init() -> None:
    """Quiet, single-threaded workers: parallelism comes from the worker count."""
    _quiet_worker()
    torch.set_num_threads(1)


def _lost_ingest(relative: str, kind: str, detail: str) -> Ingested:
    return Ingested(_lost(relative, kind, detail))


def ingest_files(
    site_dir: Path,
    relatives: list[str],
    *,
    transform: TransformConfig | None,
    workers: int,
    timeout_s: float,
    max_bytes: int,
) -> dict[str, Ingested]:
    """Run :func:`ingest_file` over files of a site, in ``workers`` killable processes."""
    if not relatives:
        return {}
    results = run_in_workers(
        partial(ingest_file, transform, max_bytes),
        relatives,
        cwd=site_dir.resolve(),
        workers=workers,
        timeout_s=timeout_s,
        on_lost=_lost_ingest,
        initializer=_worker_init,
    )
    return {
        rel: r if r.verdict.path == rel else replace(r, verdict=replace(r.verdict, path=rel))
        for rel, r in zip(relatives, results, strict=True)
    }


def verdict_to_dict(verdict: Verdict) -> dict[str, object]:
    """A verdict as the cache stores it."""
    kind = "accepted" if isinstance(verdict, AcceptedFile) else "quarantined"
    return {"kind": kind, **asdict(verdict)}


def verdict_from_dict(data: dict[str, object]) -> Verdict:
    """Rebuild a cached verdict."""
    fields = {k: v for k, v in data.items() if k != "kind"}
    if data["kind"] == "accepted":
        return AcceptedFile(**fields)  # type: ignore[arg-type]
    return QuarantinedFile(**fields)  # type: ignore[arg-type]
