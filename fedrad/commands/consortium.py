"""Where a provisioned consortium keeps its files: one contract for every operator command.

``fedrad provision`` writes this layout; ``fedrad coordinator start``, ``fedrad study ...`` and
``fedrad status`` read the coordinator's part of it; each hospital receives its own
``sites/NAME/`` folder and runs ``fedrad site start`` on it::

    CONSORTIUM_DIR/
      consortium.json            what was provisioned: coordinator hosts/IPs/port, sites, dates
      ca/ca.pem  ca/ca.key       the consortium CA (ca.key 0600; keep it offline after provisioning)
      coordinator/
        superlink.pem  superlink.key     TLS certificate (SANs: the coordinator's hosts/IPs)
        audit.key  audit.pub             the coordinator's audit-signing key pair (Ed25519 PEM)
        node-keys/NAME.pub               the registered site keys (OpenSSH, Flower's format)
        roster.json  roster.json.sig     the CA-signed roster of sites
        flwr-home/config.toml            the operator's Flower connection (CONNECTION below)
        state/superlink.db               the SuperLink's state database
        state/nodes.json                 node id -> site name, written when keys are registered
        studies/STUDY/                   one run directory per study (checkpoints, metrics)
        logs/                            superlink.log, study logs
        pids.json                        processes ``coordinator start`` started
      sites/NAME/                        handed to that hospital, nothing else leaves the CA host
        site.key (0600)  site.pub        its node authentication and secure-aggregation identity
        ca.pem  roster.json  roster.json.sig
        site.toml                        its site config, to fill in (data-dir first)

A site folder's ``site.toml`` holds two tables: ``[site]`` (how the SuperNode connects) and
``[node-config]`` (the keys of :class:`fedrad.core.config.NodeConfig`, which the site owns).
Relative paths in it are relative to the site folder.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedrad.core.config import NodeConfig
from fedrad.core.errors import ConfigError

__all__ = [
    "CONNECTION",
    "DEFAULT_PORT",
    "Consortium",
    "SiteFolder",
    "SiteSettings",
    "read_site_settings",
]

CONNECTION = "fedrad"
"""The name of the connection in ``coordinator/flwr-home/config.toml``."""
DEFAULT_PORT = 9092
"""The SuperLink's port (Fleet, Control and Runtime APIs share it in Flower 1.42)."""

FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
}
"""Environment of every Flower process fedrad starts: no usage events sent out of the network,
no dependency installation at run time, and a SuperExec that looks for the next message's task
every 0.2 s instead of every 1 s (a local call; each exchange waited up to 1 s for it)."""


@dataclass(frozen=True)
class Consortium:
    """The paths of a consortium folder (see the module docstring)."""

    root: Path

    @property
    def manifest(self) -> Path:
        """``manifest`` (see the layout above)."""
        return self.root / "consortium.json"

    @property
    def ca_cert(self) -> Path:
        """``ca_cert`` (see the layout above)."""
        return self.root / "ca" / "ca.pem"

    @property
    def ca_key(self) -> Path:
        """``ca_key`` (see the layout above)."""
        return self.root / "ca" / "ca.key"

    @property
    def coordinator(self) -> Path:
        """``coordinator`` (see the layout above)."""
        return self.root / "coordinator"

    @property
    def server_cert(self) -> Path:
        """``server_cert`` (see the layout above)."""
        return self.coordinator / "superlink.pem"

    @property
    def server_key(self) -> Path:
        """``server_key`` (see the layout above)."""
        return self.coordinator / "superlink.key"

    @property
    def audit_key(self) -> Path:
        """``audit_key`` (see the layout above)."""
        return self.coordinator / "audit.key"

    @property
    def audit_public(self) -> Path:
        """``audit_public`` (see the layout above)."""
        return self.coordinator / "audit.pub"

    @property
    def node_keys(self) -> Path:
        """``node_keys`` (see the layout above)."""
        return self.coordinator / "node-keys"

    @property
    def roster(self) -> Path:
        """``roster`` (see the layout above)."""
        return self.coordinator / "roster.json"

    @property
    def flwr_home(self) -> Path:
        """``flwr_home`` (see the layout above)."""
        return self.coordinator / "flwr-home"

    @property
    def state(self) -> Path:
        """``state`` (see the layout above)."""
        return self.coordinator / "state"

    @property
    def database(self) -> Path:
        """``database`` (see the layout above)."""
        return self.state / "superlink.db"

    @property
    def node_names(self) -> Path:
        """``node_names`` (see the layout above)."""
        return self.state / "nodes.json"

    @property
    def studies(self) -> Path:
        """``studies`` (see the layout above)."""
        return self.coordinator / "studies"

    @property
    def logs(self) -> Path:
        """``logs`` (see the layout above)."""
        return self.coordinator / "logs"

    @property
    def pids(self) -> Path:
        """``pids`` (see the layout above)."""
        return self.coordinator / "pids.json"

    @property
    def sites(self) -> Path:
        """``sites`` (see the layout above)."""
        return self.root / "sites"

    def site(self, name: str) -> SiteFolder:
        """The folder handed to site ``name``."""
        return SiteFolder(self.sites / name)

    def read_manifest(self) -> dict[str, Any]:
        """``consortium.json``, or a ConfigError that says how to make one."""
        try:
            data = json.loads(self.manifest.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"{self.root} is not a provisioned consortium (no consortium.json); create one "
                f"with `fedrad provision {self.root} --coordinator HOST --sites NAME,NAME`."
            ) from None
        except ValueError as exc:
            raise ConfigError(f"{self.manifest} is not valid JSON ({exc}); restore it.") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{self.manifest} must hold a JSON object; restore it.")
        return data


