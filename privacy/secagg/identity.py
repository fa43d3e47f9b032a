"""Site identities and the consortium roster: who may take part in a secure round.

Without them the coordinator relays the sites' public round keys unsigned and could swap in
keys of its own (a man-in-the-middle that reads a site's shares and unmasks its update). With
them, each site signs its round keys with its long-term *identity key*, and every site checks
every peer's signature and membership against the *roster* it holds locally.

Identity key
    ECDSA on P-384, signatures with SHA-384: the key type of Flower's SuperNode
    authentication (:func:`privacy.certs.create_node_key_pair`), so a provisioned node key
    (OpenSSH or PEM private key) serves as the identity key. The file must be readable by its
    owner only (mode 0600).
Roster
    A JSON file ``{"format": "fedrad-roster/1", "sites": [{"name": ..., "public-key": ...}]}``
    listing the consortium's sites by name with their identity public keys (one OpenSSH
    public-key line each, as in a ``.pub`` file). Names and keys are unique. In a deployment
    the consortium's CA signs it: the detached signature ``<roster>.sig`` holds the base64 DER
    ECDSA signature (SHA-384) of the CA key over ``ROSTER_LABEL`` and the roster's exact bytes
    (length-prefixed), and the site checks it against the CA certificate it holds.

A site finds its own name in the roster by its public key, so a site's name cannot be chosen
by the coordinator. What a site signs is described in :func:`advertisement_bytes`.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import IdentityError
from .ids import NodeId, encode_fields, encode_id

__all__ = [
    "ROSTER_FORMAT",
    "ROSTER_LABEL",
    "Roster",
    "SiteIdentity",
    "advertisement_bytes",
    "fingerprint",
    "load_identity_key",
    "load_roster",
    "roster_signature_path",
    "sign_roster",
    "verify",
]

ROSTER_FORMAT = "fedrad-roster/1"
ROSTER_LABEL = b"fedrad/roster/v1"
_ADVERT_LABEL = b"fedrad/secagg/v1/key-advertisement"
_CURVE = ec.SECP384R1
_HASH = hashes.SHA384
_MAX_ROSTER_BYTES = 4 << 20
_MAX_SITES = 10_000


def _check_public(key: object, where: str) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, _CURVE):
        raise IdentityError(f"{where} is not an ECDSA P-384 public key (the node-key type).")
    return key


def _openssh(key: ec.EllipticCurvePublicKey) -> str:
    return key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ).decode("ascii")


def fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """Return ``SHA256:<hex>`` of the key's DER SubjectPublicKeyInfo (for messages and logs)."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "SHA256:" + hashlib.sha256(der).hexdigest()[:32]


