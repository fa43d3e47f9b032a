"""The coordinator's audit key: Ed25519 PEM, 0600, created once beside the runs, never replaced."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedrad.core.errors import ConfigError
from privacy.audit_key import (
    AUDIT_KEY_FILE,
    AUDIT_PUBLIC_FILE,
    fingerprint,
    load_private_key,
    load_public_key,
    run_signing_key,
    write_key_pair,
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_default_key_is_created_beside_the_runs_and_reused(tmp_path: Path) -> None:
    first, path = run_signing_key("", tmp_path / "runs" / "run-1")
    again, again_path = run_signing_key("", tmp_path / "runs" / "run-2")

    assert path == again_path == (tmp_path / "runs" / AUDIT_KEY_FILE).resolve()
    assert fingerprint(first.public_key()) == fingerprint(again.public_key())
    assert _mode(path) == 0o600
    public = load_public_key(path.with_name(AUDIT_PUBLIC_FILE))
    assert fingerprint(public) == fingerprint(first.public_key())


def test_a_named_key_is_used_as_it_is(tmp_path: Path) -> None:
    key = write_key_pair(tmp_path / "audit.key", tmp_path / "audit.pub")

    used, path = run_signing_key(str(tmp_path / "audit.key"), tmp_path / "runs" / "run")

    assert path == tmp_path / "audit.key"
    assert fingerprint(used.public_key()) == fingerprint(key.public_key())
    assert not (tmp_path / "runs").exists()


def test_an_existing_key_is_never_overwritten(tmp_path: Path) -> None:
    write_key_pair(tmp_path / "audit.key", tmp_path / "audit.pub")
    before = (tmp_path / "audit.key").read_bytes()

    with pytest.raises(ConfigError, match="never overwrites an audit key"):
        write_key_pair(tmp_path / "audit.key", tmp_path / "other.pub")
    assert (tmp_path / "audit.key").read_bytes() == before
    assert not (tmp_path / "other.pub").exists()


def test_an_old_p384_key_is_refused_with_the_fix_and_left_alone(tmp_path: Path) -> None:
    old = ec.generate_private_key(ec.SECP384R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / AUDIT_KEY_FILE).write_bytes(old)

    with pytest.raises(ConfigError, match="ECDSA secp384r1 key, not Ed25519.*openssl genpkey"):
        run_signing_key("", tmp_path / "runs" / "run")
    assert (tmp_path / "runs" / AUDIT_KEY_FILE).read_bytes() == old


def test_a_missing_named_key_says_where_keys_come_from(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist: `fedrad provision` writes"):
        load_private_key(tmp_path / "nope.key")
