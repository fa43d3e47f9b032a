"""A digest of named arrays, to tell models and strategy states apart in the round records.

The function lives in ``fedrad.core.digest`` (the sites use it too); this is its server name.
"""

from __future__ import annotations

from fedrad.core.digest import sha256_arrays

__all__ = ["sha256_arrays"]
