"""A digest of named arrays: which model (or strategy state) a record or a kept reply is of.

Both ends use it: the coordinator in its round records and audit trail, a site to recognise a
round it is asked for again (``client.replay``).
"""

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
