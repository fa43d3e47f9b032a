"""Shared fixtures: small synthetic consortia written once per test session."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings

from fedrad.synth import SynthConfig, write_consortium

# Property tests draw the same examples on every run: CI must not be a lottery.
settings.register_profile("fedrad", derandomize=True, deadline=None, print_blob=True)
settings.load_profile("fedrad")

# Keep every test process to the CPUs CI gives it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# Every test writes into temporary folders only: a default that falls back to the home folder
# (a site's sample cache, its ledger, Flower's FLWR_HOME) lands in this session's own home.
REAL_HOME = Path.home()
TEST_HOME = Path(tempfile.mkdtemp(prefix="fedrad-test-home-"))
os.environ["HOME"] = str(TEST_HOME)
os.environ["FLWR_HOME"] = str(TEST_HOME / ".flwr")
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
for variable in ("XDG_CACHE_HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME"):
    os.environ.pop(variable, None)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove the session's home folder (it is the tests' scratch space, nobody's data)."""
    shutil.rmtree(TEST_HOME, ignore_errors=True)


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
