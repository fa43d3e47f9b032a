"""The audit trail: its entry format, and that every kind of edit is found and named."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from audit_helpers import SITES, read_lines, resign_all, sign, write_lines, write_trail
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from privacy.audit_key import AUDIT_PUBLIC_FILE, fingerprint, load_public_key, public_pem
from server.audit import AUDIT_FILE, GENESIS, AuditError, verify
from server.audit_trail import AuditTrail, run_start_data
from server.rundir import SUMMARY_FILE

KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    write_trail(tmp_path / "run", KEY)  # 1 run-start, 2-4 rounds, 5 run-end
    return tmp_path / "run"


def test_an_untouched_trail_verifies_and_matches_the_summary(run_dir: Path) -> None:
    result = verify(run_dir)

    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    assert result.ok, result.describe()
    assert [e["event"] for e in result.entries] == ["run-start", *["round"] * 3, "run-end"]
    assert summary["audit"] == {
        "entries": 5,
        "head": result.head,
        "key-fingerprint": fingerprint(KEY.public_key()),
    }
    assert result.describe().startswith("audit trail OK: 5 entries")


def test_entries_follow_the_documented_format(run_dir: Path) -> None:
    lines = read_lines(run_dir)
    public = load_public_key(run_dir / AUDIT_PUBLIC_FILE)

    previous = GENESIS
    for seq, line in enumerate(lines, start=1):
        entry = json.loads(line)
        body = {k: v for k, v in entry.items() if k not in ("hash", "signature")}
        digest = hashlib.sha256(
            json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        ).hexdigest()
        assert line == json.dumps(entry, sort_keys=True, separators=(",", ":"))
        assert (entry["seq"], entry["prev"], entry["hash"]) == (seq, previous, digest)
        assert entry["key"] == fingerprint(public)
        public.verify(base64.b64decode(entry["signature"]), bytes.fromhex(digest))
        previous = digest


def test_round_entries_name_sites_by_pseudonym_only(run_dir: Path) -> None:
    text = (run_dir / AUDIT_FILE).read_text()
    rounds = [e["data"] for e in verify(run_dir).entries if e["event"] == "round"]

    assert not any(name in text for name in (*SITES, "hospital-c"))
    assert rounds[0]["sites"] == rounds[2]["sites"] and len(rounds[0]["sites"]) == 2
    assert all(s.startswith("anon-") for s in rounds[0]["sites"])
    assert sorted(rounds[2]["epsilon"].values()) == [1.5, 1.5]  # cumulative, per site
    assert rounds[0]["refusals"] == 1 and rounds[0]["metrics"]["auc"] == pytest.approx(0.6)
    assert list(rounds[0]["failures"]["evaluate"])[0].startswith("anon-")


def test_run_start_records_config_hash_and_code_digest() -> None:
    from fedrad.core.config import RunConfig

    data = run_start_data(RunConfig(num_server_rounds=3))

    assert data["config"]["num-server-rounds"] == 3
    assert len(data["config-sha256"]) == 64 and len(data["code"]["sha256"]) == 64
    assert data["config-sha256"] != run_start_data(RunConfig())["config-sha256"]


def _change_field(lines: list[str]) -> list[str]:
    entry = json.loads(lines[2])
    entry["data"]["metrics"]["auc"] = 0.99
    return [*lines[:2], json.dumps(entry, sort_keys=True, separators=(",", ":")), *lines[3:]]


def _change_field_and_rehash(lines: list[str]) -> list[str]:
    entry = json.loads(lines[2])
    entry["data"]["metrics"]["auc"] = 0.99
    forged = json.loads(sign(entry, KEY))
    forged["signature"] = json.loads(lines[2])["signature"]  # the attacker lacks the key
    return [*lines[:2], json.dumps(forged, sort_keys=True, separators=(",", ":")), *lines[3:]]


def _forged_append(lines: list[str]) -> list[str]:
    entry = json.loads(lines[-1])
    entry.update(seq=6, prev=entry["hash"], event="round", data={"round": 4})
    return [*lines, sign(entry, OTHER, claim=fingerprint(KEY.public_key()))]


def _append_other_key(lines: list[str]) -> list[str]:
    entry = json.loads(lines[-1])
    entry.update(seq=6, prev=entry["hash"], event="resume", data={})
    return [*lines, sign(entry, OTHER)]


def _append_after_end(lines: list[str]) -> list[str]:
    entry = json.loads(lines[-1])
    entry.update(seq=6, prev=entry["hash"], event="round", data={"round": 4})
    return [*lines, sign(entry, KEY)]


def _resign_one(lines: list[str]) -> list[str]:
    return [lines[0], sign(json.loads(lines[1]), OTHER), *lines[2:]]


def _duplicate(lines: list[str]) -> list[str]:
    return [*lines[:2], lines[1], *lines[2:]]


EDITS: list[tuple[str, Callable[[list[str]], list[str]], str]] = [
    ("change a field", _change_field, "line 3 (seq 3): its content does not match its hash"),
    (
        "change a field, recompute the hash",
        _change_field_and_rehash,
        "line 3 (seq 3): its signature does not verify",
    ),
    (
        "drop an entry",
        lambda ls: ls[:2] + ls[3:],
        "line 3 (seq 4): holds seq 4 where 3 belongs: entry 3 dropped",
    ),
    (
        "drop the first entry",
        lambda ls: ls[1:],
        "line 1 (seq 2): holds seq 2 where 1 belongs: entry 1 dropped",
    ),
    (
        "reorder two entries",
        lambda ls: [ls[0], ls[2], ls[1], *ls[3:]],
        "line 2 (seq 3): holds seq 3 where 2 belongs (seq 2 is at line 3): entries were reordered",
    ),
    ("repeat an entry", _duplicate, "line 3 (seq 2): holds seq 2 where 3 belongs"),
    (
        "remove entries from the end",
        lambda ls: ls[:3],
        "line 4 (seq 4): missing: summary.json records 5 entries",
    ),
    ("append a forged entry", _forged_append, "line 6 (seq 6): its signature does not verify"),
    (
        "append an entry signed with another key",
        _append_other_key,
        f"line 6 (seq 6): names signing key {fingerprint(OTHER.public_key())}",
    ),
    ("append a round after run-end", _append_after_end, "line 6 (seq 6): 'round' follows run-end"),
    (
        "re-sign one entry with another key",
        _resign_one,
        f"line 2 (seq 2): names signing key {fingerprint(OTHER.public_key())}, but the pinned",
    ),
]


@pytest.mark.parametrize(
    ("edit", "expected"), [(e, x) for _, e, x in EDITS], ids=[n for n, *_ in EDITS]
)
def test_every_edit_is_found_and_the_first_bad_entry_named(
    run_dir: Path, edit: Callable[[list[str]], list[str]], expected: str
) -> None:
    write_lines(run_dir, edit(read_lines(run_dir)))

    result = verify(run_dir, public_key=KEY.public_key())

    assert not result.ok
    assert str(result.problem).startswith(expected), str(result.problem)
    assert expected in result.describe()


def test_a_cut_last_line_is_named(run_dir: Path) -> None:
    path = run_dir / AUDIT_FILE
    path.write_bytes(path.read_bytes()[:-40])

    result = verify(run_dir)

    assert str(result.problem) == (
        "line 5: the last line is cut off (no complete entry): the log was truncated"
    )
    assert result.count == 4


def test_a_missing_run_end_is_named_when_summary_says_the_run_ended(run_dir: Path) -> None:
    write_lines(run_dir, read_lines(run_dir)[:-1])
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    del summary["audit"]  # the attacker strips what would give the cut away
    (run_dir / SUMMARY_FILE).write_text(json.dumps(summary))

    result = verify(run_dir)

    assert str(result.problem).startswith(
        "line 5 (seq 5): missing: summary.json says the run ended (completed) but the log ends "
        "at seq 4 (round) without run-end"
    )


def test_a_whole_log_resigned_with_another_key_is_caught(run_dir: Path) -> None:
    write_lines(run_dir, resign_all(read_lines(run_dir), OTHER))
    (run_dir / AUDIT_PUBLIC_FILE).write_bytes(public_pem(OTHER.public_key()))
    unpinned = verify(run_dir)
    (run_dir / SUMMARY_FILE).unlink()  # and without the summary's fingerprint: only a pinned key

    pinned = verify(run_dir, public_key=KEY.public_key())

    assert str(unpinned.problem).startswith(
        f"line 1 (seq 1): names signing key {fingerprint(OTHER.public_key())}, but summary.json"
    )
    assert str(pinned.problem).startswith("line 1 (seq 1): names signing key")
    assert "the pinned public key" in str(pinned.problem)
    assert verify(run_dir).ok  # consistent with itself: why auditors pin the key


def test_a_missing_public_key_is_reported(run_dir: Path) -> None:
    (run_dir / AUDIT_PUBLIC_FILE).unlink()

    assert "audit.pub is missing" in str(verify(run_dir).problem)
    assert verify(run_dir, public_key=KEY.public_key()).ok


def test_a_resumed_chain_continues_and_verifies(run_dir: Path) -> None:
    trail = AuditTrail.open(run_dir, KEY)
    trail.append("resume", {"after-round": 3})
    in_progress = verify(run_dir)  # summary.json is still the first end's
    trail.record_round({"round": 4, "status": "completed"}, participants=SITES)
    trail.record_end({"status": "completed", "rounds-completed": 4})
    summary = json.loads((run_dir / SUMMARY_FILE).read_text())
    (run_dir / SUMMARY_FILE).write_text(json.dumps({**summary, "audit": trail.summary_fields()}))

    result = verify(run_dir)

    assert in_progress.ok, in_progress.describe()
    assert result.ok, result.describe()
    assert [e["seq"] for e in result.entries] == list(range(1, 9))
    assert result.entries[5]["event"] == "resume"
    rounds = [e["data"]["sites"] for e in result.entries if e["event"] == "round"]
    assert rounds[0] == rounds[-1]  # the same pseudonyms after the resume


def test_a_trail_continued_elsewhere_is_copied_then_continued(run_dir: Path) -> None:
    target = run_dir.parent / "resumed"
    target.mkdir()

    trail = AuditTrail.open(target, KEY, continue_from=run_dir)
    trail.append("resume", {"after-round": 3})

    assert verify(target).ok and verify(target).count == 6
    assert verify(run_dir).count == 5  # the source is left as it was


def test_a_tampered_trail_is_not_continued(run_dir: Path) -> None:
    write_lines(run_dir, _change_field(read_lines(run_dir)))

    with pytest.raises(AuditError, match=r"cannot be continued: line 3 \(seq 3\)"):
        AuditTrail.open(run_dir, KEY)


def test_a_trail_is_not_continued_with_another_key(run_dir: Path) -> None:
    with pytest.raises(AuditError, match="names signing key .* but the pinned public key"):
        AuditTrail.open(run_dir, OTHER)


def test_an_unwritable_trail_is_a_loud_error(tmp_path: Path) -> None:
    trail = AuditTrail.open(tmp_path, KEY)
    trail.append("run-start", {})
    (tmp_path / AUDIT_FILE).unlink()
    (tmp_path / AUDIT_FILE).mkdir()  # whatever is there can no longer be appended to

    with pytest.raises(AuditError, match=f"cannot append the round entry to .*{AUDIT_FILE}"):
        trail.append("round", {"round": 1})
    with pytest.raises(AuditError, match="is not a file"):
        AuditTrail.open(tmp_path, KEY)
