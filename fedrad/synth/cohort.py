"""Who is imaged: labels, sex, age, dates and finding contrast of one group of patients."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, timedelta

import numpy as np

VAL_FRACTION = 0.2
FIRST_STUDY_DAY = date(2016, 1, 1)


@dataclass(frozen=True)
class Cohort:
    """One patient (and one image or series) per entry; arrays have shape ``(n,)``."""

    labels: np.ndarray
    female: np.ndarray
    ages: np.ndarray
    birth_dates: tuple[str, ...]
    study_dates: tuple[str, ...]
    study_times: tuple[str, ...]
    contrast: np.ndarray
    """Finding contrast as rendered: 0 for negatives, reduced inside the hard subgroup."""

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def draw_cohort(
    rng: np.random.Generator,
    n: int,
    n_positive: int,
    draw_contrast: Callable[[np.random.Generator, int], np.ndarray],
    subgroup_factor: float,
) -> Cohort:
    """Draw ``n`` patients of whom exactly ``n_positive`` (in random order) have the finding.

    Sex is M/F with probability 1/2, age uniform in 18..90 and independent of the
    label; female patients' contrast is multiplied by ``subgroup_factor``.
    """
    labels = rng.permutation(np.arange(n) < n_positive).astype(np.int8)
    female = rng.random(n) < 0.5
    ages = rng.integers(18, 91, n)
    first_day = FIRST_STUDY_DAY + timedelta(days=int(rng.integers(0, 6 * 365)))
    study_offsets = rng.integers(0, 2 * 365, n)
    birthday_offsets = rng.integers(1, 360, n)
    study_seconds = rng.integers(7 * 3600, 19 * 3600, n)
    contrast = draw_contrast(rng, n) * labels * np.where(female, subgroup_factor, 1.0)
    births, studies, times = [], [], []
    for age, study_offset, birthday_offset, seconds in zip(
        ages, study_offsets, birthday_offsets, study_seconds, strict=True
    ):
        study = first_day + timedelta(days=int(study_offset))
        study = study.replace(day=min(study.day, 28))  # keeps the birthday arithmetic exact
        # The age-th birthday fell 1..359 days before the study, so PatientAge is exact.
        birth = study.replace(year=study.year - int(age)) - timedelta(days=int(birthday_offset))
        births.append(birth.strftime("%Y%m%d"))
        studies.append(study.strftime("%Y%m%d"))
        hours, rest = divmod(int(seconds), 3600)
        times.append(f"{hours:02d}{rest // 60:02d}{rest % 60:02d}")
    return Cohort(labels, female, ages, tuple(births), tuple(studies), tuple(times), contrast)


def assign_splits(rng: np.random.Generator, labels: np.ndarray) -> tuple[str, ...]:
    """Mark about :data:`VAL_FRACTION` of each class ``val``, the rest ``train``."""
    splits = np.full(labels.shape[0], "train", dtype=object)
    for value in (0, 1):
        members = np.flatnonzero(labels == value)
        n_val = round(VAL_FRACTION * members.size)
        splits[rng.choice(members, n_val, replace=False)] = "val"
    return tuple(str(s) for s in splits)
