"""A site's dataset: labels.csv resolved to DICOM files, decoded, preprocessed with MONAI.

2D samples are single images (CR, DX, US, one CT/MR slice); 3D samples are series assembled
from slices grouped by SeriesInstanceUID and ordered by position. Patient attributes (sex, age
band, manufacturer, modality) stay next to each sample for aggregated reports; they never leave
the site as they are.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch.utils.data import Dataset

from client.cache import SiteCache, sample_key
from client.ingest import (
    RECORD_SCHEMA,
    Ingested,
    Verdict,
    ingest_files,
    verdict_from_record,
    verdict_to_record,
)
from client.labels import LABELS_FILE, LabelRow, assign_split, read_labels
from client.scan import DEFAULT_MAX_BYTES, AcceptedFile, QuarantinedFile, list_site_files
from client.transforms import TransformConfig, preprocess
from fedrad.core.errors import DataError

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


@dataclass(frozen=True)
class IngestSettings:
    """How a site reads its folder: worker processes, per-file timeout, size cap, cache.

    ``worker_memory_bytes`` bounds what each worker's memory may grow by (None: the default
    of ``client.scan.default_worker_memory`` for ``max_bytes``).
    """

    workers: int = 1
    timeout_s: float = 20.0
    max_bytes: int = DEFAULT_MAX_BYTES
    cache_root: Path | None = None
    worker_memory_bytes: int | None = None


_ATTRIBUTES = ("sex", "age-band", "manufacturer", "modality")


def _attributes(verdict: AcceptedFile) -> dict[str, str]:
    return {
        "sex": verdict.sex if verdict.sex in ("M", "F") else "unknown",
        "age-band": age_band(verdict.age_years),
        "manufacturer": verdict.manufacturer or "unknown",
        "modality": verdict.modality,
    }


def _position(v: AcceptedFile) -> tuple[float, int]:
    z = v.position_z if v.position_z is not None else float(v.instance_number or 0)
    return z, v.instance_number or 0


def _group(accepted: list[AcceptedFile]) -> dict[str, list[AcceptedFile]]:
    """Accepted files by SeriesInstanceUID and by StudyInstanceUID (largest series kept)."""
    series: dict[str, list[AcceptedFile]] = {}
    for v in accepted:
        if v.series_uid:
            series.setdefault(v.series_uid, []).append(v)
    groups = {uid: sorted(files, key=_position) for uid, files in series.items()}
    by_study: dict[str, list[AcceptedFile]] = {}
    for files in groups.values():
        study = files[0].study_uid
        if study and len(files) > len(by_study.get(study, [])):
            by_study[study] = files
    return {**by_study, **groups}


def _missing_error(site_dir: Path, missing: list[LabelRow]) -> DataError:
    shown = ", ".join(f"'{r.id}' (line {r.line})" for r in missing[:5])
    more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
    return DataError(
        f"{site_dir / LABELS_FILE}: {len(missing)} id(s) name no file and no DICOM "
        f"series or study in the folder: {shown}{more}. Fix the ids (a path relative "
        "to the site folder, a SeriesInstanceUID or a StudyInstanceUID) or restore "
        "the files."
    )


class _Pass:
    """One load of a site folder: cached verdicts first, then the files still unknown."""

    def __init__(self, site_dir: Path, config: TransformConfig, settings: IngestSettings) -> None:
        self.site_dir = site_dir
        self.config = config
        self.settings = settings
        self.cache = (
            SiteCache(settings.cache_root, site_dir, config, schema=RECORD_SCHEMA)
            if settings.cache_root
            else None
        )
        self.verdicts: dict[str, Verdict] = {}
        self.pixels: dict[str, Ingested] = {}
        self.stats: dict[str, os.stat_result] = {}

    def check(self, relatives: list[str]) -> None:
        """Know the verdict of every file in ``relatives`` (from the cache or by ingesting)."""
        unknown: list[str] = []
        folder = os.path.join(self.site_dir, "")
        cached = self.cache.verdict if self.cache else lambda rel, stat: None
        stats, verdicts = self.stats, self.verdicts
        for rel in relatives:
            try:
                stat = stats[rel] = os.lstat(folder + rel)  # a link's own: links are refused
            except OSError:
                unknown.append(rel)  # the ingest says why (a broken link, say); not cached
                continue
            record = cached(rel, stat)
            verdict = verdict_from_record(rel, record) if record is not None else None
            if verdict is None:
                unknown.append(rel)
            else:
                verdicts[rel] = verdict
        self.ingest(unknown)

    def ingest(self, relatives: list[str]) -> None:
        """Decode files (in workers) and remember their verdicts and pixels."""
        s = self.settings
        results = ingest_files(
            self.site_dir,
            relatives,
            transform=self.config,
            workers=s.workers,
            timeout_s=s.timeout_s,
            max_bytes=s.max_bytes,
            worker_memory_bytes=s.worker_memory_bytes,
        )
        for rel, result in results.items():
            self.verdicts[rel] = result.verdict
            self.pixels[rel] = result
            if self.cache is None:
                continue
            stat = self.stats.get(rel)
            if stat is None:
                self.cache.forget(rel)
            else:
                self.cache.remember(rel, stat, verdict_to_record(result.verdict))

    def image(self, files: list[AcceptedFile], key: str) -> torch.Tensor:
        """The preprocessed sample ``key`` made of ``files`` (cached, or built from pixels)."""
        cached = self.cache.sample(key) if self.cache else None
        if cached is not None:
            return cached
        missing = [f.path for f in files if f.path not in self.pixels]
        if missing:
            self.ingest(missing)
        parts = [self.pixels[f.path] for f in files]
        if self.config.kind == "2d":
            if len(files) != 1 or parts[0].image is None:
                raise ValueError(f"a series of {len(files)} slices cannot be a 2D sample")
            tensor = torch.as_tensor(parts[0].image)  # shares the memory
        else:
            values = [p.values for p in parts]
            volume = values[0] if len(values) == 1 else np.stack(values)  # type: ignore[arg-type]
            if volume is None or volume.ndim != 3:
                raise ValueError("cannot form a 3D volume from these files")
            tensor = preprocess(volume, modality=files[0].modality, config=self.config)
        if self.cache:
            self.cache.put_sample(key, tensor)
        return tensor


def load_site(
    site_dir: Path,
    config: TransformConfig,
    *,
    num_classes: int,
    settings: IngestSettings | None = None,
) -> SiteDataset:
    """Load every usable labelled sample of a site folder.

    Each file is checked like ``fedrad site check`` does (quarantined files are skipped with
    their reason and never become training data), decoded once and preprocessed; with a cache
    root, verdicts and samples are reused while files keep their size and mtime. Raises
    DataError when the folder is missing, labels are malformed or name nothing, or no usable
    sample remains.
    """
    settings = settings or IngestSettings()
    if not site_dir.is_dir():
        raise DataError(
            f"Site data folder {site_dir} does not exist; set the node config 'data-dir' "
            "(or the run config 'sites-dir' in simulation) to a folder holding DICOM files "
            "and labels.csv."
        )
    files = list_site_files(site_dir)
    work = _Pass(site_dir, config, settings)
    digests = _digests(site_dir, files) if work.cache else None
    reused = _reuse(work, digests, num_classes) if digests else None
    if reused is not None:
        return _dataset(site_dir, *reused)
    rows = read_labels(site_dir)
    for row in rows:
        if row.label >= num_classes:
            raise DataError(
                f"{site_dir / LABELS_FILE} line {row.line}: label {row.label} is not below "
                f"num-classes={num_classes}; raise num-classes or fix the label."
            )
    present = set(files)
    by_path = all(row.id in present for row in rows)
    checked = sorted({row.id for row in rows}) if by_path else files
    work.check(checked)
    groups = {}
    if not by_path:
        groups = _group([v for v in work.verdicts.values() if isinstance(v, AcceptedFile)])
    missing = [r for r in rows if r.id not in present and r.id not in groups]
    if missing:
        raise _missing_error(site_dir, missing)
    samples: list[Sample] = []
    keys: list[str] = []
    skipped: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for row in rows:
        if row.id in present:
            verdict = work.verdicts[row.id]
            targets: list[Verdict] = [verdict]
            rejected = verdict if isinstance(verdict, QuarantinedFile) else None
        else:
            targets = list(groups[row.id])
            rejected = next((v for v in targets if isinstance(v, QuarantinedFile)), None)
        if rejected is not None:
            skipped.append((row.id, f"{rejected.reason}: {rejected.detail}"))
            continue
        chosen = cast(list[AcceptedFile], targets)  # none of them quarantined
        key = sample_key([v.sha256 for v in chosen])
        if key in seen:
            skipped.append((row.id, f"duplicate: same content as '{seen[key]}'"))
            continue
        seen[key] = row.id
        try:
            image = work.image(chosen, key)
        except (ValueError, KeyError) as exc:
            skipped.append((row.id, str(exc)))
            continue
        split = row.split or assign_split(row.id)
        samples.append(Sample(row.id, row.label, split, image, _attributes(chosen[0])))
        keys.append(key)
    if work.cache:
        work.cache.keep_only(set(seen))
        work.cache.forget_missing(present)
        summary = None
        if digests is not None and len(work.stats) == len(checked) and samples:
            summary = _summary(digests, rows, work, samples, keys, skipped)
        work.cache.remember_pass(summary)
        work.cache.save()
    return _dataset(site_dir, samples, skipped)


def skip_reason_counts(skipped: list[tuple[str, str]]) -> str:
    """``"2 corrupt, 1 duplicate"``: how many samples were skipped for each kind of reason."""
    counts = Counter(
        (reason.split(":", 1)[0].strip() or "unreadable")[:40] for _, reason in skipped
    )
    return ", ".join(f"{n} {kind}" for kind, n in counts.most_common())


def _dataset(site_dir: Path, samples: list[Sample], skipped: list[tuple[str, str]]) -> SiteDataset:
    if skipped:
        log.warning(
            "%s: skipped %d sample(s) that cannot be used (%s); see each file and its fix with "
            "`fedrad site check %s` (this stays on the site: only counts of usable samples "
            "are ever sent)",
            site_dir,
            len(skipped),
            skip_reason_counts(skipped),
            site_dir,
        )
    if not samples:
        raise DataError(
            f"Site folder {site_dir} has no usable samples ({len(skipped)} skipped, first "
            f"reason: {skipped[0][1] if skipped else 'none labelled'}). Run 'fedrad site "
            f"check {site_dir}' for every file's verdict."
        )
    return SiteDataset(site_dir=site_dir, samples=samples, skipped=skipped)


# A cached pass over an unchanged folder repeats the last complete pass's outcome: same
# labels.csv bytes, same file listing, every file it checked with the same size and mtime,
# every sample still in the pack. Anything else runs the full pass above.


def _digests(site_dir: Path, files: list[str]) -> tuple[str, str] | None:
    """Digests of labels.csv's bytes and of the folder listing (None: no readable labels)."""
    labels = site_dir / LABELS_FILE
    try:
        data = labels.read_bytes() if labels.is_file() else None
    except OSError:
        data = None
    if data is None:
        return None
    listing = "\0".join(files).encode()
    return hashlib.sha256(data).hexdigest(), hashlib.sha256(listing).hexdigest()


