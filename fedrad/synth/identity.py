"""Identity keys and the roster of a simulated consortium, for authenticated secure aggregation.

In a deployment each site's identity key is its node key from provisioning and the roster is
signed by the consortium's CA. A simulation has neither, so ``write_consortium`` writes them
beside the site folders, in :data:`IDENTITY_FOLDER`:

- ``<site>.key``: the site's ECDSA P-384 private key in OpenSSH format, mode 0600 (the key
  type of Flower's node authentication); ``<site>.pub``: its public half;
- ``roster.json``: every site's name and public key, in the format
  ``privacy.secagg.identity.Roster`` reads (``fedrad-roster/1``), unsigned.

The keys are fresh randomness on every write, never derived from the synth seed: a key that
anyone could recompute from a public seed would authenticate nobody.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedrad.core.durable import write_atomic

__all__ = ["IDENTITY_FOLDER", "ROSTER_FILE", "ROSTER_FORMAT", "has_identities", "write_identities"]

IDENTITY_FOLDER = ".fedrad-identity"
ROSTER_FILE = "roster.json"
ROSTER_FORMAT = "fedrad-roster/1"  # privacy.secagg.identity.ROSTER_FORMAT; a test keeps them equal


def write_identities(sites_dir: Path, names: Sequence[str]) -> Path:
    """Write a fresh identity key per site and the roster of them all; return the folder.

    The folder is replaced as a whole: keys of sites not in ``names`` are removed, so the
    roster and the keys always belong together.
    """
    folder = sites_dir / IDENTITY_FOLDER
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in folder.iterdir():
        if stale.is_file() and stale.suffix in (".key", ".pub"):
            stale.unlink()
    sites = []
    for name in names:
        key = ec.generate_private_key(ec.SECP384R1())
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        private = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        write_atomic(folder / f"{name}.key", private, mode=0o600)
        write_atomic(folder / f"{name}.pub", public + f" {name}\n".encode(), mode=0o644)
        sites.append({"name": name, "public-key": public.decode("ascii")})
    roster = {"format": ROSTER_FORMAT, "sites": sorted(sites, key=lambda s: s["name"])}
    write_atomic(folder / ROSTER_FILE, (json.dumps(roster, indent=1) + "\n").encode(), mode=0o644)
    return folder


def has_identities(sites_dir: Path, names: Sequence[str]) -> bool:
    """Return whether ``sites_dir`` holds the roster and an identity key for every site."""
    folder = sites_dir / IDENTITY_FOLDER
    return (folder / ROSTER_FILE).is_file() and all(
        (folder / f"{name}.key").is_file() for name in names
    )
