"""What to generate: one frozen dataclass, range-checked on construction."""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("2d", "3d")
MAX_SITES = 1000  # bench/scale.py federates 100; the secure-aggregation roster allows 10 000
MIN_SAMPLES = 20
MAX_HOLDOUT = 0.9

HARD_SUBGROUP = "PatientSex=F"
"""The subgroup whose findings are fainter, as ``DICOM keyword=value``."""

HARD_SUBGROUP_DESCRIPTION = (
    "female patients (PatientSex 'F'): finding contrast is multiplied by "
    "1 - 0.6 * subgroup_difficulty (the way overlying breast tissue hides lung lesions)"
)


@dataclass(frozen=True)
class SynthConfig:
    """Settings of a synthetic consortium of hospitals.

    Parameters
    ----------
    sites
        Number of hospitals, 1..64.
    seed
        Non-negative integer; the same configuration always gives the same bytes.
    kind
        ``"2d"`` for chest X-rays (CR/DX), ``"3d"`` for chest CT series.
    holdout
        Fraction in [0, 0.9) of the whole consortium (sites plus holdout) written to
        ``OUT_DIR/holdout``, drawn from the same mixture of sites.
    image_size
        Base in-plane size in pixels; sites vary around it (about 0.875x..1.25x).
    slices
        Slices per CT series (``kind="3d"`` only).
    samples_per_site
        Mean number of images (2D) or series (3D) per site; sites vary 0.5x..1.5x.
    subgroup_difficulty
        0 = no subgroup effect; 1 = findings of :data:`HARD_SUBGROUP` have 40% of
        the contrast they would otherwise have.
    """

    sites: int = 4
    seed: int = 0
    kind: str = "2d"
    holdout: float = 0.0
    image_size: int = 64
    slices: int = 16
    samples_per_site: int = 200
    subgroup_difficulty: float = 0.5

    def __post_init__(self) -> None:
        _check_int("sites", self.sites, 1, MAX_SITES, f"use between 1 and {MAX_SITES} hospitals")
        _check_int("seed", self.seed, 0, 2**63 - 1, "use a non-negative integer such as 0")
        if self.kind not in KINDS:
            raise ValueError(
                f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}: "
                "pass '2d' for chest X-rays or '3d' for CT series"
            )
        _check_float(
            "holdout", self.holdout, 0.0, MAX_HOLDOUT, "use 0 for none or e.g. 0.2", closed=False
        )
        _check_int("image_size", self.image_size, 16, 1024, "64 is the usual choice")
        _check_int("slices", self.slices, 4, 512, "16 is the usual choice")
        _check_int("samples_per_site", self.samples_per_site, MIN_SAMPLES, 100_000, "e.g. 200")
        _check_float(
            "subgroup_difficulty", self.subgroup_difficulty, 0.0, 1.0, "0 turns the effect off"
        )

    @property
    def subgroup_contrast_factor(self) -> float:
        """Multiplier on the finding contrast inside :data:`HARD_SUBGROUP`."""
        return 1.0 - 0.6 * self.subgroup_difficulty


def _check_int(name: str, value: object, low: int, high: int, hint: str) -> None:
    """Raise ValueError unless ``value`` is an int (not bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be an integer from {low} to {high}, got {value!r}: {hint}")


def _check_float(
    name: str, value: object, low: float, high: float, hint: str, *, closed: bool = True
) -> None:
    """Raise ValueError unless ``value`` is a real number in [low, high] (or [low, high))."""
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if ok:
        number = float(value)  # type: ignore[arg-type]
        ok = low <= number <= high if closed else low <= number < high
    if not ok:
        bounds = f"[{low}, {high}]" if closed else f"[{low}, {high})"
        raise ValueError(f"{name} must be a number in {bounds}, got {value!r}: {hint}")