def _summary(
    digests: tuple[str, str],
    rows: list[LabelRow],
    work: _Pass,
    samples: list[Sample],
    keys: list[str],
    skipped: list[tuple[str, str]],
) -> dict[str, object]:
    """What a complete pass found, as JSON data for the sample pack's metadata."""
    return {
        "labels": digests[0],
        "listing": digests[1],
        "max-label": max(row.label for row in rows),
        "checked": [[rel, st.st_size, st.st_mtime_ns] for rel, st in work.stats.items()],
        "samples": [
            [s.id, s.label, s.split, key, *s.attributes.values()]  # in _ATTRIBUTES order
            for s, key in zip(samples, keys, strict=True)
        ],
        "skipped": [list(entry) for entry in skipped],
    }


def _reuse(
    work: _Pass, digests: tuple[str, str], num_classes: int
) -> tuple[list[Sample], list[tuple[str, str]]] | None:
    """The last complete pass's samples and skipped ids, if nothing it used has changed."""
    summary = work.cache.summary if work.cache else None
    if not isinstance(summary, dict):
        return None
    try:
        if (summary["labels"], summary["listing"]) != digests:
            return None
        if summary["max-label"] >= num_classes:
            return None  # the full pass says which label
        folder = os.path.join(work.site_dir, "")
        for rel, size, mtime_ns in summary["checked"]:
            stat = os.stat(folder + rel)
            if stat.st_size != size or stat.st_mtime_ns != mtime_ns:
                return None
        samples = []
        cached = work.cache.sample  # type: ignore[union-attr]
        for sample_id, label, split, key, *attributes in summary["samples"]:
            image = cached(key)
            if image is None or len(attributes) != len(_ATTRIBUTES):
                return None
            attrs = dict(zip(_ATTRIBUTES, attributes, strict=True))
            samples.append(Sample(sample_id, label, split, image, attrs))
        skipped = [(sample_id, reason) for sample_id, reason in summary["skipped"]]
    except (OSError, TypeError, ValueError, KeyError):
        return None
    return samples, skipped
