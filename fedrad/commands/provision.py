"""``fedrad provision``: create a consortium folder, add and rotate sites, show what it holds.

Run on the coordinator's CA host. ``fedrad provision CONSORTIUM_DIR --coordinator HOST,...
--sites NAME,...`` writes the layout of :mod:`fedrad.commands.consortium`: the CA, the
coordinator's TLS certificate (every HOST a subject alternative name: host names as DNS names,
addresses as IP addresses), the audit key pair, one node key pair per site, the CA-signed roster
and each site's folder ``sites/NAME/`` with its ``site.toml``. Hand each hospital its own site
folder and nothing else.

``add-site`` adds one site to an existing consortium, ``rotate-site`` gives a site a new key
pair (the old public key is kept, the roster re-signed; a running coordinator learns the new key
at once) and ``show`` lists the sites and when the certificates expire.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedrad.commands.consortium import CONNECTION, DEFAULT_PORT, Consortium, SiteFolder
from fedrad.core.durable import write_atomic
from fedrad.core.errors import ConfigError
from privacy.audit_key import write_key_pair
from privacy.certs import (
    CertificateAuthority,
    NodeKeyPair,
    create_ca,
    create_node_key_pair,
    create_roster,
    create_server_certificate,
)
from privacy.secagg.identity import fingerprint, roster_signature_path

__all__ = [
    "CLIENTAPPIO_BASE_PORT",
    "EXPIRY_WARNING_DAYS",
    "Rotation",
    "add_parser",
    "add_site",
    "certificate_expiry",
    "key_fingerprint",
    "provision",
    "rotate_site",
    "show",
    "site_toml",
    "split_hosts",
]

CLIENTAPPIO_BASE_PORT = 9094
"""Site ``i`` (0-based, in provisioning order) gets ClientAppIo port ``9094 + i``, so that
several sites can share one host (the compose try-out, a test machine)."""
EXPIRY_WARNING_DAYS = 30
"""``show`` warns when a certificate expires within this many days."""
_MANIFEST_FORMAT = 1


def _today() -> str:
    return dt.datetime.now(dt.timezone.utc).date().isoformat()


def split_hosts(hosts: Sequence[str]) -> tuple[list[str], list[str]]:
    """Split coordinator ``hosts`` into (DNS names, IP addresses), in the order given."""
    names: list[str] = []
    ips: list[str] = []
    for raw in hosts:
        host = raw.strip()
        if not host:
            continue
        try:
            ips.append(str(ipaddress.ip_address(host)))
        except ValueError:
            if not all(part and len(part) < 64 for part in host.split(".")) or any(
                c in host for c in " :/@"
            ):
                raise ConfigError(
                    f"--coordinator {host!r} is neither a host name nor an IP address; give the "
                    "names and addresses sites dial, e.g. --coordinator coord.example.org,10.0.0.5"
                ) from None
            names.append(host)
    if not names and not ips:
        raise ConfigError(
            "--coordinator needs at least one host name or IP address that sites dial."
        )
    return names, ips


def _check_site_name(name: str) -> str:
    if not name or name.startswith((".", "-")) or not all(c.isalnum() or c in "-_." for c in name):
        raise ConfigError(
            f"site name {name!r} must be a plain name of letters, digits, '-', '_' or '.', "
            "e.g. hospital-a."
        )
    return name


def key_fingerprint(public_key: Path) -> str:
    """``SHA256:...`` of an OpenSSH public key file (the fingerprint the roster messages use)."""
    key = serialization.load_ssh_public_key(b" ".join(public_key.read_bytes().split()[:2]))
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ConfigError(f"{public_key} is not an EC public key; rotate the site's key.")
    return fingerprint(key)


def certificate_expiry(cert: Path) -> dt.datetime:
    """When the PEM certificate ``cert`` stops being valid (UTC)."""
    return x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc


def site_toml(name: str, superlink: str, clientappio_port: int) -> str:
    """The ``site.toml`` that ``provision`` writes for site ``name`` (data-dir left to fill)."""
    return f"""\
