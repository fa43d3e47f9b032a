"""Shared fixtures: small synthetic consortia written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

from fedrad.synth import SynthConfig, write_consortium

# Property tests draw the same examples on every run: CI must not be a lottery.
settings.register_profile("fedrad", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("fedrad")

# Keep every test process to the CPUs CI gives it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def sites_2d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small 2D hospitals and a holdout (32 px)."""
    out = tmp_path_factory.mktemp("sites-2d")
    write_consortium(
        out,
        SynthConfig(sites=2, seed=3, kind="2d", holdout=0.2, image_size=32, samples_per_site=40),
        overwrite=True,
    )
    return out


@pytest.fixture(scope="session")
def sites_3d(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small 3D hospitals (CT series of 8 slices, 32 px)."""
    out = tmp_path_factory.mktemp("sites-3d")
    write_consortium(
        out,
        SynthConfig(sites=2, seed=4, kind="3d", image_size=32, slices=8, samples_per_site=20),
        overwrite=True,
    )
    return out
