"""Configuration contracts shared by the coordinator, the sites and the command line.

Two sources of configuration exist, each parsed once at the edge into a frozen dataclass:
the federation's run config (``[tool.flwr.app.config]`` in pyproject.toml, overridable with
``flwr run -c`` or the ``fedrad simulate`` options) and each site's node config
(``flower-supernode --node-config`` or a site TOML file). Keys are kebab-case; each maps one to
one onto a snake_case field.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from fedrad.core.errors import ConfigError
from fedrad.core.fairness import FairnessLayout, parse_attributes, parse_intersections

SCHEMA_VERSION = 1
"""Version of the run-directory layout and of the resolved-configuration record."""

KINDS = ("2d", "3d")
MODEL_NAMES = ("cnn", "cnn-lstm", "transformer")
"""The names of ``models.MODELS``: fedrad.core does not import models; a test keeps them equal."""
STRATEGY_NAMES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg", "krum")
OPTIMIZER_NAMES = ("sgd", "adam")
DP_MODES = ("off", "sample", "client")
INDIVIDUAL_UPDATE_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum")

MAX_FAIRNESS_CLASSES = 20
"""Most classes a run may break down by subgroup (each class adds a histogram per cell)."""

ConfigValue = bool | int | float | str
T = TypeVar("T")


def field_to_key(name: str) -> str:
    """Return the kebab-case configuration key of a dataclass field name."""
    return name.replace("_", "-")


def _did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def _coerce(key: str, value: Any, target: type) -> ConfigValue:
    """Convert a raw configuration value to the field's type, or raise ConfigError."""
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"'{key}' must be true or false, got {value!r}.")
    if target is int:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ConfigError(f"'{key}' must be an integer, got {value!r}.")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"'{key}' must be an integer, got {value!r}.") from None
    if target is float:
        if isinstance(value, bool):
            raise ConfigError(f"'{key}' must be a number, got {value!r}.")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"'{key}' must be a number, got {value!r}.") from None
    return str(value)


def _from_mapping(cls: type[T], raw: Mapping[str, Any], *, what: str, strict: bool) -> T:
    by_key = {field_to_key(f.name): f for f in fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in by_key:
            if strict:
                raise ConfigError(
                    f"Unknown {what} key '{key}'.{_did_you_mean(key, list(by_key))} "
                    f"Known keys: {', '.join(sorted(by_key))}."
                )
            continue
        f = by_key[key]
        kwargs[f.name] = _coerce(key, value, _FIELD_TYPES[f.type])
    return cls(**kwargs)


_FIELD_TYPES: dict[Any, type] = {"str": str, "int": int, "float": float, "bool": bool}


def _check_range(key: str, value: float, low: float | None, high: float | None) -> None:
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = (
            f"between {low} and {high}"
            if low is not None and high is not None
            else (f"at least {low}" if low is not None else f"at most {high}")
        )
        raise ConfigError(f"'{key}' must be {bounds}, got {value}.")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"'{key}' must be one of {', '.join(choices)}, got '{value}'."
            f"{_did_you_mean(value, choices)}"
        )


