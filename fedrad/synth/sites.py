"""How the hospitals differ: scanner, resolution, intensities, noise, prevalence and size."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedrad.synth.config import MIN_SAMPLES, SynthConfig

# (Manufacturer, ManufacturerModelName, Modality)
XRAY_SCANNERS = (
    ("SIEMENS", "Ysio Max", "DX"),
    ("GE MEDICAL SYSTEMS", "Discovery XR656", "DX"),
    ("Philips", "DigitalDiagnost", "DX"),
    ("FUJIFILM Corporation", "FCR Capsula XL II", "CR"),
    ("Canon Inc.", "CXDI-710C", "DX"),
    ("Agfa", "CR 30-X", "CR"),
    ("Carestream Health", "DRX-Evolution", "DX"),
    ("KONICA MINOLTA", "REGIUS 190", "CR"),
)
CT_SCANNERS = (
    ("SIEMENS", "SOMATOM Definition AS", "CT"),
    ("GE MEDICAL SYSTEMS", "Revolution CT", "CT"),
    ("Philips", "Brilliance 64", "CT"),
    ("Canon Medical Systems", "Aquilion ONE", "CT"),
    ("United Imaging", "uCT 760", "CT"),
    ("TOSHIBA", "Aquilion Prime", "CT"),
)
TOWNS = (
    "Northbrook",
    "Riverside",
    "St. Aldhelm",
    "Lakeview",
    "Hillcrest",
    "Eastmoor",
    "Westbury",
    "Oakridge",
)
HOSPITAL_KINDS = (
    "General Hospital",
    "University Hospital",
    "Medical Center",
    "Regional Hospital",
    "Clinic",
    "Community Hospital",
    "Infirmary",
    "Teaching Hospital",
)
CT_SLICE_THICKNESSES = (5.0, 6.0, 7.0)


@dataclass(frozen=True)
class SiteProfile:
    """Everything that makes one synthetic hospital's images its own.

    Intensities of 2D sites are in display units (0..1 before 12-bit scaling);
    those of 3D sites are in Hounsfield units.
    """

    index: int
    name: str
    manufacturer: str
    model: str
    modality: str
    institution: str
    size: int
    pixel_spacing: float
    slice_thickness: float
    n_samples: int
    n_positive: int
    gain: float
    offset: float
    gamma: float
    noise: float
    blur: float


def spread(rng: np.random.Generator, n: int, low: float, high: float) -> np.ndarray:
    """Return ``n`` values in [low, high), one per equal stratum, in random order.

    Stratifying (Latin hypercube) guarantees that even two sites differ visibly.
    """
    strata = rng.permutation(n) + rng.random(n)
    return low + (high - low) * strata / n


def draw_site_profiles(config: SynthConfig) -> tuple[SiteProfile, ...]:
    """Draw the deterministic profiles of all sites of ``config``."""
    rng = np.random.default_rng([config.seed, 1, 0 if config.kind == "2d" else 1])
    n = config.sites
    scanners = XRAY_SCANNERS if config.kind == "2d" else CT_SCANNERS
    scanner_order = rng.permutation(len(scanners))
    hospital_order = rng.permutation(len(TOWNS) * len(HOSPITAL_KINDS))
    size_factor = spread(rng, n, 0.5, 1.5)
    prevalence = spread(rng, n, 0.2, 0.6)
    resolution = spread(rng, n, 0.875, 1.25)
    noise = spread(rng, n, 0.0, 1.0)
    blur = rng.uniform(0.3, 1.2, n)
    profiles = []
    for i in range(n):
        manufacturer, model, modality = scanners[scanner_order[i % len(scanners)]]
        # past the named combinations (64) the names repeat with a number: "... Hospital 2"
        combos = len(hospital_order)
        town, kind = divmod(int(hospital_order[i % combos]), len(HOSPITAL_KINDS))
        campus = f" {i // combos + 1}" if i >= combos else ""
        n_samples = max(MIN_SAMPLES, round(config.samples_per_site * size_factor[i]))
        n_positive = min(max(round(prevalence[i] * n_samples), 2), n_samples - 2)
        size = 2 * round(config.image_size * resolution[i] / 2)
        is_2d = config.kind == "2d"
        field_of_view = rng.uniform(380.0, 430.0) if is_2d else rng.uniform(320.0, 400.0)
        profiles.append(
            SiteProfile(
                index=i + 1,
                name=f"site-{i + 1}",
                manufacturer=manufacturer,
                model=model,
                modality=modality,
                institution=f"{TOWNS[town]} {HOSPITAL_KINDS[kind]}{campus}",
                size=size,
                pixel_spacing=round(field_of_view / size, 4),
                slice_thickness=float(rng.choice(CT_SLICE_THICKNESSES)),
                n_samples=n_samples,
                n_positive=n_positive,
                gain=rng.uniform(0.8, 1.15) if is_2d else rng.uniform(0.97, 1.03),
                offset=rng.uniform(-0.04, 0.08) if is_2d else rng.uniform(-20.0, 20.0),
                gamma=rng.uniform(0.8, 1.25) if is_2d else 1.0,
                noise=float(0.008 + 0.03 * noise[i]) if is_2d else float(8.0 + 30.0 * noise[i]),
                blur=float(blur[i]) * size / 64,
            )
        )
    return tuple(profiles)


def allocate_holdout(config: SynthConfig, profiles: tuple[SiteProfile, ...]) -> tuple[int, ...]:
    """Split the holdout across source sites in proportion to their sizes.

    The holdout is ``holdout`` of the whole consortium, so it holds
    ``holdout / (1 - holdout)`` times the sites' total; largest remainders break ties.
    """
    if config.holdout == 0:
        return tuple(0 for _ in profiles)
    sizes = np.array([p.n_samples for p in profiles], dtype=float)
    total = max(1, round(config.holdout / (1 - config.holdout) * sizes.sum()))
    exact = total * sizes / sizes.sum()
    counts = np.floor(exact).astype(int)
    remainder_order = np.argsort(-(exact - counts), kind="stable")
    counts[remainder_order[: total - counts.sum()]] += 1
    return tuple(int(c) for c in counts)