# fedrad site configuration of {name}, written by `fedrad provision`.
# Fill in data-dir, check the data with `fedrad site check DATA_DIR`, then run
# `fedrad site start .` in this folder. Relative paths are relative to this folder.
# The coordinator cannot change any of these: this site alone decides its privacy parameters.

[site]
name = "{name}"
superlink = "{superlink}"           # the coordinator: a host name of its certificate, and port
root-certificates = "ca.pem"        # the consortium CA, which signed the coordinator's certificate
auth-key = "site.key"               # this site's node key (mode 0600); the operator holds site.pub
clientappio-port = {clientappio_port}           # the SuperNode's own API, on 127.0.0.1 only

[node-config]
data-dir = ""                       # FILL IN: DICOM files and labels.csv of this hospital
site-id = "{name}"
identity-key = "site.key"           # signs this site's secure-aggregation keys
roster = "roster.json"              # the consortium's sites, signed by the CA (roster.json.sig)
ca-cert = "ca.pem"
ledger-dir = "ledger"               # the privacy ledger: keep it and back it up
cache-dir = "cache"                 # decoded samples; safe to delete
min-cell-count = 10                 # smallest subgroup count that may leave the site
max-epsilon = 10.0                  # privacy budget per study
max-total-epsilon = 30.0            # privacy budget over all studies together
num-threads = 0                     # torch threads; 0: all CPUs (divide them on a shared host)
"""


def _write_json(path: Path, data: object) -> None:
    write_atomic(path, (json.dumps(data, indent=1) + "\n").encode(), mode=0o644)


def _ca(consortium: Consortium) -> CertificateAuthority:
    ca = CertificateAuthority(cert=consortium.ca_cert, key=consortium.ca_key)
    if not ca.key.is_file():
        raise ConfigError(
            f"{ca.key} is missing: adding or rotating a site needs the CA key; run this on the "
            "CA host (or restore ca/ca.key there from its offline copy)."
        )
    return ca


def _superlink_address(manifest: dict[str, Any]) -> str:
    return str(manifest["address"])


def _sign_and_distribute(consortium: Consortium, sites: Sequence[str]) -> list[Path]:
    """Re-sign the roster from ``node-keys/`` and copy it (and ca.pem) into every site folder."""
    pairs = {
        name: NodeKeyPair(
            private=consortium.site(name).key, public=consortium.node_keys / f"{name}.pub"
        )
        for name in sites
    }
    create_roster(_ca(consortium), consortium.roster, pairs)
    folders = []
    for name in sites:
        site = consortium.site(name)
        site.root.mkdir(parents=True, exist_ok=True)
        for source, target in (
            (consortium.roster, site.roster),
            (roster_signature_path(consortium.roster), roster_signature_path(site.roster)),
            (consortium.ca_cert, site.ca_cert),
        ):
            write_atomic(target, source.read_bytes(), mode=0o644)
        folders.append(site.root)
    return folders


def _new_site_keys(consortium: Consortium, name: str) -> str:
    """Create site ``name``'s key pair in its folder and copy the public half to node-keys/."""
    site = consortium.site(name)
    site.root.mkdir(parents=True, exist_ok=True)
    pair = create_node_key_pair(site.root, "site")
    # the comment of the public key names the site, so a registered key says whose it is
    public = b" ".join(pair.public.read_bytes().split()[:2]) + b" " + name.encode() + b"\n"
    write_atomic(site.public, public, mode=0o644)
    consortium.node_keys.mkdir(parents=True, exist_ok=True)
    write_atomic(consortium.node_keys / f"{name}.pub", public, mode=0o644)
    return key_fingerprint(site.public)


def _write_site(consortium: Consortium, manifest: dict[str, Any], name: str, index: int) -> None:
    site = consortium.site(name)
    sites: dict[str, Any] = manifest["sites"]
    port = CLIENTAPPIO_BASE_PORT + index
    sites[name] = {
        "created": _today(),
        "fingerprint": _new_site_keys(consortium, name),
        "clientappio-port": port,
        "rotated": [],
    }
    write_atomic(
        site.config, site_toml(name, _superlink_address(manifest), port).encode(), mode=0o644
    )


def _existing(consortium: Consortium) -> list[Path]:
    candidates = [
        consortium.manifest,
        consortium.ca_cert,
        consortium.ca_key,
        consortium.server_cert,
        consortium.server_key,
        consortium.audit_key,
    ]
    return [p for p in candidates if p.exists()]


