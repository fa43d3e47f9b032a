"""Write one site-format folder: the rendered, encoded and labelled samples of its parts."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.tag import BaseTag
from pydicom.uid import UID

from fedrad.synth import ct, xray
from fedrad.synth.cohort import Cohort, assign_splits, draw_cohort
from fedrad.synth.config import SynthConfig
from fedrad.synth.dicom import (
    InstanceWriter,
    StudyTags,
    ct_template,
    encode_elements,
    instance_dataset,
    make_uid,
    set_slice_position,
    study_dataset,
    xray_template,
)
from fedrad.synth.layout import write_labels
from fedrad.synth.sites import SiteProfile

logger = logging.getLogger(__name__)

CHUNK_2D, CHUNK_3D = 256, 8  # images / series rendered at once: bounds memory
HOLDOUT_KEY = 0


@dataclass(frozen=True)
class Part:
    """The samples of one folder that come from one source site."""

    site: SiteProfile
    n_samples: int
    n_positive: int
    first_patient: int


@dataclass(frozen=True)
class _Target:
    """Where and how one folder's files are written."""

    folder: Path
    config: SynthConfig
    digest: str
    width: int

    def uid(self, index: int, *what: object) -> UID:
        """Return the UID of ``what`` for sample ``index`` of this folder."""
        return make_uid(self.digest, self.folder.name, index, *what)


def write_folder(
    folder: Path, parts: Sequence[Part], config: SynthConfig, *, folder_key: int
) -> int:
    """Write all ``parts`` into ``folder`` plus its ``labels.csv``; return the file count.

    ``folder_key`` is the site index, or :data:`HOLDOUT_KEY`: site folders get
    stratified train/val splits; the holdout gets ``test`` and a shuffled order
    that hides each sample's source site.
    """
    is_holdout = folder_key == HOLDOUT_KEY
    total = sum(p.n_samples for p in parts)
    digest = hashlib.sha256(repr(config).encode()).hexdigest()[:16]
    target = _Target(folder, config, digest, max(5, len(str(total))))
    positions = (
        np.random.default_rng([config.seed, 4]).permutation(total)
        if is_holdout
        else np.arange(total)
    )
    folder.mkdir()
    rows: dict[int, tuple[str, int, str]] = {}
    n_files, start = 0, 0
    for part in (p for p in parts if p.n_samples):
        rng = np.random.default_rng([config.seed, 2, folder_key, part.site.index])
        draw_contrast = xray.draw_contrast if config.kind == "2d" else ct.draw_contrast
        cohort = draw_cohort(
            rng, part.n_samples, part.n_positive, draw_contrast, config.subgroup_contrast_factor
        )
        splits = ("test",) * len(cohort) if is_holdout else assign_splits(rng, cohort.labels)
        indices = positions[start : start + part.n_samples]
        written = _write_part(target, part, cohort, indices, rng)
        for i, (index, (sample_id, files)) in enumerate(zip(indices, written, strict=True)):
            rows[int(index)] = (sample_id, int(cohort.labels[i]), splits[i])
            n_files += files
        start += part.n_samples
    write_labels(folder, [rows[i] for i in sorted(rows)])
    logger.info("Wrote %s: %d samples, %d DICOM files", folder, total, n_files)
    return n_files


def _write_part(
    target: _Target,
    part: Part,
    cohort: Cohort,
    indices: np.ndarray,
    rng: np.random.Generator,
) -> Iterator[tuple[str, int]]:
    """Render and write one part chunk by chunk; yield ``(id, files)`` per sample."""
    is_2d = target.config.kind == "2d"
    template = xray_template(part.site) if is_2d else ct_template(part.site)
    writer = InstanceWriter(template)
    chunk = CHUNK_2D if is_2d else CHUNK_3D
    for start in range(0, len(cohort), chunk):
        contrast = cohort.contrast[start : start + chunk]
        if is_2d:
            images = xray.render_xrays(rng, part.site, contrast)
        else:
            images = ct.render_ct(rng, part.site, contrast, target.config.slices)
        for offset, pixels in enumerate(images):
            i = start + offset
            index = int(indices[i])
            tags = _study_tags(target, cohort, i, part.first_patient + i, index)
            study = encode_elements(study_dataset(tags, part.site.modality), writer.encoding)
            if is_2d:
                yield _write_image(target, writer, study, pixels, index), 1
            else:
                _write_series(target, writer, study, pixels, index, rng)
                yield tags.series_uid, target.config.slices


def _study_tags(
    target: _Target, cohort: Cohort, i: int, patient_number: int, index: int
) -> StudyTags:
    """Collect the patient, study and series values of sample ``i`` of ``cohort``."""
    return StudyTags(
        patient_number,
        "F" if cohort.female[i] else "M",
        int(cohort.ages[i]),
        cohort.birth_dates[i],
        cohort.study_dates[i],
        cohort.study_times[i],
        target.uid(index, "study"),
        target.uid(index, "series"),
        target.uid(index, "frame"),
    )


def _write_image(
    target: _Target,
    writer: InstanceWriter,
    study: dict[BaseTag, bytes],
    pixels: np.ndarray,
    index: int,
) -> str:
    """Write one 2D image as ``images/img-<index>.dcm``; return that relative path."""
    relative = f"images/img-{index + 1:0{target.width}d}.dcm"
    (target.folder / "images").mkdir(exist_ok=True)
    writer.write(
        target.folder / relative, study, instance_dataset(target.uid(index, "sop"), pixels)
    )
    return relative


def _write_series(
    target: _Target,
    writer: InstanceWriter,
    study: dict[BaseTag, bytes],
    volume: np.ndarray,
    index: int,
    rng: np.random.Generator,
) -> None:
    """Write one CT series as ``series/<index>/slice-<k>.dcm`` with shuffled ``k``."""
    series_dir = target.folder / "series" / str(index + 1)
    series_dir.mkdir(parents=True)
    slices = volume.shape[0]
    for file_number, position in enumerate(_slice_order(rng, slices), start=1):
        instance = instance_dataset(target.uid(index, "sop", position), volume[position])
        set_slice_position(instance, writer.template, position, slices)
        writer.write(series_dir / f"slice-{file_number}.dcm", study, instance)


def _slice_order(rng: np.random.Generator, slices: int) -> list[int]:
    """Return a permutation of positions whose order differs from both name sortings.

    Neither numeric (slice-1, slice-2, ...) nor lexicographic (slice-1, slice-10, ...)
    file-name order may equal position order, so readers must sort by position.
    """
    lexicographic = sorted(range(1, slices + 1), key=str)
    while True:
        order = [int(p) for p in rng.permutation(slices)]
        by_name = [order[number - 1] for number in lexicographic]
        if order != sorted(order) and by_name != sorted(by_name):
            return order
