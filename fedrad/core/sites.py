"""Where a simulated consortium's site folders are, and which partition is which site.

A sites folder holds one folder per hospital, each with DICOM files and a ``labels.csv``.
Site folders are the subfolders holding a ``labels.csv``, in natural order (``site-2`` before
``site-10``); a folder named ``holdout`` is never trained on. In simulation, partition ``i``
trains on the i-th site folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from fedrad.core.errors import DataError

HOLDOUT = "holdout"


def _natural_key(path: Path) -> list[int | str]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def list_site_dirs(sites_dir: Path) -> list[Path]:
    """Return the site folders under ``sites_dir`` in natural order.

    Raises
    ------
    DataError
        When the folder is missing or holds no site folder.
    """
    if not sites_dir.is_dir():
        raise DataError(
            f"Sites folder {sites_dir} does not exist. Create one with "
            f"'fedrad synth {sites_dir} --sites 4', or set sites-dir to a folder holding "
            "one sub-folder per hospital."
        )
    sites = [
        p
        for p in sites_dir.iterdir()
        if p.is_dir() and p.name != HOLDOUT and (p / "labels.csv").is_file()
    ]
    if not sites:
        raise DataError(
            f"{sites_dir} holds no site folder (a sub-folder with DICOM files and a "
            "labels.csv). Create one with 'fedrad synth' or 'fedrad import-npz'."
        )
    return sorted(sites, key=_natural_key)