def provision(
    root: Path,
    *,
    hosts: Sequence[str],
    sites: Sequence[str],
    port: int = DEFAULT_PORT,
    days: int = 365,
    if_missing: bool = False,
) -> bool:
    """Create a consortium folder at ``root``; return False if ``if_missing`` found one there.

    Raises
    ------
    ConfigError
        If ``root`` already holds a consortium (and not ``if_missing``), or a host or site name
        is invalid.
    """
    consortium = Consortium(root)
    found = _existing(consortium)
    if found:
        if if_missing:
            return False
        raise ConfigError(
            f"{root} is already provisioned ({', '.join(str(p) for p in found)}); provisioning "
            "again would replace the CA and every key. Use `fedrad provision add-site "
            f"{root} NAME` to add a site, `fedrad provision rotate-site {root} NAME` to renew a "
            f"site's key, `fedrad provision show {root}` to see it; or delete the folder."
        )
    names, ips = split_hosts(hosts)
    site_names = [_check_site_name(s.strip()) for s in sites if s.strip()]
    if not site_names:
        raise ConfigError(
            "--sites needs at least one site name, e.g. --sites hospital-a,hospital-b"
        )
    if len(set(site_names)) != len(site_names):
        raise ConfigError(f"--sites names a site twice: {','.join(site_names)}")
    if not 0 < port < 65536:
        raise ConfigError(f"--port {port} is not a TCP port (1 to 65535).")
    if days < 1:
        raise ConfigError(f"--days {days} must be at least 1.")
    root.mkdir(parents=True, exist_ok=True)
    (root / "ca").mkdir(exist_ok=True)
    ca = create_ca(root / "ca", common_name="fedrad consortium CA")
    consortium.coordinator.mkdir(parents=True, exist_ok=True)
    create_server_certificate(
        ca, consortium.coordinator, hostnames=names, ip_addresses=ips, valid_days=days
    )
    write_key_pair(consortium.audit_key, consortium.audit_public)  # Ed25519; never overwritten
    for folder in (consortium.state, consortium.logs, consortium.studies, consortium.flwr_home):
        folder.mkdir(parents=True, exist_ok=True)
    first = next(h.strip() for h in hosts if h.strip())  # as given: the address sites dial
    write_atomic(
        consortium.flwr_home / "config.toml",
        (
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{first}:{port}"\n'
            f'root-certificates = "{consortium.ca_cert.resolve()}"\n'
        ).encode(),
        mode=0o644,
    )
    manifest: dict[str, Any] = {
        "format": _MANIFEST_FORMAT,
        "created": _today(),
        "hosts": names,
        "ips": ips,
        "port": port,
        "address": f"{first}:{port}",
        "sites": {},
    }
    for index, name in enumerate(site_names):
        _write_site(consortium, manifest, name, index)
    _sign_and_distribute(consortium, site_names)
    _write_json(consortium.manifest, manifest)  # last: its presence means provisioning finished
    return True


def add_site(root: Path, name: str) -> SiteFolder:
    """Add site ``name`` to the consortium at ``root``; every site folder gets the new roster."""
    consortium = Consortium(root)
    manifest = consortium.read_manifest()
    name = _check_site_name(name)
    if name in manifest["sites"]:
        raise ConfigError(
            f"{name} is already a site of {root}; renew its key with `fedrad provision "
            f"rotate-site {root} {name}`."
        )
    _ca(consortium)
    _write_site(consortium, manifest, name, len(manifest["sites"]))
    _sign_and_distribute(consortium, list(manifest["sites"]))
    _write_json(consortium.manifest, manifest)
    return consortium.site(name)


@dataclass
class Rotation:
    """What ``rotate-site`` did: the new fingerprint, the folders to re-send, live changes."""

    site: str
    fingerprint: str
    old_key: Path
    resend: list[Path]
    live: list[str] = field(default_factory=list)