RUN_CONFIG_HELP: dict[str, str] = {
    "sites-dir": "folder of site folders (simulation; e.g. written by fedrad synth)",
    "out-dir": "run directory to write; empty: a new folder under ./runs",
    "resume-from": "run directory whose latest checkpoint the run continues from",
    "node-names": "JSON file mapping Flower node ids to site names (fedrad coordinator start)",
    "audit-key": "Ed25519 PEM key that signs the audit trail; empty: RUNS/audit.key beside the "
    "run directory, created once and reused",
    "seed": "seed of initial weights and local shuffling",
    "kind": "2d images or 3d series (slices grouped by SeriesInstanceUID)",
    "image-size": "in-plane size images are resized to",
    "slices": "3d only: number of slices volumes are resized to",
    "in-channels": "1 (grey-scale) or 3 (colour)",
    "num-classes": "number of classes (2: binary)",
    "positive-label": "binary only: the class whose score is the positive score",
    "model": "network: cnn, cnn-lstm or transformer",
    "num-server-rounds": "number of federated rounds",
    "local-epochs": "epochs each site trains per round",
    "learning-rate": "sites' learning rate",
    "batch-size": "sites' batch size",
    "optimizer": "sites' optimizer: sgd or adam",
    "momentum": "SGD momentum",
    "weight-decay": "L2 weight decay",
    "strategy": "aggregation: fedavg, fedprox, fedadam, fedmedian, fedtrimmedavg or krum",
    "proximal-mu": "fedprox: weight of the proximal term",
    "server-learning-rate": "fedadam: server learning rate (eta)",
    "trim-beta": "fedtrimmedavg: fraction trimmed at each end",
    "krum-byzantine": "krum: number of Byzantine sites tolerated",
    "fraction-train": "fraction of sites sampled for training each round",
    "min-sites": "fewest sites that must train for a round to count",
    "round-timeout": "seconds to wait for sites' replies in each exchange",
    "dp": "differential privacy: off, sample (DP-SGD at each site) or client (distributed DP)",
    "study-id": "the study whose per-site privacy budget this run spends (required with dp)",
    "target-epsilon": "dp: each site's epsilon budget for the whole study",
    "delta": "dp: delta; 0 means 1/(10 x the site's training samples)",
    "noise-multiplier": "dp: noise multiplier; 0 derives it from target-epsilon and the plan",
    "max-grad-norm": "dp: per-sample gradient clipping norm",
    "dp-accountant": "dp: rdp or prv (Opacus accountants)",
    "secure-aggregation": "SecAgg+: the coordinator learns only the sum of the sites' updates",
    "secagg-threshold": "SecAgg+ threshold t; 0 picks the smallest safe one for the round",
    "secagg-clipping-range": "SecAgg+: largest absolute change of a weight in one round",
    "fairness-attributes": "patient attributes the fairness report breaks metrics down by "
    "(comma-separated: sex, age-band, manufacturer, modality)",
    "fairness-intersections": "attribute pairs reported jointly, e.g. 'sex*age-band' "
    "(comma-separated; empty for none)",
    "fairness-every-round": "write the fairness report after every round, not only at the end",
}
"""One line of help per run-config key: used by the command line and the README."""


