"""Write a whole synthetic consortium: one folder per site plus an optional holdout."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from fedrad.synth.config import HARD_SUBGROUP, HARD_SUBGROUP_DESCRIPTION, SynthConfig
from fedrad.synth.folder import HOLDOUT_KEY, Part, write_folder
from fedrad.synth.identity import write_identities
from fedrad.synth.layout import HOLDOUT_FOLDER, prepare_out_dir
from fedrad.synth.sites import SiteProfile, allocate_holdout, draw_site_profiles

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteSummary:
    """What was written for one site."""

    name: str
    folder: Path
    n_samples: int
    n_files: int
    prevalence: float
    manufacturer: str
    model: str
    modality: str
    institution: str
    rows: int
    columns: int
    pixel_spacing: float


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`write_consortium` wrote, and which subgroup it made harder."""

    out_dir: Path
    kind: str
    seed: int
    sites: tuple[SiteSummary, ...]
    holdout_folder: Path | None
    holdout_samples: int
    holdout_files: int
    hard_subgroup: str
    hard_subgroup_description: str
    subgroup_contrast_factor: float

    def to_dict(self) -> dict[str, object]:
        """Return a JSON-ready dict (paths as strings)."""
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        data["holdout_folder"] = None if self.holdout_folder is None else str(self.holdout_folder)
        data["sites"] = [{**site, "folder": str(site["folder"])} for site in data["sites"]]
        return data


def write_consortium(
    out_dir: Path, config: SynthConfig, *, overwrite: bool = False
) -> SynthSummary:
    """Write ``OUT_DIR/site-1..N`` (and ``OUT_DIR/holdout``) as DICOM plus ``labels.csv``.

    It also writes each site's identity key and the roster for secure aggregation
    (:mod:`fedrad.synth.identity`, in ``OUT_DIR/.fedrad-identity``); these are fresh keys on
    every run. The site folders are byte-identical for the same ``config``. The holdout holds
    ``holdout`` of the whole consortium, drawn from every site in proportion to
    its size with that site's scanner, prevalence and image statistics, in
    shuffled order. Findings of :data:`HARD_SUBGROUP` (female patients) have
    their contrast multiplied by ``config.subgroup_contrast_factor``.

    Raises
    ------
    ValueError
        If ``out_dir`` holds anything but earlier synth output, or holds a folder
        this run writes and ``overwrite`` is False.
    """
    out_dir = Path(out_dir)
    profiles = draw_site_profiles(config)
    holdout_counts = allocate_holdout(config, profiles)
    names = [p.name for p in profiles] + ([HOLDOUT_FOLDER] if sum(holdout_counts) else [])
    prepare_out_dir(out_dir, names, overwrite=overwrite)
    started = time.perf_counter()
    summaries, next_patient = [], 1
    for site in profiles:
        part = Part(site, site.n_samples, site.n_positive, next_patient)
        n_files = write_folder(out_dir / site.name, [part], config, folder_key=site.index)
        next_patient += site.n_samples
        summaries.append(_site_summary(out_dir / site.name, site, n_files))
    write_identities(out_dir, [site.name for site in profiles])
    holdout_folder, holdout_files = None, 0
    if sum(holdout_counts):
        parts = []
        for site, count in zip(profiles, holdout_counts, strict=True):
            n_positive = round(count * site.n_positive / site.n_samples)
            parts.append(Part(site, count, n_positive, next_patient))
            next_patient += count
        holdout_folder = out_dir / HOLDOUT_FOLDER
        holdout_files = write_folder(holdout_folder, parts, config, folder_key=HOLDOUT_KEY)
    logger.info(
        "Wrote %d sites%s to %s in %.1f s",
        len(profiles),
        " and a holdout" if holdout_folder else "",
        out_dir,
        time.perf_counter() - started,
    )
    return SynthSummary(
        out_dir,
        config.kind,
        config.seed,
        tuple(summaries),
        holdout_folder,
        sum(holdout_counts),
        holdout_files,
        HARD_SUBGROUP,
        HARD_SUBGROUP_DESCRIPTION,
        config.subgroup_contrast_factor,
    )


def _site_summary(folder: Path, site: SiteProfile, n_files: int) -> SiteSummary:
    """Summarise one written site folder."""
    return SiteSummary(
        site.name,
        folder,
        site.n_samples,
        n_files,
        round(site.n_positive / site.n_samples, 4),
        site.manufacturer,
        site.model,
        site.modality,
        site.institution,
        site.size,
        site.size,
        site.pixel_spacing,
    )
