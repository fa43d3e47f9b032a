"""``fedrad audit verify|show``: exit codes and what they print."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from audit_helpers import model_hash, read_lines, write_lines, write_trail
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedrad.commands.cli import main
from fedrad.commands.consortium import Consortium
from fedrad.core.errors import ConfigError
from privacy.audit_key import public_pem, write_key_pair

KEY = Ed25519PrivateKey.generate()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    write_trail(tmp_path / "run", KEY)
    return tmp_path / "run"


@pytest.mark.parametrize("command", ["audit", "audit verify", "audit show"])
def test_every_audit_subcommand_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main([*command.split(), "--help"])

    assert info.value.code == 0
    assert "usage: fedrad " + command in capsys.readouterr().out


def test_verify_prints_one_ok_line_and_exits_0(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["audit", "verify", str(run_dir)])

    printed = capsys.readouterr().out
    assert code == 0
    assert printed.startswith("audit trail OK: 5 entries")
    assert len(printed.strip().splitlines()) == 1


def test_verify_names_the_first_bad_entry_and_exits_1(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = read_lines(run_dir)
    write_lines(run_dir, [*lines[:3], *lines[4:]])  # drop seq 4

    code = main(["audit", "verify", str(run_dir)])

    assert code == 1
    assert "BAD: line 4 (seq 5): holds seq 5 where 4 belongs: entry 4 dropped" in (
        capsys.readouterr().out
    )


def test_verify_against_a_pinned_key_the_log_was_not_signed_with(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pinned = tmp_path / "auditor.pub"
    pinned.write_bytes(public_pem(Ed25519PrivateKey.generate().public_key()))

    code = main(["audit", "verify", str(run_dir), "--public-key", str(pinned)])

    assert code == 1
    assert "line 1 (seq 1): names signing key" in capsys.readouterr().out


def test_verify_with_a_public_key_file_that_is_not_one_exits_2(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "junk.pub").write_text("not a key")

    code = main(["audit", "verify", str(run_dir), "--public-key", str(tmp_path / "junk.pub")])

    assert code == 2
    assert "is not a PEM public key" in capsys.readouterr().err


def test_show_prints_rounds_model_hashes_and_epsilon_per_site(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    entries = [json.loads(line) for line in read_lines(run_dir)]
    sites = entries[1]["data"]["sites"]

    code = main(["audit", "show", str(run_dir)])

    printed = capsys.readouterr().out
    assert code == 0
    assert model_hash(3)[:8] in printed  # round 3's model hash, short
    assert "0.800" in printed  # round 3's AUC
    assert all(site in printed for site in sites)  # the epsilon table names each pseudonym
    assert "1.5000" in printed  # cumulative epsilon after round 3
    assert printed.strip().splitlines()[-1].startswith("audit trail OK: 5 entries")


def test_show_of_a_tampered_trail_exits_1(
    run_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_lines(run_dir, read_lines(run_dir)[:-1])

    code = main(["audit", "show", str(run_dir)])

    assert code == 1
    assert "audit trail BAD: line 5 (seq 5): missing" in capsys.readouterr().out


class _Started(Exception):
    """Raised by the stand-in for starting ``flwr run``: the command line is all a test needs."""


def _consortium(root: Path) -> Consortium:
    consortium = Consortium(root)
    consortium.flwr_home.mkdir(parents=True)
    consortium.manifest.write_text(json.dumps({"sites": ["site-1", "site-2"]}))
    (consortium.flwr_home / "config.toml").write_text('[superlink.fedrad]\naddress = "x:1"\n')
    return consortium


def test_study_start_hands_the_consortiums_audit_key_to_the_server_app(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedrad.commands import study

    consortium = _consortium(tmp_path / "consortium")
    write_key_pair(consortium.audit_key, consortium.audit_public)
    started: list[list[str]] = []

    def fake_start(name: str, argv: list[str], **kwargs: object) -> None:
        started.append(argv)
        raise _Started

    monkeypatch.setattr(study, "start", fake_start)
    with pytest.raises(_Started):
        study.start_study(consortium, {"study-id": "s1"})

    run_config = started[0][started[0].index("-c") + 1]
    assert f"audit-key='{consortium.audit_key.resolve()}'" in run_config


def test_study_start_refuses_an_old_p384_audit_key_before_starting_flower(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from fedrad.commands.study import start_study

    consortium = _consortium(tmp_path / "consortium")
    consortium.audit_key.write_bytes(
        ec.generate_private_key(ec.SECP384R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    with pytest.raises(ConfigError, match="not Ed25519"):
        start_study(consortium, {"study-id": "s1"})
    assert not (consortium.logs / "study-s1.log").exists()
