"""Inside the hospital: DICOM on disk -> checked, cached dataset -> private local training -> reply.

Everything here runs at a site and nothing of it leaves the site except what
:func:`check_reply` allows: weights, additive sums, suppressed subgroup counts. Only
:mod:`client.app` (the Flower ClientApp, ``client.app:app``) and :mod:`client.secagg` import
flwr; the rest is plain Python and PyTorch. The names below are loaded on first use, so that
``fedrad site check`` does not pay for torch and Flower.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AcceptedFile": "client.scan",
    "IngestSettings": "client.dataset",
    "QuarantinedFile": "client.scan",
    "ScanReport": "client.scan",
    "Site": "client.site",
    "SiteDataset": "client.dataset",
    "TransformConfig": "client.transforms",
    "accept_dicom": "client.scan",
    "check_reply": "client.reply",
    "load_site": "client.dataset",
    "resolve_site": "client.site",
    "scan_folder": "client.scan",
    "subgroup_counts": "client.disclosure",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'client' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
