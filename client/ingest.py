"""One pass over a site folder: check each file, decode it once, preprocess, cache.

The worker task does everything a file needs in one read: size cap, content hash, DICOM
checks (the same as ``fedrad site check``), decode and modality LUT; for 2D samples the worker
then runs the MONAI preprocessing over each chunk of files, images of one shape as one batch.
Results and their verdicts go to the on-disk cache, so later passes (every round, every fresh
ClientApp process) only ``stat`` the files and read one pack.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import multiprocessing as mp
import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import cast

import numpy as np
import torch

from client.dicom import DicomRejected, open_unlinked
from client.nifti import SUFFIXES as NIFTI_SUFFIXES
from client.nifti import read_nifti
from client.scan import (
    AcceptedFile,
    QuarantinedFile,
    accept_dicom,
    check_worker_memory,
    quarantine_lost,
    quarantined,
)
from client.scan_worker import LostKind, quiet_worker, run_in_workers
from client.transforms import TransformConfig, preprocess, preprocess_batch

Verdict = AcceptedFile | QuarantinedFile
BATCH_PIXELS = 2**22
"""Most pixels preprocessed as one batch: bounds a worker's memory and a batch's time."""


@dataclass(frozen=True)
class Ingested:
    """A worker's result for one file: its verdict and, if accepted, its pixels.

    ``image`` is the preprocessed ``(C, H, W)`` sample for 2D; ``values`` the decoded modality
    values of a slice (3D samples are assembled and preprocessed once all slices are in).
    """

    verdict: Verdict
    image: np.ndarray | torch.Tensor | None = None
    values: np.ndarray | None = None
    shared: bool = False
    """The image was written to the file's slot of :class:`SharedImages`, not sent."""


class SharedImages:
    """One slot per file for its preprocessed 2D image, in memory shared with forked workers.

    A worker writes a chunk's images straight into their files' slots and sends only the
    verdicts: no image is pickled, piped, unpickled or copied again by the parent. A slot is
    read only after its chunk's verdicts arrived (a killed worker's chunk is redone whole).
    """

    def __init__(self, relatives: list[str], shape: tuple[int, ...]) -> None:
        self.slot = {rel: i for i, rel in enumerate(relatives)}
        count = len(relatives) * math.prod(shape)
        self._buffer = mmap.mmap(-1, max(4 * count, 1))  # anonymous and shared across fork
        self.array = np.frombuffer(self._buffer, np.float32, count).reshape(-1, *shape)

    @staticmethod
    def available() -> bool:
        """Whether workers are forked (and so share the slots); else images go by pipe."""
        return "fork" in mp.get_all_start_methods()


def _nifti(path: Path, label: str, max_bytes: int) -> tuple[AcceptedFile, np.ndarray]:
    os.close(open_unlinked(path))  # refuses a symbolic link, as for a DICOM file
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


def decode_file(max_bytes: int, relative: str) -> Ingested:
    """Worker task (cwd = site folder): check and decode one file into modality values."""
    path = Path(relative)
    values: np.ndarray | None
    try:
        if path.name.lower().endswith(NIFTI_SUFFIXES):
            verdict, values = _nifti(path, relative, max_bytes)
        else:
            verdict, values = accept_dicom(path, relative, max_bytes=max_bytes, decode="values")
        return Ingested(verdict, values=values)
    except Exception as exc:  # noqa: BLE001 - a file must never stop a pass
        return _failed(relative, exc)


def _failed(relative: str, exc: Exception) -> Ingested:
    if isinstance(exc, DicomRejected | MemoryError):
        return Ingested(quarantined(relative, exc))
    return Ingested(QuarantinedFile(relative, "malformed", f"{exc.__class__.__name__}: {exc}"))


def _batches(results: list[Ingested]) -> list[list[int]]:
    """Positions of decoded images to preprocess together: same shape and modality."""
    groups: dict[tuple[object, ...], list[list[int]]] = {}
    for i, result in enumerate(results):
        if result.values is None or not isinstance(result.verdict, AcceptedFile):
            continue
        batches = groups.setdefault((result.values.shape, result.verdict.modality), [[]])
        if batches[-1] and (len(batches[-1]) + 1) * result.values.size > BATCH_PIXELS:
            batches.append([])
        batches[-1].append(i)
    return [batch for batches in groups.values() for batch in batches]


