"""The coordinator's Flower ServerApp: parse the run config once, then run the round loop.

``flwr run .`` loads ``app`` from here (pyproject ``[tool.flwr.app.components]``), and so does
``fedrad simulate``: both run this very code.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedrad.core.config import RunConfig
from fedrad.core.sites import list_site_dirs
from server.audit import AuditError
from server.loop import Federation
from server.rundir import RunDir, new_run_dir

log = logging.getLogger(__name__)

app = ServerApp()


def resolve_run_dir(config: RunConfig) -> RunDir:
    """Where this run writes: ``out-dir``, the run being resumed, or a new folder in ./runs."""
    if config.out_dir:
        path = Path(config.out_dir).expanduser()
        path.mkdir(parents=True, exist_ok=True)
        return RunDir(path)
    if config.resume_from:
        return RunDir(Path(config.resume_from).expanduser())
    return RunDir(new_run_dir(Path.cwd() / "runs"))


def _log_where_flower_logs() -> None:
    """Under ``flwr run``, show fedrad's own progress lines (one per round) in Flower's log.

    ``flwr run --stream`` streams what Flower's console handler writes; fedrad's loggers have
    no handler there. The ``fedrad`` command sets its loggers' levels and console first and is
    left alone.
    """
    from flwr.supercore.logger import console_handler

    for package in ("server", "fedrad", "privacy"):
        logger = logging.getLogger(package)
        if logger.level != logging.NOTSET:
            continue  # the fedrad command chose its levels and handlers
        logger.setLevel(logging.INFO)
        logger.addHandler(console_handler)
        logger.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run a federation as the run config describes."""
    _log_where_flower_logs()
    config = RunConfig.from_user_config(context.run_config)
    run_dir = resolve_run_dir(config)
    log.info("run directory: %s", run_dir.path)
    if config.sites_dir:  # simulation with named site folders; in deployment sites own theirs
        sites_dir = Path(config.sites_dir).expanduser()
        log.info("%d site folder(s) in %s", len(list_site_dirs(sites_dir)), sites_dir)
    try:
        summary = Federation(grid, config, run_dir).run()
    except AuditError as exc:  # no round may count that the signed trail does not hold
        log.error("run stopped: %s", exc)
        raise
    if not summary["rounds-completed"]:
        log.error(
            "run %s: no model was trained (no round completed): %s",
            summary["status"],
            summary.get("reason") or "no round was run",
        )
        return
    log.info(
        "run %s after %d round(s); global model in %s",
        summary["status"],
        summary["rounds-completed"],
        run_dir.path / "model.safetensors",
    )
