"""``fedrad simulate``: the federation on Flower's simulation engine, in this process.

The ServerApp and ClientApp are the very objects ``flwr run .`` loads (``server.app:app`` and
``client.app:app``). Both sides see the same fused run config: the defaults of
``[tool.flwr.app.config]`` with the command-line overrides on top, exactly as ``flwr run -c``
fuses them.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedrad.core.config import ConfigValue, RunConfig

log = logging.getLogger(__name__)


def fused_run_config(overrides: Mapping[str, ConfigValue]) -> RunConfig:
    """The run config ``flwr run . -c ...`` would give: RunConfig defaults plus overrides.

    RunConfig's defaults equal pyproject's ``[tool.flwr.app.config]`` (a test keeps them
    equal), so this works the same from an installed package and from the source tree.
    """
    merged = RunConfig().to_user_config()
    merged.update(overrides)
    return RunConfig.from_user_config(merged)


def _write_app_config(folder: Path, config: RunConfig) -> None:
    """Write a minimal app folder whose pyproject holds the run config (for the client side)."""
    lines = [
        "[project]",
        'name = "fedrad"',
        'version = "0.0.0"',
        "[tool.flwr.app]",
        'publisher = "fedrad"',
        "[tool.flwr.app.components]",
        'serverapp = "server.app:app"',
        'clientapp = "client.app:app"',
        "[tool.flwr.app.config]",
    ]
    for key, value in config.to_user_config().items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        else:
            text = repr(value)
        lines.append(f'"{key}" = {text}')
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n")


def run_simulation(config: RunConfig, *, num_sites: int, client_cpus: float = 1.0) -> None:
    """Run the federation with ``num_sites`` simulated sites (one per site folder).

    Sites folders that lack identity keys (not written by a recent ``fedrad synth``, or
    imported) get them first: a simulated site signs its secure-aggregation keys with them.
    """
    _ensure_identities(Path(config.sites_dir))
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from client.app import app as client_app
    from server.app import app as server_app

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    backend_config: dict[str, Any] = {
        "client_resources": {"num_cpus": client_cpus, "num_gpus": 0.0},
        "init_args": {"num_cpus": os.cpu_count() or 1, "include_dashboard": False},
    }
    context = Context(
        run_id=0,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=dict(config.to_user_config()),
    )
    with tempfile.TemporaryDirectory(prefix="fedrad-app-") as app_dir:
        _write_app_config(Path(app_dir), config)
        # Flower's public run_simulation() cannot pass a run config; this is the same call
        # with the app folder (for the sites' run config) and the ServerApp context filled in.
        _run_simulation(
            num_supernodes=num_sites,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            backend_name="ray",
            backend_config=backend_config,
            server_app_context=context,
            app_dir=app_dir,
            is_app=True,
        )


def _ensure_identities(sites_dir: Path) -> None:
    """Write the simulated sites' identity keys and roster unless every site has them."""
    from fedrad.core.sites import list_site_dirs
    from fedrad.synth.identity import IDENTITY_FOLDER, has_identities, write_identities

    if not sites_dir.is_dir():
        return
    names = [site.name for site in list_site_dirs(sites_dir)]
    if names and not has_identities(sites_dir, names):
        write_identities(sites_dir, names)
        log.info(
            "wrote identity keys and the roster of %d site(s) to %s",
            len(names),
            sites_dir / IDENTITY_FOLDER,
        )
