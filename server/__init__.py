"""The coordinator: ServerApp, round loop, strategies, metrics from sums, run directory.

:mod:`server.app` holds the Flower ServerApp (``server.app:app``); :class:`Federation` runs the
rounds (``server.loop``), with the secure path in :mod:`server.secure_rounds` and
:mod:`server.secagg` and the exchange with the sites in :mod:`server.exchange`. Metrics
(:func:`summarize`) and the run directory (:class:`RunDir`) are flwr-free. The names below are
loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Federation": "server.loop",
    "RunDir": "server.rundir",
    "build_strategy": "server.strategies",
    "new_run_dir": "server.rundir",
    "summarize": "server.metrics",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'server' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
