"""A site's dataset: labels.csv resolved to DICOM files, decoded, preprocessed with MONAI.

2D samples are single images (CR, DX, US, one CT/MR slice); 3D samples are series assembled
from slices grouped by SeriesInstanceUID and ordered by position. Patient attributes (sex, age
band, manufacturer, modality) stay next to each sample for aggregated reports; they never leave
the site as they are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from client.dicom import DicomHeader, DicomRejected, read_header, read_pixels
from client.labels import LABELS_FILE, LabelRow, assign_split, read_labels
from client.transforms import TransformConfig, preprocess
from fedrad.errors import DataError

log = logging.getLogger(__name__)


def age_band(age_years: int | None) -> str:
    """Coarsen an age to a decade band (``40-49``); ``unknown`` when absent."""
    if age_years is None or age_years < 0:
        return "unknown"
    low = min(age_years // 10 * 10, 90)
    return "90+" if low >= 90 else f"{low}-{low + 9}"


@dataclass(frozen=True)
class Sample:
    """One preprocessed sample and the attributes that stay at the site."""

    id: str
    label: int
    split: str
    image: torch.Tensor
    attributes: dict[str, str]


@dataclass
class SiteDataset(Dataset[tuple[torch.Tensor, int]]):
    """All usable samples of one site folder, plus why the others were skipped."""

    site_dir: Path
    samples: list[Sample]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        return sample.image, sample.label

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        for i in range(len(self)):
            yield self[i]

    def subset(self, split: str) -> SiteDataset:
        """Return the samples of one split (``train``, ``val`` or ``test``)."""
        return SiteDataset(self.site_dir, [s for s in self.samples if s.split == split])


def _inside(site_dir: Path, sample_id: str) -> Path | None:
    """Return the file an id names if it is a path inside the site folder, else None."""
    candidate = (site_dir / sample_id).resolve()
    root = site_dir.resolve()
    if root in candidate.parents and candidate.is_file():
        return candidate
    return None


def _index_headers(site_dir: Path) -> tuple[dict[str, list[DicomHeader]], list[tuple[str, str]]]:
    """Read every DICOM header under the folder, grouped by SeriesInstanceUID and by study."""
    groups: dict[str, list[DicomHeader]] = {}
    rejected: list[tuple[str, str]] = []
    for path in sorted(p for p in site_dir.rglob("*") if p.is_file()):
        if path.name == LABELS_FILE or path.name.startswith("."):
            continue
        try:
            header = read_header(path)
        except DicomRejected as exc:
            rejected.append((str(path.relative_to(site_dir)), exc.reason))
            continue
        for uid in (header.series_uid, header.study_uid):
            if uid:
                groups.setdefault(uid, []).append(header)
    return groups, rejected


def _resolve(
    site_dir: Path, rows: list[LabelRow]
) -> tuple[list[tuple[LabelRow, list[Path]]], list[tuple[str, str]]]:
    """Map each labelled id to its files; ids naming nothing raise one DataError."""
    resolved: list[tuple[LabelRow, list[Path]]] = []
    pending: list[LabelRow] = []
    for row in rows:
        path = _inside(site_dir, row.id)
        if path is not None:
            resolved.append((row, [path]))
        else:
            pending.append(row)
    rejected: list[tuple[str, str]] = []
    if pending:
        groups, rejected = _index_headers(site_dir)
        missing = [row for row in pending if row.id not in groups]
        if missing:
            shown = ", ".join(f"'{r.id}' (line {r.line})" for r in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DataError(
                f"{site_dir / LABELS_FILE}: {len(missing)} id(s) name no file and no DICOM "
                f"series or study in the folder: {shown}{more}. Fix the ids (a path relative "
                "to the site folder, a SeriesInstanceUID or a StudyInstanceUID) or restore "
                "the files."
            )
        for row in pending:
            headers = _one_series(groups[row.id])
            resolved.append((row, [h.path for h in headers]))
    return resolved, rejected


def _one_series(headers: list[DicomHeader]) -> list[DicomHeader]:
    """Keep the largest series of a group and order its slices by position along z."""
    by_series: dict[str, list[DicomHeader]] = {}
    for h in headers:
        by_series.setdefault(h.series_uid, []).append(h)
    series = max(by_series.values(), key=len)
    return sorted(
        series,
        key=lambda h: (
            h.position_z if h.position_z is not None else float(h.instance_number or 0),
            h.instance_number or 0,
        ),
    )


def _attributes(header: DicomHeader) -> dict[str, str]:
    return {
        "sex": header.sex if header.sex in ("M", "F") else "unknown",
        "age-band": age_band(header.age_years),
        "manufacturer": header.manufacturer or "unknown",
        "modality": header.modality,
    }


def _load_sample(
    row: LabelRow, files: list[Path], config: TransformConfig, site_dir: Path
) -> Sample:
    headers = [read_header(p) for p in files]
    arrays = [read_pixels(p) for p in files]
    if config.kind == "3d":
        if any(a.ndim != 2 for a in arrays) and len(arrays) > 1:
            raise DicomRejected(files[0], "series mixes multi-frame and single-frame files")
        volume = arrays[0] if len(arrays) == 1 and arrays[0].ndim == 3 else np.stack(arrays)
        if volume.ndim != 3:
            raise DicomRejected(files[0], f"cannot form a 3D volume from shape {volume.shape}")
        image = preprocess(volume, modality=headers[0].modality, config=config)
    else:
        if len(arrays) != 1:
            raise DicomRejected(
                files[0], f"id is a series of {len(arrays)} slices but kind is '2d'"
            )
        image = preprocess(arrays[0], modality=headers[0].modality, config=config)
    return Sample(
        id=row.id,
        label=row.label,
        split=row.split or assign_split(row.id),
        image=image,
        attributes=_attributes(headers[0]),
    )


def load_site(site_dir: Path, config: TransformConfig, *, num_classes: int) -> SiteDataset:
    """Load every usable labelled sample of a site folder.

    Files that cannot be decoded are skipped with a reason (``SiteDataset.skipped``) and never
    become training data. Raises DataError when the folder is missing, labels are malformed or
    name nothing, or no usable sample remains.
    """
    if not site_dir.is_dir():
        raise DataError(
            f"Site data folder {site_dir} does not exist; set the node config 'data-dir' "
            "(or the run config 'sites-dir' in simulation) to a folder holding DICOM files "
            "and labels.csv."
        )
    rows = read_labels(site_dir)
    for row in rows:
        if row.label >= num_classes:
            raise DataError(
                f"{site_dir / LABELS_FILE} line {row.line}: label {row.label} is not below "
                f"num-classes={num_classes}; raise num-classes or fix the label."
            )
    resolved, skipped = _resolve(site_dir, rows)
    samples: list[Sample] = []
    for row, files in resolved:
        try:
            samples.append(_load_sample(row, files, config, site_dir))
        except DicomRejected as exc:
            skipped.append((row.id, exc.reason))
    if skipped:
        log.warning("%s: skipped %d file(s) or sample(s) that cannot be used", site_dir, len(skipped))
    if not samples:
        raise DataError(
            f"Site folder {site_dir} has no usable samples ({len(skipped)} skipped, first "
            f"reason: {skipped[0][1] if skipped else 'none labelled'}). Check the files with "
            "pydicom or re-export them from the PACS."
        )
    return SiteDataset(site_dir=site_dir, samples=samples, skipped=skipped)