@dataclass(frozen=True)
class RunConfig:
    """The federation's run configuration (``[tool.flwr.app.config]``).

    Field defaults here mirror pyproject.toml; a test keeps the two in step.
    """

    sites_dir: str = ""
    out_dir: str = ""
    resume_from: str = ""
    node_names: str = ""
    audit_key: str = ""
    seed: int = 0
    kind: str = "2d"
    image_size: int = 64
    slices: int = 16
    in_channels: int = 1
    num_classes: int = 2
    positive_label: int = 1
    model: str = "cnn"
    num_server_rounds: int = 12
    local_epochs: int = 3
    learning_rate: float = 0.001
    batch_size: int = 32
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_learning_rate: float = 0.1
    trim_beta: float = 0.2
    krum_byzantine: int = 0
    fraction_train: float = 1.0
    min_sites: int = 2
    round_timeout: float = 600.0
    dp: str = "off"
    study_id: str = ""
    target_epsilon: float = 8.0
    delta: float = 0.0
    noise_multiplier: float = 0.0
    max_grad_norm: float = 1.0
    dp_accountant: str = "rdp"
    secure_aggregation: bool = False
    secagg_threshold: int = 0
    secagg_clipping_range: float = 8.0
    fairness_attributes: str = "sex,age-band,manufacturer,modality"
    fairness_intersections: str = ""
    fairness_every_round: bool = False

    def __post_init__(self) -> None:
        _check_choice("kind", self.kind, KINDS)
        _check_choice("model", self.model, MODEL_NAMES)
        _check_choice("strategy", self.strategy, STRATEGY_NAMES)
        _check_choice("optimizer", self.optimizer, OPTIMIZER_NAMES)
        _check_range("seed", self.seed, 0, 2**31 - 1)
        _check_range("image-size", self.image_size, 8, 1024)
        _check_range("slices", self.slices, 1, 512)
        _check_range("in-channels", self.in_channels, 1, 4)
        _check_range("num-classes", self.num_classes, 2, 1000)
        _check_range("positive-label", self.positive_label, 0, self.num_classes - 1)
        _check_range("num-server-rounds", self.num_server_rounds, 1, 100_000)
        _check_range("local-epochs", self.local_epochs, 1, 1000)
        if not self.learning_rate > 0:
            raise ConfigError(f"'learning-rate' must be positive, got {self.learning_rate}.")
        _check_range("batch-size", self.batch_size, 1, 65536)
        _check_range("momentum", self.momentum, 0.0, 0.999)
        _check_range("weight-decay", self.weight_decay, 0.0, 1.0)
        _check_range("proximal-mu", self.proximal_mu, 0.0, 100.0)
        if not self.server_learning_rate > 0:
            raise ConfigError(
                f"'server-learning-rate' must be positive, got {self.server_learning_rate}."
            )
        _check_range("trim-beta", self.trim_beta, 0.0, 0.49)
        _check_range("krum-byzantine", self.krum_byzantine, 0, 1000)
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"'fraction-train' must be in (0, 1], got {self.fraction_train}.")
        _check_range("min-sites", self.min_sites, 1, 100_000)
        if not self.round_timeout > 0:
            raise ConfigError(f"'round-timeout' must be positive, got {self.round_timeout}.")
        _check_choice("dp", self.dp, DP_MODES)
        _check_choice("dp-accountant", self.dp_accountant, ("rdp", "prv"))
        if self.dp != "off" and not self.study_id.strip():
            raise ConfigError(
                "'study-id' is required when dp is on: each site keeps its privacy budget per "
                "study: 'fedrad simulate ... --study-id pneumonia-2026', or with flwr run "
                "-c \"study-id='pneumonia-2026'\"."
            )
        if not self.target_epsilon > 0 or not self.max_grad_norm > 0:
            raise ConfigError("'target-epsilon' and 'max-grad-norm' must be positive.")
        _check_range("delta", self.delta, 0.0, 0.1)
        _check_range("noise-multiplier", self.noise_multiplier, 0.0, 100.0)
        if self.secure_aggregation:
            if self.strategy in INDIVIDUAL_UPDATE_STRATEGIES:
                raise ConfigError(
                    f"strategy '{self.strategy}' needs every site's individual update, which "
                    "secure aggregation exists to hide; use fedavg, fedprox or fedadam with "
                    "secure-aggregation, or turn secure-aggregation off."
                )
            if self.min_sites < 3:
                raise ConfigError(
                    "secure aggregation needs at least 3 sites per round (min-sites >= 3): "
                    "with 2, each site could subtract its own update from the sum."
                )
        if self.dp == "client" and not self.secure_aggregation:
            raise ConfigError(
                "dp 'client' adds each site's share of the noise before masking: it needs "
                "secure-aggregation = true (alone, each update would carry too little noise)."
            )
        if self.dp == "client" and self.dp_accountant != "rdp":
            raise ConfigError(
                "dp 'client' is accounted with the rdp accountant (one step per round); "
                f"'dp-accountant' {self.dp_accountant!r} applies to dp 'sample' only: set "
                "dp-accountant = 'rdp'."
            )
        _check_range("secagg-threshold", self.secagg_threshold, 0, 100_000)
        if not self.secagg_clipping_range > 0:
            raise ConfigError("'secagg-clipping-range' must be positive.")
        parse_attributes(self.fairness_attributes)
        parse_intersections(self.fairness_intersections)
        if self.num_classes > MAX_FAIRNESS_CLASSES and (
            self.fairness_attributes.strip() or self.fairness_intersections.strip()
        ):
            raise ConfigError(
                f"the fairness report breaks {self.num_classes} classes down one-vs-rest per "
                f"subgroup, too large a vector for more than {MAX_FAIRNESS_CLASSES} classes: "
                "set fairness-attributes = '' and fairness-intersections = '' for this run."
            )

    @property
    def fairness_layout(self) -> FairnessLayout:
        """The layout of the fairness vectors every site sends in this run."""
        return FairnessLayout.from_config(
            num_classes=self.num_classes,
            positive_label=self.positive_label,
            attributes=self.fairness_attributes,
            intersections=self.fairness_intersections,
        )

    @classmethod
    def from_user_config(cls, raw: Mapping[str, Any], *, strict: bool = True) -> RunConfig:
        """Parse Flower's ``context.run_config`` (kebab-case keys) into a RunConfig."""
        return _from_mapping(cls, raw, what="run-config", strict=strict)

    def to_user_config(self) -> dict[str, ConfigValue]:
        """Return the kebab-case mapping that Flower's run config uses."""
        return {field_to_key(k): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes: Any) -> RunConfig:
        """Return a copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class NodeConfig:
    """One site's own configuration (``--node-config``); the coordinator cannot change it.

    ``data-dir`` names the site's folder in deployment. In simulation Flower sets
    ``partition-id`` and ``num-partitions`` instead, and partition ``i`` trains on the
    i-th site folder under the run config's ``sites-dir``.

    Privacy settings the site alone decides: ``max-epsilon`` / ``max-delta`` (per study),
    ``max-total-epsilon`` (over all studies together, recorded in the ledger folder),
    ``allowed-studies`` (comma-separated study ids; empty allows any), ``secagg-min-threshold``
    (the smallest secure-aggregation threshold it accepts and sizes its noise share by),
    ``eval-budget-fraction`` (the share of a study's budget its noised evaluation releases may
    spend under DP; their noise is derived from it), ``identity-key`` and ``roster`` (the
    site's signing key and the consortium's roster of sites, for authenticated secure
    aggregation), ``ca-cert`` (the consortium CA's certificate, which must have signed the
    roster; required when ``data-dir`` is set) and ``log-file`` (the site's local log of
    refused requests, with the details that never leave the site). ``warm-worker`` (deployment
    only) keeps torch, the dataset and the models loaded between messages in one per-site
    process (``client.worker``); false runs each message in Flower's fresh ClientApp process.
    """

    data_dir: str = ""
    site_id: str = ""
    num_threads: int = 0
    min_cell_count: int = 10
    cache_dir: str = ""
    ingest_workers: int = 1
    ledger_dir: str = ""
    max_epsilon: float = 10.0
    max_delta: float = 1e-3
    max_total_epsilon: float = 30.0
    allowed_studies: str = ""
    secagg_min_threshold: int = 2
    eval_budget_fraction: float = 0.1
    identity_key: str = ""
    roster: str = ""
    ca_cert: str = ""
    log_file: str = ""
    warm_worker: bool = True
    partition_id: int = -1
    num_partitions: int = 0

    def __post_init__(self) -> None:
        # 0 keeps the runtime's setting: Ray sets OMP_NUM_THREADS to the CPUs a
        # simulated client is given, and torch follows it.
        _check_range("num-threads", self.num_threads, 0, 256)
        _check_range("min-cell-count", self.min_cell_count, 1, 1_000_000)
        _check_range("ingest-workers", self.ingest_workers, 1, 256)
        if not self.max_epsilon > 0 or not 0 < self.max_delta < 1:
            raise ConfigError("'max-epsilon' must be positive and 'max-delta' in (0, 1).")
        if not self.max_total_epsilon >= self.max_epsilon:
            raise ConfigError(
                f"'max-total-epsilon' ({self.max_total_epsilon:g}) is this site's ceiling over "
                f"all studies together: it must be at least 'max-epsilon' ({self.max_epsilon:g})."
            )
        for study in self.allowed_study_ids:
            if not study.replace("-", "").replace("_", "").replace(".", "").isalnum():
                raise ConfigError(
                    f"'allowed-studies' lists {study!r}, which is not a study id (letters, "
                    "digits, '-', '_' and '.'); separate ids with commas."
                )
        _check_range("secagg-min-threshold", self.secagg_min_threshold, 2, 100_000)
        if not 0.0 < self.eval_budget_fraction <= 0.5:
            raise ConfigError(
                "'eval-budget-fraction' must be in (0, 0.5], got "
                f"{self.eval_budget_fraction}: the share of a study's epsilon that evaluation "
                "releases may spend under DP."
            )

    @property
    def allowed_study_ids(self) -> tuple[str, ...]:
        """The study ids this site takes part in (``allowed-studies``); empty: any study."""
        return tuple(s.strip() for s in self.allowed_studies.split(",") if s.strip())

    @classmethod
    def from_user_config(cls, raw: Mapping[str, Any]) -> NodeConfig:
        """Parse Flower's ``context.node_config``; unknown keys are rejected with a hint."""
        return _from_mapping(cls, raw, what="node-config", strict=True)
