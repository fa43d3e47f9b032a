"""A digest of named arrays, to tell models and strategy states apart in the round records."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np

__all__ = ["sha256_arrays"]


def sha256_arrays(arrays: Mapping[str, np.ndarray]) -> str:
    """Digest of named arrays (names, shapes, dtypes and bytes), order-independent."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{a.dtype}|{a.shape}|".encode())
        digest.update(a.tobytes())
    return digest.hexdigest()