def rotate_site(root: Path, name: str) -> Rotation:
    """Give site ``name`` a new key pair, re-sign the roster, update a running coordinator.

    The old public key is kept as ``node-keys/NAME.pub.old-<date>``. When the coordinator runs
    (``pids.json``), the new key is registered and the site's old node unregistered at once.
    """
    consortium = Consortium(root)
    manifest = consortium.read_manifest()
    if name not in manifest["sites"]:
        raise ConfigError(
            f"{name} is not a site of {root} (sites: {', '.join(manifest['sites'])}); add it "
            f"with `fedrad provision add-site {root} {name}`."
        )
    _ca(consortium)
    current = consortium.node_keys / f"{name}.pub"
    old = consortium.node_keys / f"{name}.pub.old-{_today()}"
    counter = 1
    while old.exists():
        counter += 1
        old = consortium.node_keys / f"{name}.pub.old-{_today()}.{counter}"
    shutil.copy2(current, old)
    new = _new_site_keys(consortium, name)
    entry = manifest["sites"][name]
    entry["fingerprint"] = new
    entry.setdefault("rotated", []).append(_today())
    resend = _sign_and_distribute(consortium, list(manifest["sites"]))
    _write_json(consortium.manifest, manifest)
    rotation = Rotation(site=name, fingerprint=new, old_key=old, resend=resend)
    from fedrad.commands.nodes import coordinator_running, replace_registered_key

    if coordinator_running(consortium):
        rotation.live = replace_registered_key(consortium, name, current)
    return rotation


def show(root: Path, *, now: dt.datetime | None = None) -> str:
    """A table of the consortium's sites and certificate expiry dates, with warnings."""
    consortium = Consortium(root)
    manifest = consortium.read_manifest()
    now = now or dt.datetime.now(dt.timezone.utc)
    lines = [
        f"consortium {root}: coordinator {', '.join([*manifest['hosts'], *manifest['ips']])} "
        f"port {manifest['port']}",
        "",
        f"{'site':<24} {'fingerprint':<41} {'created':<10}  rotated",
    ]
    for name, entry in manifest["sites"].items():
        rotated = ", ".join(entry.get("rotated", [])) or "-"
        lines.append(f"{name:<24} {entry['fingerprint']:<41} {entry['created']:<10}  {rotated}")
    lines.append("")
    for label, cert in (("CA", consortium.ca_cert), ("coordinator", consortium.server_cert)):
        if not cert.is_file():
            lines.append(f"WARNING: {label} certificate {cert} is missing.")
            continue
        expiry = certificate_expiry(cert)
        left = (expiry - now).days
        lines.append(f"{label} certificate expires {expiry:%Y-%m-%d} ({left} days)")
        if left < EXPIRY_WARNING_DAYS:
            lines.append(
                f"WARNING: the {label} certificate {cert} "
                + ("has expired" if left < 0 else f"expires in {left} days")
                + "; renew it before sites lose their connection."
            )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- command line


class _Commands(dict[str, Any]):
    """Subcommand parsers where any word that names none (a folder) stands for ``create``."""

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        # lenient once ``create`` exists (it is added last, so adding parsers still checks names)
        return super().__contains__(key) or (
            super().__contains__("create") and not key.startswith("-")
        )

    def __missing__(self, key: str) -> Any:
        return self["create"]


