"""The ``fedrad`` command: synth, simulate, evaluate, demo.

Every ``simulate`` option maps one to one onto a run-config key (``--learning-rate`` is
``learning-rate``); the parsing happens once, here, into a RunConfig.
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

# Flower reads this when it is first imported: no usage events leave a hospital's network
# unless a user opts in by setting FLWR_TELEMETRY_ENABLED=1 explicitly.
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from rich.console import Console  # noqa: E402
from rich.logging import RichHandler
from rich.table import Table

from fedrad import __version__
from fedrad.core.config import (
    DP_MODES,
    KINDS,
    OPTIMIZER_NAMES,
    RUN_CONFIG_HELP,
    STRATEGY_NAMES,
    ConfigValue,
    RunConfig,
    field_to_key,
)
from fedrad.core.errors import FedradError

console = Console(stderr=True)
out = Console()


def _setup_logging(verbose: bool) -> None:
    import flwr.common.logger  # noqa: F401 - configures Flower's logger; adjust it afterwards

    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    handler.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", handlers=[handler], force=True)
    for package in OWN_PACKAGES:
        logging.getLogger(package).setLevel(logging.DEBUG if verbose else logging.INFO)
    flower = logging.getLogger("flwr")
    flower.propagate = False  # Flower prints through its own handler
    for flower_handler in flower.handlers:
        flower_handler.setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("ray").setLevel(logging.INFO if verbose else logging.WARNING)


OWN_PACKAGES = ("fedrad", "client", "server", "models", "privacy")
_TYPES = {"int": str, "float": str, "str": str, "bool": str}  # RunConfig converts and explains
CHOICES: dict[str, tuple[str, ...]] = {
    "kind": KINDS,
    "strategy": STRATEGY_NAMES,
    "optimizer": OPTIMIZER_NAMES,
    "dp": DP_MODES,
    "dp-accountant": ("rdp", "prv"),
    "secure-aggregation": ("true", "false"),
}
"""Run-config keys with a closed set of values: the usage line lists them (RunConfig checks
them, with a did-you-mean hint)."""


class Parser(argparse.ArgumentParser):
    """An argument parser that suggests the option a mistyped one was meant to be."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.subcommands: dict[str, Parser] = {}
        super().__init__(*args, **kwargs)

    def add_subparsers(self, **kwargs: Any) -> Any:
        """Add subcommands; their parsers are Parsers too, found again by name."""
        action = super().add_subparsers(**kwargs)
        self.subcommands = action.choices
        return action

    def suggest(self, unknown: Sequence[str]) -> str:
        """Did-you-mean hints for unrecognized options, from the options this parser lists."""
        known = sorted(set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", self.format_help())))
        hints = []
        for word in unknown:
            if word.startswith("--"):
                close = difflib.get_close_matches(word.split("=")[0], known, n=1, cutoff=0.6)
                if close:
                    hints.append(f"{word}: did you mean {close[0]}?")
        return " ".join(hints)


def _add_run_config_options(parser: argparse.ArgumentParser, *, skip: Sequence[str]) -> None:
    group = parser.add_argument_group("run config (each option is the run-config key of that name)")
    defaults = RunConfig().to_user_config()
    for f in fields(RunConfig):
        key = field_to_key(f.name)
        if key in skip:
            continue
        names = [f"--{key}"] + (["--out"] if key == "out-dir" else [])
        choices = CHOICES.get(key)
        group.add_argument(
            *names,
            dest=f.name,
            type=_TYPES[str(f.type)],
            default=None,
            metavar="{" + ",".join(choices) + "}" if choices else key.upper().replace("-", "_"),
            help=f"{RUN_CONFIG_HELP[key]} (default: {defaults[key]!r})",
        )


def _overrides(args: argparse.Namespace) -> dict[str, ConfigValue]:
    return {
        field_to_key(f.name): getattr(args, f.name)
        for f in fields(RunConfig)
        if getattr(args, f.name, None) is not None
    }


add_run_config_options = _add_run_config_options
"""The run-config options of a subcommand (public name for fedrad.commands modules)."""
run_config_overrides = _overrides
"""The run-config keys given on a command line (public name for fedrad.commands modules)."""


def _cmd_synth(args: argparse.Namespace) -> int:
    from fedrad.synth import SynthConfig, write_consortium

    config = SynthConfig(
        sites=args.sites,
        seed=args.seed,
        kind=args.kind,
        holdout=args.holdout,
        image_size=args.image_size,
        slices=args.slices,
        samples_per_site=args.samples_per_site,
        subgroup_difficulty=args.subgroup_difficulty,
    )
    summary = write_consortium(Path(args.out_dir), config, overwrite=args.overwrite)
    table = Table(title=f"synthetic consortium in {args.out_dir}")
    for column in ("site", "samples", "files", "prevalence", "scanner"):
        table.add_column(column)
    for site in summary.sites:
        table.add_row(
            site.name,
            str(site.n_samples),
            str(site.n_files),
            f"{site.prevalence:.2f}",
            f"{site.manufacturer} {site.model}",
        )
    out.print(table)
    holdout = f" and a holdout of {summary.holdout_samples}" if summary.holdout_folder else ""
    out.print(f"wrote {len(summary.sites)} site folder(s){holdout} to {args.out_dir}")
    sites_dir = Path(args.out_dir).resolve()
    out.print(
        f"federate them with `fedrad simulate {sites_dir}`, or with Flower's own command from "
        "the fedrad checkout (one CPU per site, as fedrad simulate does):\n"
        f'  flwr run . --stream --federation-config "num-supernodes={len(summary.sites)} '
        f'client-resources-num-cpus=1" -c "sites-dir=\'{sites_dir}\'"\n'
        "flwr run leaves a local SuperLink running; stop it with `fedrad local-superlink stop`.",
        soft_wrap=True,
    )
    return 0


def _preflight(config: RunConfig) -> list[Path]:
    """Check every site folder before starting the engine; return the site folders."""
    from client.dataset import IngestSettings, load_site
    from client.site import simulation_cache_root, transform_config
    from fedrad.core.sites import list_site_dirs

    sites_dir = Path(config.sites_dir)
    sites = list_site_dirs(sites_dir)
    # The first pass fills the sites' caches, so simulated clients start from them.
    settings = IngestSettings(
        workers=os.cpu_count() or 1, cache_root=simulation_cache_root(sites_dir)
    )
    for site in sites:
        dataset = load_site(
            site, transform_config(config), num_classes=config.num_classes, settings=settings
        )
        train = len(dataset.subset("train"))
        val = len(dataset.subset("val"))
        if train == 0 or val == 0:
            raise FedradError(
                f"{site}: {train} training and {val} validation sample(s); each site needs "
                "both (set the 'split' column of labels.csv, or leave it empty)."
            )
        skipped = f", {len(dataset.skipped)} skipped" if dataset.skipped else ""
        logging.getLogger("fedrad").info("%s: %d train, %d val%s", site.name, train, val, skipped)
    return sites


def simulate(config: RunConfig, *, client_cpus: float) -> Path:
    """Check the sites, run the simulation, return the run directory."""
    from fedrad.commands.simulate import run_simulation
    from server.initial_model import model_spec
    from server.rundir import new_run_dir

    model_spec(config)  # an unknown model or impossible shape fails here, before any work
    sites = _preflight(config)
    if len(sites) < config.min_sites:
        raise FedradError(
            f"{config.sites_dir} holds {len(sites)} site(s) but min-sites is {config.min_sites}; "
            "add sites or lower --min-sites."
        )
    if not config.out_dir:
        target = Path(config.resume_from) if config.resume_from else new_run_dir(Path("runs"))
        config = config.replace(out_dir=str(target.resolve()))
    config = config.replace(sites_dir=str(Path(config.sites_dir).resolve()))
    run_simulation(config, num_sites=len(sites), client_cpus=client_cpus)
    return Path(config.out_dir)


def _print_run(run_dir: Path) -> dict[str, object]:
    from server.rundir import RunDir

    summary = RunDir(run_dir).read_summary()
    validation = summary.get("validation", {})
    if not summary.get("rounds-completed") or not (run_dir / "model.safetensors").is_file():
        out.print(
            f"run {summary['status']}: no model was trained (no round completed); "
            f"run directory {run_dir}"
        )
        out.print(f"why: {summary.get('reason') or 'no round was run'}")
        return summary
    out.print(
        f"run {summary['status']}: {summary['rounds-completed']} round(s); "
        f"pooled validation AUC {validation.get('auc', float('nan')):.3f}; "
        f"global model {run_dir / 'model.safetensors'}"
    )
    if summary.get("reason"):
        out.print(f"reason: {summary['reason']}")
    return summary


def _cmd_simulate(args: argparse.Namespace) -> int:
    from fedrad.commands.simulate import fused_run_config

    overrides = _overrides(args)
    overrides["sites-dir"] = args.sites_dir
    config = fused_run_config(overrides)
    run_dir = simulate(config, client_cpus=args.client_cpus)
    summary = _print_run(run_dir)
    return 0 if summary["status"] == "completed" else 1


def _print_scores(title: str, scores: dict[str, float | int]) -> None:
    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in scores.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    out.print(table)


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from fedrad.commands.evaluate import evaluate_run

    scores = evaluate_run(Path(args.run_dir), Path(args.data_dir))
    _print_scores(f"{args.run_dir} on {args.data_dir}", scores)
    if args.json:
        Path(args.json).write_text(json.dumps(scores, indent=2, sort_keys=True) + "\n")
        out.print(f"wrote {args.json}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fedrad.commands.evaluate import evaluate_run
    from fedrad.commands.simulate import fused_run_config
    from fedrad.synth import SynthConfig, write_consortium

    base = Path(args.out_dir)
    sites_dir = base / "sites"
    if not sites_dir.is_dir():
        console.print(f"[bold]1/3[/] synthesizing 4 hospitals and a holdout in {sites_dir}")
        write_consortium(sites_dir, SynthConfig(sites=4, seed=args.seed, holdout=0.2))
    else:
        console.print(f"[bold]1/3[/] reusing the synthetic hospitals in {sites_dir}")
    run_dir = base / "run"
    overrides = _overrides(args)
    overrides.update({"sites-dir": str(sites_dir), "out-dir": str(run_dir), "seed": args.seed})
    config = fused_run_config(overrides)
    console.print(f"[bold]2/3[/] federating {config.num_server_rounds} rounds of '{config.model}'")
    simulate(config, client_cpus=args.client_cpus)
    _print_run(run_dir)
    console.print("[bold]3/3[/] scoring the global model on the holdout hospital data")
    scores = evaluate_run(run_dir, sites_dir / "holdout")
    (base / "holdout-metrics.json").write_text(json.dumps(scores, indent=2, sort_keys=True) + "\n")
    _print_scores("global model on the holdout", scores)
    out.print(
        f"demo done: sites in {sites_dir}, run in {run_dir}, holdout AUC {scores['auc']:.3f} "
        f"(metrics in {base / 'holdout-metrics.json'})"
    )
    return 0


def build_parser() -> Parser:
    """The argument parser of every subcommand."""
    parser = Parser(
        prog="fedrad", description="Federated learning for medical imaging across hospitals."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show Flower and Ray logs")
    parser.add_argument("--version", action="version", version=f"fedrad {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write a synthetic consortium of DICOM site folders")
    synth.add_argument(
        "out_dir", metavar="OUT_DIR", help="folder to write site-1, site-2, ... into"
    )
    synth.add_argument("--sites", type=int, default=4, help="number of hospitals (default 4)")
    synth.add_argument("--seed", type=int, default=0, help="seed; same seed, same files")
    synth.add_argument(
        "--kind", choices=("2d", "3d"), default="2d", help="2d images or 3d CT series"
    )
    synth.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        help="fraction written to OUT_DIR/holdout for evaluation (default 0)",
    )
    synth.add_argument("--image-size", type=int, default=64, help="base in-plane size (default 64)")
    synth.add_argument("--slices", type=int, default=16, help="3d: slices per series (default 16)")
    synth.add_argument(
        "--samples-per-site", type=int, default=200, help="mean site size (default 200)"
    )
    synth.add_argument(
        "--subgroup-difficulty",
        type=float,
        default=0.5,
        help="0: no subgroup effect; higher: the finding is fainter in one subgroup",
    )
    synth.add_argument(
        "--overwrite", action="store_true", help="replace site folders already there"
    )
    synth.set_defaults(handler=_cmd_synth)

    sim = sub.add_parser(
        "simulate", help="federate over site folders on Flower's simulation engine"
    )
    sim.add_argument("sites_dir", metavar="SITES_DIR", help="folder holding one folder per site")
    sim.add_argument(
        "--client-cpus",
        type=float,
        default=1.0,
        help="CPUs per simulated site; torch threads follow (default 1)",
    )
    _add_run_config_options(sim, skip=("sites-dir",))
    sim.set_defaults(handler=_cmd_simulate)

    ev = sub.add_parser("evaluate", help="score a run's global model on a site-format folder")
    ev.add_argument(
        "run_dir", metavar="RUN_DIR", help="run directory written by simulate or flwr run"
    )
    ev.add_argument("data_dir", metavar="DATA_DIR", help="folder of DICOM files and labels.csv")
    ev.add_argument("--json", metavar="FILE", help="also write the metrics to FILE as JSON")
    ev.set_defaults(handler=_cmd_evaluate)

    from fedrad.commands.import_npz import add_parser as add_import_npz
    from fedrad.commands.site_check import add_parser as add_site_check

    add_import_npz(sub)
    add_site_check(sub)
    from fedrad.commands.local_superlink import add_parser as add_local_superlink

    add_local_superlink(sub)
    from fedrad.commands import nodes, provision

    provision.add_parser(sub)
    nodes.add_parser(sub)
    from fedrad.commands import site_log

    site_log.add_parser(sub)  # into the `site` group that site_check made
    from fedrad.commands import status as status_command
    from fedrad.commands import study as study_command

    study_command.add_parser(sub)
    status_command.add_parser(sub)
    from fedrad.commands import audit as audit_command

    audit_command.add_parser(sub)
    from fedrad.commands import report as report_command

    report_command.add_parser(sub)

    demo = sub.add_parser("demo", help="synthesize 4 hospitals, federate, score on a holdout")
    demo.add_argument("--out-dir", default="runs/demo", help="where to write (default runs/demo)")
    demo.add_argument("--seed", type=int, default=0, help="seed of data and run (default 0)")
    demo.add_argument("--client-cpus", type=float, default=1.0, help="CPUs per simulated site")
    _add_run_config_options(demo, skip=("sites-dir", "out-dir", "seed", "resume-from"))
    demo.set_defaults(handler=_cmd_demo)
    return parser


def _parse(parser: Parser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line; an unknown option gets a did-you-mean hint from its subcommand."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        target = parser
        # down to the innermost subcommand given
        dests = (
            "command",
            "site_command",
            "local_command",
            "provision_command",
            "study_command",
            "coordinator_command",
            "audit_command",
        )
        for dest in dests:
            name = getattr(args, dest, None)
            if isinstance(name, str) and name in target.subcommands:
                target = target.subcommands[name]
        hint = target.suggest(unknown)
        target.error(
            f"unrecognized arguments: {' '.join(unknown)}" + (f" ({hint})" if hint else "")
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedrad`` command."""
    args = _parse(build_parser(), argv)
    _setup_logging(args.verbose)
    try:
        return int(args.handler(args))
    except (FedradError, ValueError) as exc:
        console.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
