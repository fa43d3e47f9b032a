"""A site's view of one request: its folder, its dataset (cached per process), its settings.

Framework-free: the Flower adapter in ``client/app.py`` turns records into these calls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from client.cache import default_cache_root
from client.dataset import IngestSettings, SiteDataset, load_site
from client.transforms import TransformConfig
from fedrad.core.config import NodeConfig, RunConfig
from fedrad.core.errors import DataError
from fedrad.core.sites import list_site_dirs
from privacy import SiteLimits

log = logging.getLogger(__name__)

_CACHE: dict[tuple[object, ...], SiteDataset] = {}


@dataclass(frozen=True)
class Site:
    """Which hospital this node is and where its data lives."""

    site_id: str
    data_dir: Path
    num_threads: int
    min_cell_count: int
    cache_root: Path
    ingest_workers: int
    ledger_root: Path
    limits: SiteLimits
    secagg_min_threshold: int = 2
    eval_budget_fraction: float = 0.1


def default_ledger_root() -> Path:
    """Where a deployed site keeps its privacy ledgers when its node config names none."""
    return Path.home() / ".local" / "share" / "fedrad" / "ledger"


def _site(node: NodeConfig, data_dir: Path, cache: Path, ledger: Path) -> Site:
    return Site(
        site_id=node.site_id or data_dir.name,
        data_dir=data_dir,
        num_threads=node.num_threads,
        min_cell_count=node.min_cell_count,
        cache_root=cache,
        ingest_workers=node.ingest_workers,
        ledger_root=ledger,
        limits=SiteLimits.from_node_config(node),
        secagg_min_threshold=node.secagg_min_threshold,
        eval_budget_fraction=node.eval_budget_fraction,
    )


def resolve_site(node: NodeConfig, *, sites_dir: str) -> Site:
    """Find this node's data folder: ``data-dir`` in deployment, the partition in simulation.

    ``sites_dir`` is the ``sites-dir`` of the node's own run config (simulation only).
    """
    if node.data_dir:
        data_dir = Path(node.data_dir).expanduser()
        cache = Path(node.cache_dir).expanduser() if node.cache_dir else default_cache_root()
        ledger = Path(node.ledger_dir).expanduser() if node.ledger_dir else default_ledger_root()
        return _site(node, data_dir, cache, ledger)
    if node.partition_id >= 0:
        if not sites_dir:
            raise DataError(
                "The run config names no sites-dir, so this simulated site has no data. Write a "
                "consortium first ('fedrad synth runs/demo/sites --sites 4') and name it: "
                "flwr run . -c \"sites-dir='runs/demo/sites'\" (or use 'fedrad demo')."
            )
        root = Path(sites_dir).expanduser()
        sites = list_site_dirs(root)
        if node.partition_id >= len(sites):
            raise DataError(
                f"Partition {node.partition_id} has no site folder: {root} holds "
                f"{len(sites)} site(s). Run the simulation with as many supernodes as sites."
            )
        data_dir = sites[node.partition_id]
        cache = Path(node.cache_dir).expanduser() if node.cache_dir else simulation_cache_root(root)
        ledger = (
            Path(node.ledger_dir).expanduser() if node.ledger_dir else simulation_ledger_root(root)
        )
        return _site(node, data_dir, cache, ledger)
    raise DataError(
        "This node has no data folder: start it with --node-config \"data-dir='/path/to/site'\"."
    )


def simulation_cache_root(sites_dir: Path) -> Path:
    """In simulation the sites' caches sit beside the (synthetic) site folders."""
    return sites_dir / ".fedrad-cache"


def simulation_ledger_root(sites_dir: Path) -> Path:
    """In simulation the sites' ledgers (and sent logs) sit beside the site folders."""
    return sites_dir / ".fedrad-ledger"


def transform_config(config: RunConfig) -> TransformConfig:
    """The preprocessing settings a run asks for."""
    return TransformConfig(
        kind=config.kind,
        image_size=config.image_size,
        slices=config.slices,
        in_channels=config.in_channels,
    )


def site_dataset(site: Site, config: RunConfig) -> SiteDataset:
    """Load (or reuse, within this process) the site's preprocessed dataset."""
    transforms = transform_config(config)
    labels = site.data_dir / "labels.csv"
    stamp = labels.stat().st_mtime_ns if labels.is_file() else None
    key = (str(site.data_dir.resolve()), stamp, transforms, config.num_classes)
    if key not in _CACHE:
        settings = IngestSettings(workers=site.ingest_workers, cache_root=site.cache_root)
        dataset = load_site(
            site.data_dir, transforms, num_classes=config.num_classes, settings=settings
        )
        log.info(
            "site %s: %d samples loaded, %d skipped",
            site.site_id,
            len(dataset),
            len(dataset.skipped),
        )
        _CACHE[key] = dataset
    return _CACHE[key]