class _DefaultCreate(argparse._SubParsersAction):  # type: ignore[type-arg]
    """``fedrad provision DIR ...`` means ``fedrad provision create DIR ...``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._name_parser_map = _Commands()
        self.choices = self._name_parser_map

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        if values and not dict.__contains__(self._name_parser_map, values[0]):
            values = ["create", *values]
        super().__call__(parser, namespace, values, option_string)


def _cmd_create(args: argparse.Namespace) -> int:
    root = Path(args.consortium_dir).expanduser().resolve()
    made = provision(
        root,
        hosts=args.coordinator.split(","),
        sites=args.sites.split(","),
        port=args.port,
        days=args.days,
        if_missing=args.if_missing,
    )
    if not made:
        print(f"{root} is already provisioned; --if-missing: nothing to do.")
        return 0
    print(f"provisioned {root}")
    print(f"hand each hospital its folder only: {Consortium(root).sites}/NAME/")
    print(f"keep {Consortium(root).ca_key} offline; see `fedrad provision show {root}`")
    return 0


def _cmd_add_site(args: argparse.Namespace) -> int:
    root = Path(args.consortium_dir).expanduser().resolve()
    site = add_site(root, args.name)
    print(f"added {args.name}: hand {site.root} to that hospital.")
    print(
        "every other site folder got the new roster: re-send roster.json and roster.json.sig "
        "to each hospital; `fedrad coordinator start` registers the new key at its next start "
        "(or register it now with FLWR_HOME="
        f"{Consortium(root).flwr_home} flwr supernode register {site.public} {CONNECTION})."
    )
    return 0


def _cmd_rotate_site(args: argparse.Namespace) -> int:
    root = Path(args.consortium_dir).expanduser().resolve()
    rotation = rotate_site(root, args.name)
    print(f"rotated {rotation.site}: new key {rotation.fingerprint}; old key in {rotation.old_key}")
    for line in rotation.live:
        print(line)
    print("re-send these folders to their hospitals (the roster changed in each):")
    for folder in rotation.resend:
        note = " (new site.key: send securely)" if folder.name == rotation.site else ""
        print(f"  {folder}{note}")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    print(show(Path(args.consortium_dir).expanduser().resolve()))
    return 0


def add_parser(subparsers: Any) -> None:
    """Add ``provision`` (create, add-site, rotate-site, show) to the ``fedrad`` subparsers."""
    parser = subparsers.add_parser(
        "provision",
        help="create a consortium's CA, certificates, keys and site folders; add or rotate sites",
        description=__doc__.split("\n\n")[1].replace("``", "`").replace(":mod:", ""),
    )
    commands = parser.add_subparsers(
        dest="provision_command",
        required=True,
        metavar="COMMAND",
        action=_DefaultCreate,
    )
    add = commands.add_parser(
        "add-site",
        help="add a site: its key pair and folder; re-sign the roster",
        description="Add site NAME to CONSORTIUM_DIR (needs ca/ca.key).",
    )
    add.add_argument("consortium_dir", metavar="CONSORTIUM_DIR", help="a provisioned consortium")
    add.add_argument("name", metavar="NAME", help="the new site's name")
    add.set_defaults(handler=_cmd_add_site)
    rotate = commands.add_parser(
        "rotate-site",
        help="give a site a new key pair; re-sign the roster; update a running coordinator",
        description="Renew site NAME's key pair; the old public key is kept as "
        "node-keys/NAME.pub.old-DATE. Prints the site folders to re-send.",
    )
    rotate.add_argument("consortium_dir", metavar="CONSORTIUM_DIR", help="a provisioned consortium")
    rotate.add_argument("name", metavar="NAME", help="the site whose key to renew")
    rotate.set_defaults(handler=_cmd_rotate_site)
    show_parser = commands.add_parser(
        "show",
        help="list sites, key fingerprints and certificate expiry",
        description="Show CONSORTIUM_DIR's sites and when its certificates expire.",
    )
    show_parser.add_argument(
        "consortium_dir", metavar="CONSORTIUM_DIR", help="a provisioned consortium"
    )
    show_parser.set_defaults(handler=_cmd_show)
    create = commands.add_parser(
        "create",
        help="(the default: `fedrad provision DIR ...`) create a consortium folder",
        description="Create CONSORTIUM_DIR: CA, coordinator certificate, keys, site folders.",
    )
    create.add_argument("consortium_dir", metavar="CONSORTIUM_DIR", help="folder to create")
    create.add_argument(
        "--coordinator",
        required=True,
        metavar="HOST[,HOST...]",
        help="the coordinator's host names and IP addresses sites dial (certificate SANs); "
        "the first is the address written into every site.toml",
    )
    create.add_argument("--sites", required=True, metavar="NAME[,NAME...]", help="the sites' names")
    create.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"the SuperLink port (default {DEFAULT_PORT})",
    )
    create.add_argument(
        "--days",
        type=int,
        default=365,
        help="validity of the coordinator certificate (default 365)",
    )
    create.add_argument(
        "--if-missing",
        action="store_true",
        help="do nothing, successfully, if CONSORTIUM_DIR is already provisioned",
    )
    create.set_defaults(handler=_cmd_create)