@dataclass(frozen=True)
class SiteFolder:
    """The paths of one site's folder (``sites/NAME/``)."""

    root: Path

    @property
    def key(self) -> Path:
        """``key`` (see the layout above)."""
        return self.root / "site.key"

    @property
    def public(self) -> Path:
        """``public`` (see the layout above)."""
        return self.root / "site.pub"

    @property
    def ca_cert(self) -> Path:
        """``ca_cert`` (see the layout above)."""
        return self.root / "ca.pem"

    @property
    def roster(self) -> Path:
        """``roster`` (see the layout above)."""
        return self.root / "roster.json"

    @property
    def config(self) -> Path:
        """``config`` (see the layout above)."""
        return self.root / "site.toml"


@dataclass(frozen=True)
class SiteSettings:
    """A parsed ``site.toml``: how the SuperNode connects, and the site's node config."""

    name: str
    superlink: str
    root_certificates: Path
    auth_key: Path
    clientappio_port: int
    node_config: NodeConfig
    raw_node_config: dict[str, Any]


def _resolve(folder: Path, value: object) -> Path:
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else (folder / path).resolve()


_PATH_KEYS = (
    "data-dir",
    "ledger-dir",
    "cache-dir",
    "identity-key",
    "roster",
    "ca-cert",
    "log-file",
)


def read_site_settings(folder: Path, *, data_dir: Path | None = None) -> SiteSettings:
    """Read and check ``folder/site.toml``; relative paths are taken from ``folder``.

    ``data_dir``, when given, replaces ``[node-config] data-dir`` (``fedrad site start
    --data-dir``).
    """
    site = SiteFolder(folder)
    try:
        data = tomllib.loads(site.config.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{site.config} does not exist: a site folder comes from `fedrad provision` on the "
            "coordinator's CA host; ask the consortium operator for yours."
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{site.config} is not valid TOML: {exc}.") from None
    head = data.get("site", {})
    raw = dict(data.get("node-config", {}))
    if data_dir is not None:
        raw["data-dir"] = str(data_dir)
    if not isinstance(head, dict) or not head.get("superlink"):
        raise ConfigError(
            f"{site.config}: [site] must name 'superlink' (the coordinator's HOST:PORT)."
        )
    for key in _PATH_KEYS:
        if raw.get(key):
            raw[key] = str(_resolve(folder, raw[key]))
    if not raw.get("data-dir"):
        raise ConfigError(
            f"{site.config}: fill in [node-config] data-dir, the folder of this hospital's DICOM "
            "export with its labels.csv; then check it with `fedrad site check DATA_DIR`."
        )
    raw.setdefault("site-id", str(head.get("name") or folder.name))
    node_config = NodeConfig.from_user_config(raw)
    return SiteSettings(
        name=str(head.get("name") or folder.name),
        superlink=str(head["superlink"]),
        root_certificates=_resolve(folder, head.get("root-certificates", "ca.pem")),
        auth_key=_resolve(folder, head.get("auth-key", "site.key")),
        clientappio_port=int(head.get("clientappio-port", 9094)),
        node_config=node_config,
        raw_node_config=raw,
    )
