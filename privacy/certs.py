"""Certificates and keys for a real deployment: a CA, the SuperLink's TLS certificate, node keys.

A consortium needs three kinds of credential, all made here with ``cryptography``:

- a certificate authority (CA) whose certificate every SuperNode and every ``flwr`` user trusts
  (``flower-supernode --root-certificates ca.pem``, ``root-certificates`` in FLWR_HOME's
  ``config.toml``);
- the SuperLink's server certificate, signed by that CA, naming every host name and IP address
  sites dial (``flower-superlink --ssl-ca-certfile ca.pem --ssl-certfile server.pem
  --ssl-keyfile server.key``);
- one ECDSA P-384 key pair per site in OpenSSH format: the operator registers the public half
  (``flwr supernode register site.pub CONNECTION``), the site keeps the private half
  (``flower-supernode --auth-supernode-private-key site.key``). A node whose key is not
  registered is refused. The same private key is the site's identity key for secure
  aggregation (node config ``identity-key``);
- the consortium's roster of those public keys, signed by the CA (:func:`create_roster`):
  every site holds it (node config ``roster``, with ``ca-cert`` naming ``ca.pem``) and checks
  its peers' signed round keys against it.

Every file is written atomically (temporary file in the same folder, fsync, ``os.replace``);
private keys are created with mode 0600 and never exist on disk with wider permissions.
Private keys are written unencrypted because the Flower commands read them without a passphrase:
protect them with file permissions and the host's own disk encryption.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedrad.core.durable import write_atomic
from privacy.secagg.identity import Roster, roster_signature_path, sign_roster

__all__ = [
    "CertificateAuthority",
    "NodeKeyPair",
    "ServerCertificate",
    "create_ca",
    "create_node_key_pair",
    "create_roster",
    "create_server_certificate",
    "load_ca",
]

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
_CURVE = ec.SECP384R1  # Flower's node authentication requires a NIST curve; P-384 everywhere
_HASH = hashes.SHA384
_CLOCK_SKEW = dt.timedelta(minutes=5)  # tolerate hosts whose clocks run a little behind


@dataclass(frozen=True)
class CertificateAuthority:
    """A CA on disk: ``cert`` (PEM, public) and ``key`` (PEM PKCS#8, mode 0600)."""

    cert: Path
    key: Path


@dataclass(frozen=True)
class ServerCertificate:
    """The SuperLink's TLS ``cert`` and ``key`` (mode 0600), and the ``ca`` that signed them."""

    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class NodeKeyPair:
    """A SuperNode's authentication key pair in OpenSSH format; ``private`` has mode 0600."""

    private: Path
    public: Path


def _write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Write ``data`` to ``path`` via a temporary file created with ``mode`` and renamed over it."""
    write_atomic(path, data, mode=mode)


def _check_days(valid_days: int) -> None:
    if valid_days < 1:
        raise ValueError(f"valid_days must be at least 1, got {valid_days}.")


def _name(common_name: str) -> x509.Name:
    if not common_name.strip():
        raise ValueError("A certificate needs a non-empty common name.")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _validity(valid_days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.timezone.utc)
    return now - _CLOCK_SKEW, now + dt.timedelta(days=valid_days)


def create_ca(
    out_dir: Path, *, common_name: str = "fedrad consortium CA", valid_days: int = 3650
) -> CertificateAuthority:
    """Create a self-signed CA (``ca.pem``, ``ca.key``) in ``out_dir``.

    The CA may sign only end-entity certificates (path length 0). Keep ``ca.key`` offline
    once the server certificate is made; only ``ca.pem`` is handed to sites.
    """
    _check_days(valid_days)
    key = ec.generate_private_key(_CURVE())
    name = _name(common_name)
    not_before, not_after = _validity(valid_days)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, _HASH())
    )
    ca = CertificateAuthority(cert=out_dir / "ca.pem", key=out_dir / "ca.key")
    _write_atomic(ca.key, _private_pem(key), mode=PRIVATE_MODE)
    _write_atomic(ca.cert, cert.public_bytes(serialization.Encoding.PEM), mode=PUBLIC_MODE)
    return ca


def load_ca(ca: CertificateAuthority) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Read a CA's certificate and private key, checking that they belong together."""
    cert = x509.load_pem_x509_certificate(ca.cert.read_bytes())
    key = serialization.load_pem_private_key(ca.key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca.key} is not an EC private key; create the CA with create_ca().")
    if key.public_key() != cert.public_key():
        raise ValueError(f"{ca.key} is not the private key of {ca.cert}.")
    return cert, key


def _subject_alternative_names(
    hostnames: Sequence[str], ip_addresses: Sequence[str]
) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames if h.strip()]
    for raw in ip_addresses:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(raw)))
        except ValueError:
            raise ValueError(
                f"{raw!r} is not an IP address; pass host names with hostnames=."
            ) from None
    if not names:
        raise ValueError(
            "A server certificate needs at least one host name or IP address that sites dial, "
            "e.g. hostnames=['coordinator.example.org'] or ip_addresses=['127.0.0.1']."
        )
    return x509.SubjectAlternativeName(names)