def preprocess_chunk(
    transform: TransformConfig,
    results: list[Ingested],
    mark: Callable[[int], None] | None = None,
    *,
    shared: SharedImages | None = None,
) -> list[Ingested]:
    """Preprocess the decoded 2D images of a chunk, in batches; one result per result given.

    A batch that fails is redone image by image, so a file whose preprocessing fails is
    quarantined alone. ``mark(i)`` says which result is being worked on (for the timeout).
    With ``shared``, images go to their files' slots there instead of into the results.
    """
    out = list(results)
    for batch in _batches(results):
        if mark is not None:
            mark(batch[0])
        first = results[batch[0]]
        modality = first.verdict.modality  # type: ignore[union-attr]
        try:
            stack = np.stack([results[i].values for i in batch])  # type: ignore[misc]
            images = preprocess_batch(stack, modality=modality, config=transform).numpy()
        except Exception:  # noqa: BLE001 - redone one by one below, to blame one file
            images = None
        for position, i in enumerate(batch):
            if images is not None:
                out[i] = Ingested(results[i].verdict, image=images[position])
            else:
                if mark is not None:
                    mark(i)
                out[i] = _preprocess_one(transform, results[i])
            if shared is not None and out[i].image is not None:
                shared.array[shared.slot[out[i].verdict.path]] = out[i].image
                out[i] = Ingested(out[i].verdict, shared=True)
    return out


def _preprocess_one(transform: TransformConfig, result: Ingested) -> Ingested:
    verdict = cast(AcceptedFile, result.verdict)
    values = cast(np.ndarray, result.values)
    try:
        image = preprocess(values, modality=verdict.modality, config=transform)
    except Exception as exc:  # noqa: BLE001 - a file must never stop a pass
        return _failed(verdict.path, exc)
    return Ingested(verdict, image=image.numpy())


def _worker_init() -> None:
    """Quiet, single-threaded workers: parallelism comes from the worker count."""
    quiet_worker()
    torch.set_num_threads(1)


def _lost_ingest(relative: str, kind: LostKind, detail: str) -> Ingested:
    return Ingested(quarantine_lost(relative, kind, detail))


def ingest_files(
    site_dir: Path,
    relatives: list[str],
    *,
    transform: TransformConfig | None,
    workers: int,
    timeout_s: float,
    max_bytes: int,
    worker_memory_bytes: int | None = None,
) -> dict[str, Ingested]:
    """Check and decode files of a site, in ``workers`` killable processes (cwd: the site).

    Workers decode file by file (:func:`decode_file`) and, for 2D, preprocess each chunk's
    images in batches (:func:`preprocess_chunk`), into :class:`SharedImages` where workers
    are forked. Each worker's memory may grow by ``worker_memory_bytes`` (None: the default
    of ``client.scan.default_worker_memory``). Returns each relative path's :class:`Ingested`.
    """
    memory = check_worker_memory(worker_memory_bytes, max_bytes)
    if not relatives:
        return {}
    finish, shared = None, None
    if transform is not None and transform.kind == "2d":
        if SharedImages.available():
            shared = SharedImages(relatives, (transform.in_channels, *transform.spatial_size))
        finish = partial(preprocess_chunk, transform, shared=shared)
    results = run_in_workers(
        partial(decode_file, max_bytes),
        relatives,
        cwd=site_dir.resolve(),
        workers=workers,
        timeout_s=timeout_s,
        on_lost=_lost_ingest,
        initializer=_worker_init,
        finish=finish,
        memory_limit_bytes=memory,
    )
    out: dict[str, Ingested] = {}
    slots = torch.from_numpy(shared.array).unbind(0) if shared is not None else ()
    for i, (rel, result) in enumerate(zip(relatives, results, strict=True)):
        if result.shared and slots:
            result = Ingested(result.verdict, image=slots[i])
        if result.verdict.path != rel:
            result = replace(result, verdict=replace(result.verdict, path=rel))
        out[rel] = result
    return out


_ACCEPTED_FIELDS = tuple(f.name for f in fields(AcceptedFile))
_QUARANTINED_FIELDS = tuple(f.name for f in fields(QuarantinedFile))
CHECKS_VERSION = "checks:2"
"""Which checks a verdict passed: raise it when a check changes (2: links, inflation, memory)."""
RECORD_SCHEMA = (
    f"accepted:{','.join(_ACCEPTED_FIELDS[1:])}",
    f"quarantined:{','.join(_QUARANTINED_FIELDS[1:])}",
    CHECKS_VERSION,
)
"""What a verdict record holds and which checks made it (the cache ignores records written
to another schema: verdicts from older checks are made again)."""


def verdict_to_record(verdict: Verdict) -> list[object]:
    """A verdict as the cache stores it: its kind, then its fields but the path, in order."""
    kind = "accepted" if isinstance(verdict, AcceptedFile) else "quarantined"
    return [kind, *list(vars(verdict).values())[1:]]


def verdict_from_record(path: str, record: list[object]) -> Verdict | None:
    """Rebuild a cached verdict; None when the record does not fit its kind."""
    kind, values = record[0], record[1:]
    if kind == "accepted" and len(values) == len(_ACCEPTED_FIELDS) - 1:
        # Filled the way pickle fills it: the frozen __init__ costs 19 object.__setattr__
        # calls, more than the rest of rebuilding a cached verdict.
        verdict = object.__new__(AcceptedFile)
        verdict.__dict__.update(zip(_ACCEPTED_FIELDS, (path, *values), strict=True))
        return verdict
    if kind == "quarantined" and len(values) == len(_QUARANTINED_FIELDS) - 1:
        return QuarantinedFile(path, *values)  # type: ignore[arg-type]
    return None
