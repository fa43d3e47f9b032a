"""Site identity keys and the consortium roster: loading, the CA's signature, the contract
with what fedrad synth writes, and a session that keeps checking peers after a restore."""

from __future__ import annotations

import dataclasses
import os

import pytest

from privacy.certs import create_ca, create_node_key_pair, load_ca
from privacy.secagg import (
    ClientSession,
    IdentityError,
    InMemoryRound,
    PeerAuthenticationError,
    Roster,
    RoundSetup,
    SiteIdentity,
    load_identity_key,
    load_roster,
)
from privacy.secagg.identity import ROSTER_FORMAT, roster_signature_path, sign_roster

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def consortium(tmp_path):
    """A CA, three provisioned node keys and the roster the CA signed."""
    ca = create_ca(tmp_path / "ca")
    pairs = {name: create_node_key_pair(tmp_path, name) for name in ("north", "south", "east")}
    keys = {name: load_identity_key(pair.private) for name, pair in pairs.items()}
    roster = Roster({name: key.public_key() for name, key in keys.items()})
    path = tmp_path / "roster.json"
    path.write_bytes(roster.to_bytes())
    _, ca_key = load_ca(ca)
    roster_signature_path(path).write_bytes(sign_roster(path.read_bytes(), ca_key))
    return ca, pairs, path


def test_a_provisioned_node_key_is_an_identity_named_by_the_signed_roster(consortium):
    ca, pairs, path = consortium

    roster = load_roster(path, ca_cert=ca.cert)
    identity = SiteIdentity.from_key(load_identity_key(pairs["south"].private), roster)

    assert list(roster) == ["east", "north", "south"]
    assert identity.name == "south"


def test_an_altered_roster_is_refused(consortium):
    ca, _, path = consortium
    path.write_bytes(path.read_bytes().replace(b'"east"', b'"west"'))

    with pytest.raises(IdentityError, match="not signed by the CA"):
        load_roster(path, ca_cert=ca.cert)


def test_a_roster_signed_by_another_ca_is_refused(consortium, tmp_path):
    _, _, path = consortium
    other = create_ca(tmp_path / "other")

    with pytest.raises(IdentityError, match="not signed by the CA"):
        load_roster(path, ca_cert=other.cert)


def test_a_roster_without_its_signature_is_refused(consortium):
    ca, _, path = consortium
    roster_signature_path(path).unlink()

    with pytest.raises(IdentityError, match="has no CA signature"):
        load_roster(path, ca_cert=ca.cert)


def test_a_key_the_roster_does_not_list_is_refused(consortium, tmp_path):
    ca, _, path = consortium
    stranger = create_node_key_pair(tmp_path, "stranger")

    with pytest.raises(IdentityError, match="not in its roster"):
        SiteIdentity.from_key(
            load_identity_key(stranger.private), load_roster(path, ca_cert=ca.cert)
        )


@pytest.mark.skipif(os.name != "posix", reason="file modes")
def test_an_identity_key_readable_by_others_is_refused(consortium):
    _, pairs, _ = consortium
    pairs["north"].private.chmod(0o644)

    with pytest.raises(IdentityError, match="chmod 600"):
        load_identity_key(pairs["north"].private)


def test_what_synth_writes_loads_as_identities_and_roster(tmp_path):
    from fedrad.synth import identity as synth_identity

    folder = synth_identity.write_identities(tmp_path, ["site-1", "site-2", "site-3"])

    roster = load_roster(folder / synth_identity.ROSTER_FILE, ca_cert=None)
    identity = SiteIdentity.from_key(load_identity_key(folder / "site-2.key"), roster)
    assert synth_identity.ROSTER_FORMAT == ROSTER_FORMAT
    assert identity.name == "site-2" and len(roster) == 3
    assert (folder / "site-2.key").stat().st_mode & 0o777 == 0o600


def test_a_roster_listing_one_key_twice_is_refused():
    identity = SiteIdentity.generate("a")

    with pytest.raises(IdentityError, match="one identity key under two names"):
        Roster({"a": identity.public_key, "b": identity.public_key})


def test_a_restored_session_still_checks_its_peers():
    setup = RoundSetup.create(
        round_id="r",
        participants=[1, 2, 3],
        threshold=2,
        array_shapes={"w": (4,)},
        clipping_range=1.0,
    )
    round_ = InMemoryRound(setup, {p: ({"w": [0.0] * 4}, 1) for p in (1, 2, 3)})
    broadcasts = round_.advertise_keys()
    restored = ClientSession.restore(round_.clients[1].snapshot())
    forged = dataclasses.replace(
        broadcasts[1], signatures=tuple(reversed(broadcasts[1].signatures))
    )

    with pytest.raises(PeerAuthenticationError, match="bad signature from peer 2"):
        restored.share_keys(forged)
    assert b"PRIVATE" not in round_.clients[1].snapshot()  # no long-term key in the state


def test_create_roster_signs_the_provisioned_node_keys(tmp_path):
    from privacy.certs import create_roster

    ca = create_ca(tmp_path / "ca")
    pairs = {name: create_node_key_pair(tmp_path, name) for name in ("a", "b", "c")}

    path = create_roster(ca, tmp_path / "roster.json", pairs)

    roster = load_roster(path, ca_cert=ca.cert)
    assert SiteIdentity.from_key(load_identity_key(pairs["b"].private), roster).name == "b"