def create_server_certificate(
    ca: CertificateAuthority,
    out_dir: Path,
    *,
    hostnames: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    name: str = "superlink",
    valid_days: int = 365,
) -> ServerCertificate:
    """Create ``<name>.pem`` and ``<name>.key`` in ``out_dir``: a TLS certificate signed by ``ca``.

    Clients check the address they dial against the subject alternative names, so list every
    host name (``hostnames``) and IP address (``ip_addresses``) sites and operators use.
    """
    _check_days(valid_days)
    san = _subject_alternative_names(hostnames, ip_addresses)
    ca_cert, ca_key = load_ca(ca)
    key = ec.generate_private_key(_CURVE())
    public = key.public_key()
    not_before, not_after = _validity(valid_days)
    not_after = min(not_after, ca_cert.not_valid_after_utc)
    common_name = next(iter(hostnames), None) or next(iter(ip_addresses))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(san, critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, _HASH())
    )
    server = ServerCertificate(
        cert=out_dir / f"{name}.pem", key=out_dir / f"{name}.key", ca=ca.cert
    )
    _write_atomic(server.key, _private_pem(key), mode=PRIVATE_MODE)
    _write_atomic(server.cert, cert.public_bytes(serialization.Encoding.PEM), mode=PUBLIC_MODE)
    return server


def create_node_key_pair(out_dir: Path, name: str) -> NodeKeyPair:
    """Create ``<name>.key`` (OpenSSH private key, 0600) and ``<name>.pub`` in ``out_dir``.

    The key is ECDSA on P-384, the curve Flower's SuperNode authentication expects. ``name``
    (e.g. the site id) is also the public key's comment, so a registered key says whose it is.
    """
    if not name or "/" in name or name.startswith("."):
        raise ValueError(
            f"A key pair's name must be a plain file name such as 'site-1', got {name!r}."
        )
    key = ec.generate_private_key(_CURVE())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    pair = NodeKeyPair(private=out_dir / f"{name}.key", public=out_dir / f"{name}.pub")
    _write_atomic(pair.private, private, mode=PRIVATE_MODE)
    _write_atomic(pair.public, public + b" " + name.encode() + b"\n", mode=PUBLIC_MODE)
    return pair


def create_roster(
    ca: CertificateAuthority, out_path: Path, node_keys: Mapping[str, NodeKeyPair]
) -> Path:
    """Write the roster of ``node_keys`` (site name to key pair) to ``out_path``, CA-signed.

    The detached signature goes to ``<out_path>.sig``. Hand both files, with ``ca.pem``, to
    every site. Returns ``out_path``.
    """
    sites = {}
    for name, pair in node_keys.items():
        key_type_and_key = b" ".join(pair.public.read_bytes().split()[:2])  # without comment
        key = serialization.load_ssh_public_key(key_type_and_key)
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ValueError(f"{pair.public} is not an EC public key.")
        sites[name] = key
    data = Roster(sites).to_bytes()
    _, ca_key = load_ca(ca)
    _write_atomic(out_path, data, mode=PUBLIC_MODE)
    _write_atomic(roster_signature_path(out_path), sign_roster(data, ca_key), mode=PUBLIC_MODE)
    return out_path