@dataclasses.dataclass(frozen=True)
class Roster:
    """The consortium's sites: roster name to identity public key (names and keys unique)."""

    sites: Mapping[str, ec.EllipticCurvePublicKey]

    def __post_init__(self) -> None:
        sites = dict(self.sites)
        if not sites:
            raise IdentityError("The roster lists no sites.")
        if len(sites) > _MAX_SITES:
            raise IdentityError(f"The roster lists {len(sites)} sites, more than {_MAX_SITES}.")
        for name, key in sites.items():
            if not isinstance(name, str) or not name or len(name) > 256:
                raise IdentityError(f"Roster name {name!r} must be a string of 1 to 256 chars.")
            _check_public(key, f"The roster's key of {name!r}")
        keys = [_openssh(key) for key in sites.values()]
        if len(set(keys)) != len(keys):
            raise IdentityError("The roster lists one identity key under two names.")
        object.__setattr__(self, "sites", dict(sorted(sites.items())))

    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self) -> Iterator[str]:
        return iter(self.sites)

    def key_of(self, name: str) -> ec.EllipticCurvePublicKey | None:
        """Return the identity public key of roster name ``name``, or None if it is not listed."""
        return self.sites.get(name)

    def name_of(self, key: ec.EllipticCurvePublicKey) -> str | None:
        """Return the roster name of ``key``, or None if the roster does not list it."""
        wanted = _openssh(key)
        return next((n for n, k in self.sites.items() if _openssh(k) == wanted), None)

    def to_bytes(self) -> bytes:
        """Return the roster file's bytes (UTF-8 JSON, sites sorted by name)."""
        sites = [{"name": n, "public-key": _openssh(k)} for n, k in self.sites.items()]
        return (json.dumps({"format": ROSTER_FORMAT, "sites": sites}, indent=1) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, where: str = "the roster") -> Roster:
        """Parse a roster file's bytes.

        Raises
        ------
        IdentityError
            If the bytes are not a roster of this format, or a name or key is invalid or repeats.
        """
        if len(data) > _MAX_ROSTER_BYTES:
            raise IdentityError(f"{where} is larger than {_MAX_ROSTER_BYTES} bytes.")
        try:
            raw = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise IdentityError(f"{where} is not valid JSON: {error}") from error
        if not isinstance(raw, dict) or raw.get("format") != ROSTER_FORMAT:
            raise IdentityError(f"{where} must be a JSON object of format {ROSTER_FORMAT!r}.")
        entries = raw.get("sites")
        if set(raw) != {"format", "sites"} or not isinstance(entries, list):
            raise IdentityError(f"{where} must hold exactly 'format' and a list 'sites'.")
        sites: dict[str, ec.EllipticCurvePublicKey] = {}
        for entry in entries:
            if not isinstance(entry, dict) or set(entry) != {"name", "public-key"}:
                raise IdentityError(f"Every site of {where} needs exactly 'name' and 'public-key'.")
            name, text = entry["name"], entry["public-key"]
            if not isinstance(name, str) or not isinstance(text, str) or name in sites:
                raise IdentityError(f"{where} lists site {name!r} twice or with a bad key.")
            try:
                key = serialization.load_ssh_public_key(text.encode("ascii"))
            except (ValueError, UnicodeEncodeError) as error:
                raise IdentityError(f"{where}: unreadable key of {name!r}: {error}") from error
            sites[name] = _check_public(key, f"{where}: the key of {name!r}")
        return cls(sites)


@dataclasses.dataclass(frozen=True)
class SiteIdentity:
    """A site's long-term identity: its roster name, public key and (while signing) private key.

    A session restored mid-round holds no private key (:attr:`private_key` is None): it has
    already signed, and the long-term key is never saved in a round's state.
    """

    name: str
    public_key: ec.EllipticCurvePublicKey
    private_key: ec.EllipticCurvePrivateKey | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def generate(cls, name: str) -> SiteIdentity:
        """Return a fresh identity (tests, in-memory rounds); add its key to a roster to use it."""
        private = ec.generate_private_key(_CURVE())
        return cls(name=name, public_key=private.public_key(), private_key=private)

    @classmethod
    def from_key(cls, private_key: ec.EllipticCurvePrivateKey, roster: Roster) -> SiteIdentity:
        """Return the identity of ``private_key``, named as the roster lists its public key.

        Raises
        ------
        IdentityError
            If the roster does not list this key.
        """
        public = _check_public(private_key.public_key(), "The identity key")
        name = roster.name_of(public)
        if name is None:
            raise IdentityError(
                f"This site's identity key ({fingerprint(public)}) is not in its roster: add "
                "the site to the roster (its public key), or name the right identity-key."
            )
        return cls(name=name, public_key=public, private_key=private_key)

    def sign(self, data: bytes) -> bytes:
        """Return the DER ECDSA P-384 / SHA-384 signature of ``data``."""
        if self.private_key is None:
            raise IdentityError(f"The identity of {self.name!r} holds no private key to sign.")
        return self.private_key.sign(data, ec.ECDSA(_HASH()))


