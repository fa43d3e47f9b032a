"""``fedrad provision``: the consortium folder it writes, refusals, add-site, rotate-site, show."""

from __future__ import annotations

import datetime as dt
import ipaddress
import stat
import tomllib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store

from fedrad.commands.cli import main
from fedrad.commands.consortium import CONNECTION, Consortium, read_site_settings
from fedrad.commands.nodes import diagnose_supernode, site_command
from fedrad.commands.provision import add_site, provision, rotate_site, show, split_hosts
from fedrad.core.errors import ConfigError
from privacy.audit_key import fingerprint, load_private_key, load_public_key
from privacy.secagg.identity import load_roster

pytestmark = pytest.mark.timeout(60)

SITES = ["hospital-a", "hospital-b"]


@pytest.fixture
def consortium(tmp_path: Path) -> Consortium:
    root = tmp_path / "consortium"
    assert provision(root, hosts=["127.0.0.1", "coord.example.org", "::1"], sites=SITES, port=9500)
    return Consortium(root)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _verify(consortium: Consortium, name: x509.DNSName | x509.IPAddress) -> None:
    ca = x509.load_pem_x509_certificate(consortium.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(consortium.server_cert.read_bytes())
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(name)
    verifier.verify(leaf, [])


def test_split_hosts_separates_names_from_addresses() -> None:
    assert split_hosts(["127.0.0.1", "localhost", "::1", " c.example.org "]) == (
        ["localhost", "c.example.org"],
        ["127.0.0.1", "::1"],
    )
    with pytest.raises(ConfigError, match="neither a host name nor an IP"):
        split_hosts(["http://x"])


def test_provision_writes_the_layout_with_private_keys_0600(consortium: Consortium) -> None:
    for private in (consortium.ca_key, consortium.server_key, consortium.audit_key):
        assert _mode(private) == 0o600, private
    for site in SITES:
        folder = consortium.site(site)
        assert _mode(folder.key) == 0o600
        assert folder.public.read_text() == (consortium.node_keys / f"{site}.pub").read_text()
        assert folder.public.read_text().startswith("ecdsa-sha2-nistp384 ")
        assert folder.public.read_text().split()[2] == site
        assert folder.ca_cert.read_bytes() == consortium.ca_cert.read_bytes()
        assert (folder.root / "roster.json.sig").is_file()
    assert b"BEGIN PUBLIC KEY" in consortium.audit_public.read_bytes()
    audit = load_private_key(consortium.audit_key)  # Ed25519, or it raises
    assert fingerprint(load_public_key(consortium.audit_public)) == fingerprint(audit.public_key())
    manifest = consortium.read_manifest()
    assert manifest["hosts"] == ["coord.example.org"]
    assert manifest["ips"] == ["127.0.0.1", "::1"]
    assert manifest["port"] == 9500
    assert list(manifest["sites"]) == SITES
    assert manifest["sites"]["hospital-a"]["fingerprint"].startswith("SHA256:")
    flwr = tomllib.loads((consortium.flwr_home / "config.toml").read_text())
    assert flwr["superlink"]["default"] == CONNECTION
    assert flwr["superlink"][CONNECTION]["address"] == "127.0.0.1:9500"
    assert Path(flwr["superlink"][CONNECTION]["root-certificates"]).is_absolute()


def test_server_certificate_names_every_host_and_address(consortium: Consortium) -> None:
    _verify(consortium, x509.DNSName("coord.example.org"))
    _verify(consortium, x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    _verify(consortium, x509.IPAddress(ipaddress.ip_address("::1")))
    with pytest.raises(x509.verification.VerificationError):
        _verify(consortium, x509.DNSName("other.example.org"))


def test_roster_is_signed_by_the_ca_in_every_site_folder(consortium: Consortium) -> None:
    for site in SITES:
        folder = consortium.site(site)
        roster = load_roster(folder.roster, ca_cert=folder.ca_cert)
        assert list(roster) == SITES
    tampered = consortium.site("hospital-a").roster
    tampered.write_text(tampered.read_text().replace("hospital-b", "hospital-c"))
    with pytest.raises(Exception, match="not signed by the CA"):
        load_roster(tampered, ca_cert=consortium.ca_cert)


def test_site_toml_parses_once_data_dir_is_set(consortium: Consortium, tmp_path: Path) -> None:
    folder = consortium.site("hospital-b").root
    with pytest.raises(ConfigError, match="fill in"):
        read_site_settings(folder)
    settings = read_site_settings(folder, data_dir=tmp_path)
    assert settings.superlink == "127.0.0.1:9500"
    assert settings.clientappio_port == 9095  # 9094 + index: sites can share one host
    assert settings.auth_key == folder / "site.key"
    assert settings.node_config.site_id == "hospital-b"
    assert settings.raw_node_config["ledger-dir"] == str(folder / "ledger")
    assert settings.node_config.max_epsilon == 10.0
    command = site_command(settings)
    assert command[command.index("--port") + 1] == "9095"
    assert f"roster='{folder / 'roster.json'}'" in command[-1]
    assert "min-cell-count=10" in command[-1]


def test_provisioning_again_refuses_and_if_missing_does_nothing(consortium: Consortium) -> None:
    before = consortium.ca_key.read_bytes()
    with pytest.raises(ConfigError, match="add-site") as refused:
        provision(consortium.root, hosts=["127.0.0.1"], sites=["x"])
    assert str(consortium.manifest) in str(refused.value)
    assert provision(consortium.root, hosts=["127.0.0.1"], sites=["x"], if_missing=True) is False
    assert consortium.ca_key.read_bytes() == before
    assert not consortium.site("x").root.exists()


def test_cli_create_is_the_default_subcommand(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "c"
    argv = ["provision", str(root), "--coordinator", "127.0.0.1,localhost", "--sites", "a,b"]
    assert main(argv) == 0
    assert Consortium(root).read_manifest()["address"] == "127.0.0.1:9092"
    assert main([*argv, "--if-missing"]) == 0
    assert "nothing to do" in capsys.readouterr().out
    assert main(argv) == 2


def test_add_site_extends_the_roster_everywhere(consortium: Consortium, tmp_path: Path) -> None:
    folder = add_site(consortium.root, "hospital-c")
    assert _mode(folder.key) == 0o600
    assert (consortium.node_keys / "hospital-c.pub").is_file()
    for site in [*SITES, "hospital-c"]:
        f = consortium.site(site)
        assert list(load_roster(f.roster, ca_cert=f.ca_cert)) == [*SITES, "hospital-c"]
    assert read_site_settings(folder.root, data_dir=tmp_path).clientappio_port == 9096
    with pytest.raises(ConfigError, match="rotate-site"):
        add_site(consortium.root, "hospital-c")


def test_rotate_site_changes_the_key_and_the_roster(consortium: Consortium) -> None:
    folder = consortium.site("hospital-a")
    old_public = folder.public.read_text()
    old_roster = folder.roster.read_bytes()
    rotation = rotate_site(consortium.root, "hospital-a")
    assert folder.public.read_text() != old_public
    assert rotation.old_key.read_text() == old_public
    assert rotation.old_key.name.startswith("hospital-a.pub.old-")
    assert (consortium.node_keys / "hospital-a.pub").read_text() == folder.public.read_text()
    assert folder.roster.read_bytes() != old_roster
    assert rotation.resend == [consortium.site(s).root for s in SITES]
    assert rotation.live == []  # no coordinator runs
    roster = load_roster(consortium.site("hospital-b").roster, ca_cert=consortium.ca_cert)
    assert rotation.fingerprint == consortium.read_manifest()["sites"]["hospital-a"]["fingerprint"]
    assert roster.key_of("hospital-a") is not None
    with pytest.raises(ConfigError, match="add-site"):
        rotate_site(consortium.root, "nobody")


def test_show_lists_sites_and_warns_before_certificates_expire(consortium: Consortium) -> None:
    text = show(consortium.root)
    fingerprint = consortium.read_manifest()["sites"]["hospital-b"]["fingerprint"]
    assert "hospital-a" in text and fingerprint in text
    assert "coordinator certificate expires" in text and "WARNING" not in text
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=350)
    assert "WARNING: the coordinator certificate" in show(consortium.root, now=later)
    expired = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=400)
    assert "has expired" in show(consortium.root, now=expired)


# Flower 1.42's own output for each failure, as seen on loopback (tests/test_operator_nodes.py
# reproduces the CA and key cases with real processes)
_FLOWER_305 = "ERROR :     Exit Code: 305\nFailed to initialize the connection to the SuperLink."


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        (
            "SSL/TLS handshake error detected.\n" + _FLOWER_305 + "\n[SSL: CERTIFICATE_VERIFY_"
            "FAILED] certificate verify failed: unable to get local issuer certificate",
            "is not the CA that signed",
        ),
        (
            _FLOWER_305 + "\n[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: "
            "certificate has expired (_ssl.c:1006)",
            "certificate has expired",
        ),
        (_FLOWER_305 + "\n[code: 2004] Failed to activate SuperNode.", "does not know this site"),
        ("ERROR: [Errno 98] error while attempting to bind: address already in use", "port"),
    ],
)
def test_flower_failures_get_an_operator_message(output: str, expected: str) -> None:
    message = diagnose_supernode(output, Path("/site"))
    assert message is not None and expected in message
