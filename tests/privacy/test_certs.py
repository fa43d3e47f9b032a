"""The consortium's CA, the SuperLink's TLS certificate and the sites' node-auth keys."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from privacy.certs import (
    CertificateAuthority,
    create_ca,
    create_node_key_pair,
    create_server_certificate,
    load_ca,
)


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return create_ca(tmp_path / "ca")


@pytest.fixture
def server(ca, tmp_path):
    return create_server_certificate(
        ca, tmp_path / "server", hostnames=["localhost"], ip_addresses=["127.0.0.1"]
    )


def _verifier(ca: CertificateAuthority, subject: x509.DNSName | x509.IPAddress):
    store = Store([x509.load_pem_x509_certificate(ca.cert.read_bytes())])
    return PolicyBuilder().store(store).build_server_verifier(subject)


@pytest.mark.parametrize(
    "subject",
    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    ids=["localhost", "127.0.0.1"],
)
def test_server_certificate_chains_to_the_ca_for_every_name(ca, server, subject):
    leaf = x509.load_pem_x509_certificate(server.cert.read_bytes())

    chain = _verifier(ca, subject).verify(leaf, [])

    assert chain[-1].subject == x509.load_pem_x509_certificate(ca.cert.read_bytes()).subject


def test_server_certificate_is_refused_for_another_name_or_another_ca(ca, server, tmp_path):
    leaf = x509.load_pem_x509_certificate(server.cert.read_bytes())
    other_ca = create_ca(tmp_path / "other", common_name="someone else's CA")

    with pytest.raises(VerificationError):
        _verifier(ca, x509.DNSName("coordinator.example.org")).verify(leaf, [])
    with pytest.raises(VerificationError):
        _verifier(other_ca, x509.DNSName("localhost")).verify(leaf, [])


def _serve_once(context: ssl.SSLContext, listener: socket.socket) -> None:
    conn, _ = listener.accept()
    try:
        with context.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(tls.recv(16))
    except (ssl.SSLError, OSError):
        pass  # a refused client is the point of some tests


def _handshake(server, cafile: Path, server_hostname: str) -> bytes:
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(server.cert, server.key)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        thread = threading.Thread(target=_serve_once, args=(server_ctx, listener), daemon=True)
        thread.start()
        client_ctx = ssl.create_default_context(cafile=str(cafile))
        try:
            with socket.create_connection(listener.getsockname(), timeout=10) as raw:
                with client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
                    tls.sendall(b"ping")
                    return tls.recv(16)
        finally:
            thread.join(timeout=10)


@pytest.mark.parametrize("server_hostname", ["localhost", "127.0.0.1"])
def test_tls_handshake_on_loopback_trusting_only_the_ca(ca, server, server_hostname):
    assert _handshake(server, ca.cert, server_hostname) == b"ping"


def test_tls_handshake_fails_without_our_ca(server, tmp_path):
    stranger = create_ca(tmp_path / "stranger")

    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server, stranger.cert, "localhost")


def test_node_key_pair_is_p384_openssh_and_signs(tmp_path):
    pair = create_node_key_pair(tmp_path, "site-1")

    private = serialization.load_ssh_private_key(pair.private.read_bytes(), password=None)
    public = serialization.load_ssh_public_key(pair.public.read_bytes())
    signature = private.sign(b"fedrad", ec.ECDSA(hashes.SHA384()))  # type: ignore[call-arg, union-attr]

    assert pair.private.read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
    assert pair.public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert pair.public.read_text().split()[-1] == "site-1"
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert isinstance(public.curve, ec.SECP384R1)
    assert private.public_key() == public
    public.verify(signature, b"fedrad", ec.ECDSA(hashes.SHA384()))


def test_flower_accepts_the_node_keys(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    pair = create_node_key_pair(tmp_path, "site-2")
    private = serialization.load_ssh_private_key(pair.private.read_bytes(), password=None)

    assert try_load_public_key(pair.public) == public_key_to_bytes(private.public_key())  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["ca", "server", "node"])
def test_private_keys_are_0600_and_public_files_0644(ca, server, tmp_path, kind):
    node = create_node_key_pair(tmp_path / "node", "site-3")
    private, public = {
        "ca": (ca.key, ca.cert),
        "server": (server.key, server.cert),
        "node": (node.private, node.public),
    }[kind]

    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644


def test_writes_are_atomic_and_leave_no_temporary_files(ca, server, tmp_path):
    create_node_key_pair(tmp_path / "server", "site-1")
    create_node_key_pair(tmp_path / "server", "site-1")  # replaced, not appended

    names = sorted(p.name for p in (tmp_path / "server").iterdir())

    assert names == ["site-1.key", "site-1.pub", "superlink.key", "superlink.pem"]


def test_server_certificate_is_an_end_entity_for_server_auth(ca, server):
    leaf = x509.load_pem_x509_certificate(server.cert.read_bytes())
    root = x509.load_pem_x509_certificate(ca.cert.read_bytes())

    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert (
        x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
        in leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )
    assert leaf.not_valid_after_utc <= root.not_valid_after_utc


@pytest.mark.parametrize(
    ("hostnames", "ip_addresses", "message"),
    [
        ([], [], "at least one host name or IP address"),
        (["localhost"], ["coordinator.example.org"], "is not an IP address"),
    ],
)
def test_server_certificate_arguments_are_checked(ca, tmp_path, hostnames, ip_addresses, message):
    with pytest.raises(ValueError, match=message):
        create_server_certificate(ca, tmp_path, hostnames=hostnames, ip_addresses=ip_addresses)


@pytest.mark.parametrize("name", ["", "../site", ".hidden"])
def test_node_key_names_are_plain_file_names(tmp_path, name):
    with pytest.raises(ValueError, match="plain file name"):
        create_node_key_pair(tmp_path, name)


def test_load_ca_refuses_a_key_from_another_ca(ca, tmp_path):
    other = create_ca(tmp_path / "other")
    mixed = CertificateAuthority(cert=ca.cert, key=other.key)

    assert load_ca(ca)[0].subject == x509.load_pem_x509_certificate(ca.cert.read_bytes()).subject
    with pytest.raises(ValueError, match="is not the private key"):
        load_ca(mixed)