def verify(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> bool:
    """Return whether ``signature`` is ``key``'s ECDSA P-384 / SHA-384 signature of ``data``."""
    try:
        key.verify(signature, data, ec.ECDSA(_HASH()))
    except (InvalidSignature, ValueError):
        return False
    return True


def advertisement_bytes(
    *,
    setup_digest: bytes,
    round_id: str,
    sender: NodeId,
    signer: str,
    encryption_key: bytes,
    mask_key: bytes,
) -> bytes:
    """Return what a site signs with its identity key: its round keys, bound to the round.

    The fields are length-prefixed after a domain label, so no other message or field split
    encodes alike. ``setup_digest`` (SHA-256 of the round setup, participants, threshold and
    neighbour graph included) binds the keys to the round every signer saw: a site shown a
    different participant list than its peers rejects their signatures.
    """
    return encode_fields(
        _ADVERT_LABEL,
        setup_digest,
        round_id.encode("utf-8"),
        encode_id(sender),
        signer.encode("utf-8"),
        encryption_key,
        mask_key,
    )


def _read_private(path: Path) -> bytes:
    if not path.is_file():
        raise IdentityError(
            f"The identity key {path} does not exist: give the node key made at provisioning "
            "(identity-key='/path/site.key'), or run 'fedrad synth' for a simulation."
        )
    if os.name == "posix" and stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise IdentityError(
            f"The identity key {path} is readable by other users: run 'chmod 600 {path}'."
        )
    return path.read_bytes()


def load_identity_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """Read an identity private key (OpenSSH or PEM PKCS#8, unencrypted, ECDSA P-384).

    Raises
    ------
    IdentityError
        If the file is missing, readable by others, unreadable or of another key type.
    """
    data = _read_private(path)
    try:
        if data.lstrip().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----"):
            key: object = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as error:
        raise IdentityError(f"The identity key {path} is unreadable: {error}") from error
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, _CURVE):
        raise IdentityError(
            f"The identity key {path} is not an ECDSA P-384 key; use the node key from "
            "provisioning (privacy.certs.create_node_key_pair)."
        )
    return key


def roster_signature_path(roster: Path) -> Path:
    """Return where the CA's detached signature of ``roster`` lives: ``<roster>.sig``."""
    return roster.with_name(roster.name + ".sig")


def _signed_roster_bytes(data: bytes) -> bytes:
    return encode_fields(ROSTER_LABEL, data)


def sign_roster(data: bytes, ca_key: ec.EllipticCurvePrivateKey) -> bytes:
    """Return the detached signature file's bytes: the CA's signature of roster ``data``."""
    signature = ca_key.sign(_signed_roster_bytes(data), ec.ECDSA(_HASH()))
    return base64.b64encode(signature) + b"\n"


def _ca_key(ca_cert: Path) -> ec.EllipticCurvePublicKey:
    try:
        cert = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    except (OSError, ValueError) as error:
        raise IdentityError(f"The CA certificate {ca_cert} is unreadable: {error}") from error
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise IdentityError(f"{ca_cert} is not a CA certificate (no BasicConstraints ca=True).")
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise IdentityError(f"The CA certificate {ca_cert} holds no EC key.")
    return key


def load_roster(path: Path, *, ca_cert: Path | None) -> Roster:
    """Read the site's roster; with ``ca_cert``, first check the CA's detached signature.

    Without ``ca_cert`` the roster is trusted as the local file it is (simulation, where
    ``fedrad synth`` wrote it beside the site folders).

    Raises
    ------
    IdentityError
        If the roster or its signature is missing or invalid, or the CA certificate unusable.
    """
    if not path.is_file():
        raise IdentityError(
            f"The roster {path} does not exist: get the consortium's signed roster from its "
            "operator (roster='/path/roster.json'), or run 'fedrad synth' for a simulation."
        )
    data = path.read_bytes()
    if ca_cert is not None:
        sig_path = roster_signature_path(path)
        if not sig_path.is_file():
            raise IdentityError(
                f"The roster {path} has no CA signature {sig_path}: get both from the operator."
            )
        try:
            signature = base64.b64decode(sig_path.read_bytes().strip(), validate=True)
        except ValueError as error:
            raise IdentityError(f"The roster signature {sig_path} is not base64.") from error
        if not verify(_ca_key(ca_cert), signature, _signed_roster_bytes(data)):
            raise IdentityError(
                f"The roster {path} is not signed by the CA of {ca_cert}: it was altered, or "
                "signed by another CA; do not take part until the operator re-issues it."
            )
    return Roster.from_bytes(data, where=f"The roster {path}")
