"""The small exception tree shared by every fedrad component.

Every message says what is wrong and how to fix it. A failure while handling one Flower
message becomes an error reply, never a crash of the node.
"""

from __future__ import annotations


class FedradError(Exception):
    """Base class of every error fedrad raises on purpose."""


class ConfigError(FedradError, ValueError):
    """A configuration value is missing, unknown or out of range."""


class DataError(FedradError):
    """A site's data folder cannot be used (missing folder, bad labels, no usable samples)."""


class RunDirError(FedradError):
    """A run directory is missing, incomplete or of an unknown schema version."""
