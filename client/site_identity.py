"""Which identity key and roster a site uses for secure aggregation, from its node config.

A deployed site names them in its node config: ``identity-key`` (its node key from
provisioning, an ECDSA P-384 private key, mode 0600), ``roster`` (the consortium's roster) and
``ca-cert`` (the consortium CA's certificate, which must have signed the roster: its detached
signature ``<roster>.sig`` lies beside it). A deployed site without ``ca-cert`` refuses:
an unsigned roster is for simulation only.

A simulated site (``partition-id`` set, no ``data-dir``) that names none of them uses what
``fedrad synth`` wrote beside the site folders: ``<sites-dir>/.fedrad-identity/<site>.key``
and ``<sites-dir>/.fedrad-identity/roster.json`` (see :data:`IDENTITY_FOLDER`), where
``<site>`` is the folder name of its partition.

Without an identity the site refuses secure aggregation, with a message naming how to create
one: signing is what keeps the coordinator from substituting round keys.

Framework-free: the Flower adapter (``client/secagg.py``) calls :func:`load_site_identity`.
"""

from __future__ import annotations

from pathlib import Path

from fedrad.core.config import NodeConfig
from fedrad.core.sites import list_site_dirs
from fedrad.synth.identity import IDENTITY_FOLDER, ROSTER_FILE
from privacy.secagg import IdentityError, Roster, SiteIdentity, load_identity_key, load_roster

__all__ = ["IDENTITY_FOLDER", "ROSTER_FILE", "load_site_identity", "simulation_identity_paths"]


def simulation_identity_paths(sites_dir: Path, site_name: str) -> tuple[Path, Path]:
    """Return the identity key and roster paths of simulated site ``site_name``."""
    folder = sites_dir / IDENTITY_FOLDER
    return folder / f"{site_name}.key", folder / ROSTER_FILE


def load_site_identity(node: NodeConfig, *, sites_dir: str) -> tuple[SiteIdentity, Roster]:
    """Load this site's identity (its name found in the roster by its key) and its roster.

    Parameters
    ----------
    node
        The site's node config.
    sites_dir
        The ``sites-dir`` of the node's run config (simulation only).

    Raises
    ------
    IdentityError
        If the files are not configured or not found (the message says how to create them),
        are unusable, the roster's CA signature is invalid, or the roster does not list the key.
    """
    if bool(node.identity_key) != bool(node.roster):
        raise IdentityError(
            "Give both identity-key and roster in the node config (or neither, in a simulation "
            "whose sites folder 'fedrad synth' wrote)."
        )
    if node.identity_key:
        key_path = Path(node.identity_key).expanduser()
        roster_path = Path(node.roster).expanduser()
        deployed = bool(node.data_dir)
        if deployed and not node.ca_cert:
            raise IdentityError(
                "This deployed site has no ca-cert: name the consortium CA's certificate "
                "(ca-cert='/path/ca.pem') so that it can check the roster's signature."
            )
    else:
        key_path, roster_path = _simulated_paths(node, sites_dir)
    ca_cert = Path(node.ca_cert).expanduser() if node.ca_cert else None
    roster = load_roster(roster_path, ca_cert=ca_cert)
    return SiteIdentity.from_key(load_identity_key(key_path), roster), roster


def _simulated_paths(node: NodeConfig, sites_dir: str) -> tuple[Path, Path]:
    if node.data_dir or node.partition_id < 0 or not sites_dir:
        raise IdentityError(
            "This site has no identity for secure aggregation: set identity-key (the node "
            "key from provisioning, e.g. made by privacy.certs.create_node_key_pair), roster "
            "and ca-cert in its node config (deployment), or run 'fedrad synth' to write "
            "simulation identities beside the site folders."
        )
    root = Path(sites_dir).expanduser()
    sites = list_site_dirs(root)
    if node.partition_id >= len(sites):
        raise IdentityError(f"Partition {node.partition_id} has no site folder in {root}.")
    key_path, roster_path = simulation_identity_paths(root, sites[node.partition_id].name)
    if not key_path.is_file() or not roster_path.is_file():
        raise IdentityError(
            f"The simulated site {sites[node.partition_id].name} has no identity key or roster "
            f"in {root / IDENTITY_FOLDER}: rerun 'fedrad synth' (or 'fedrad simulate', which "
            "writes them when missing)."
        )
    return key_path, roster_path
