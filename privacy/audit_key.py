"""The coordinator's audit-signing key: Ed25519 in PEM files, created once, never overwritten.

In a deployment ``fedrad provision`` writes the pair as ``coordinator/audit.key`` (PKCS#8 PEM,
mode 0600) and ``coordinator/audit.pub`` (SubjectPublicKeyInfo PEM), and ``fedrad study start``
hands the private key to the ServerApp (run-config ``audit-key``). With no ``audit-key`` (``fedrad
simulate``, ``fedrad demo``, ``flwr run .``) the key is the one beside the runs folder:
``RUNS/audit.key`` and ``RUNS/audit.pub`` for a run directory ``RUNS/NAME``, created on first use
and reused by every later run there, so that one operator's runs share one key and the key never
lies inside a run directory that is handed out. An existing key file is never replaced.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
from contextlib import suppress
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedrad.core.errors import ConfigError

__all__ = [
    "AUDIT_KEY_FILE",
    "AUDIT_PUBLIC_FILE",
    "fingerprint",
    "load_private_key",
    "load_public_key",
    "public_pem",
    "run_signing_key",
    "write_key_pair",
]

AUDIT_KEY_FILE = "audit.key"
AUDIT_PUBLIC_FILE = "audit.pub"
_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644
_NEW_KEY_HINT = (
    "create an Ed25519 pair, e.g. `openssl genpkey -algorithm ed25519 -out audit.key` and "
    "`openssl pkey -in audit.key -pubout -out audit.pub`, or provision a new consortium"
)

log = logging.getLogger(__name__)


def fingerprint(key: Ed25519PublicKey) -> str:
    """``SHA256:<hex>`` of the key's DER SubjectPublicKeyInfo: how entries and summaries name it."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "SHA256:" + hashlib.sha256(der).hexdigest()


def public_pem(key: Ed25519PublicKey) -> bytes:
    """The public key as SubjectPublicKeyInfo PEM (the format of ``audit.pub``)."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write_new(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``path`` durably with ``mode``; FileExistsError if it exists (never replaced).

    The bytes go to a temporary file first, which is then hard-linked to ``path``: the link
    fails where ``path`` exists, even when two runs create the key at the same moment.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.link(tmp, path)
    finally:
        with suppress(FileNotFoundError):
            os.unlink(tmp)


def write_key_pair(private_path: Path, public_path: Path) -> Ed25519PrivateKey:
    """Create a new Ed25519 pair: private PEM (0600) and public PEM; return the private key.

    Raises
    ------
    ConfigError
        If either file exists: a key is never overwritten.
    """
    for path in (private_path, public_path):
        if path.exists():
            raise ConfigError(
                f"{path} exists; fedrad never overwrites an audit key. Move it away first if "
                "it is to be replaced (runs signed with it are then verified with its audit.pub)."
            )
    key = Ed25519PrivateKey.generate()
    try:
        _write_new(private_path, _private_pem(key), mode=_PRIVATE_MODE)
        _write_new(public_path, public_pem(key.public_key()), mode=_PUBLIC_MODE)
    except FileExistsError as exc:
        raise ConfigError(
            f"{exc.filename or private_path} appeared while it was being created; fedrad never "
            "overwrites an audit key."
        ) from None
    return key


def _kind(key: object) -> str:
    curve = getattr(key, "curve", None)
    return f"an ECDSA {curve.name} key" if curve is not None else f"a {type(key).__name__}"


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Read an unencrypted Ed25519 private key in PEM, with a message that says how to fix it."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"audit key {path} does not exist: `fedrad provision` writes coordinator/audit.key; "
            "leave audit-key empty to sign with the key beside the runs folder."
        ) from None
    except OSError as exc:
        raise ConfigError(f"audit key {path} cannot be read ({exc}).") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ConfigError(
            f"audit key {path} is not an unencrypted PEM private key ({exc}); {_NEW_KEY_HINT}."
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(
            f"audit key {path} is {_kind(key)}, not Ed25519 (fedrad provision wrote P-384 "
            f"audit keys before the audit trail existed); {_NEW_KEY_HINT}."
        )
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        log.warning("audit key %s is readable by others; restrict it: chmod 600 %s", path, path)
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Read an Ed25519 public key in PEM (``audit.pub``)."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise ConfigError(f"public key {path} does not exist.") from None
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path} is not a PEM public key ({exc}).") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"{path} holds {_kind(key)}, not an Ed25519 public key.")
    return key


def run_signing_key(audit_key: str, run_dir: Path) -> tuple[Ed25519PrivateKey, Path]:
    """The key a run signs its audit trail with, and where it lies.

    ``audit_key`` (the run config's ``audit-key``) names the key file; empty means the key
    beside the runs folder that holds ``run_dir``, created when there is none yet.
    """
    if audit_key:
        path = Path(audit_key).expanduser()
        return load_private_key(path), path
    path = run_dir.resolve().parent / AUDIT_KEY_FILE
    public = path.with_name(AUDIT_PUBLIC_FILE)
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        try:
            _write_new(path, _private_pem(key), mode=_PRIVATE_MODE)
        except FileExistsError:
            pass  # another run created it a moment ago: use that one
        else:
            log.info("created the audit key %s; later runs in %s reuse it", path, path.parent)
    key = load_private_key(path)
    if not public.exists():
        with suppress(FileExistsError):
            _write_new(public, public_pem(key.public_key()), mode=_PUBLIC_MODE)
    return key, path
