"""The typed run configuration, built once from Flower's run_config.

Keys are kebab-case in ``pyproject.toml`` (``[tool.flwr.app.config]``) and on
the command line (``--run-config "local-epochs=2"``); here they become the
snake_case fields of one frozen dataclass. Every problem is collected and
reported together, each naming the key, the value received and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from common.errors import ConfigError

__all__ = ["is_plain_name", "RunConfig", "STRATEGIES", "HEADS", "PARTITIONERS", "OPTIMIZERS", "DATASETS", "BENCHMARK_CLASS_COUNTS", "FEATURE_VIEWS", "DP_MODES", "ACCOUNTANTS", "CENTRAL_CLIPPING",
           "build_run_config"]

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian", "fedtrimmedavg", "krum")
HEADS = ("linear", "mlp")
PARTITIONERS = ("iid", "dirichlet", "shard")
OPTIMIZERS = ("adam", "sgd")
MAX_ROUNDS = 100_000  # Flower keeps the round number in a 64-bit field; no run needs more
DATASETS = ("fashion-mnist", "digits", "npz", "image-folder")
# datasets whose classes are fixed (common.benchmarks loads them); npz and image folders name their own
BENCHMARK_CLASS_COUNTS: Mapping[str, int] = MappingProxyType({"fashion-mnist": 10, "digits": 10})
FEATURE_VIEWS = ("one", "mirror", "mirror-shift")  # defined in common.view_average
DP_MODES = ("none", "sample", "central", "both")
ACCOUNTANTS = ("rdp", "prv", "gdp")
CENTRAL_CLIPPING = ("server", "client")
CENTRAL_DP_STRATEGIES = ("fedavg", "fedprox")  # Flower's accountant needs FedAvg's aggregation

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def is_plain_name(name: str) -> bool:
    """True for a name safe as one folder name: no separators, no leading dot, no ``..``."""
    return bool(_PLAIN_NAME.fullmatch(name)) and ".." not in name


FASHION_MNIST_CLASSES = (
    "T-shirt/top,Trouser,Pullover,Dress,Coat,Sandal,Shirt,Sneaker,Bag,Ankle boot"
)


@dataclass(frozen=True)
class RunConfig:
    """Everything a run is configured by; one field per run-config key."""

    # federation
    num_server_rounds: int = 10
    strategy: str = "fedavg"
    fraction_train: float = 1.0
    min_sites: int = 2
    sites_per_round: int = 0  # exactly this many sites each round; 0: every connected site (fraction-train of them)
    round_timeout: float = 900.0
    proximal_mu: float = 0.01
    server_lr: float = 0.1
    trimmed_beta: float = 0.2
    krum_malicious: int = 0
    max_examples_per_site: int = 1_000_000
    # backbone and head
    backbone: str = "mobilenet_v2"
    pretrained: bool = True
    weights_file: str = ""
    unfreeze_blocks: int = 0
    backbone_lr_scale: float = 0.1
    head: str = "linear"
    head_hidden: int = 256
    image_size: int = 64
    classes: str = FASHION_MNIST_CLASSES
    # local training
    local_epochs: int = 2
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 0.001
    weight_decay: float = 0.0
    label_smoothing: float = 0.0
    early_stopping_patience: int = 0
    augment_views: int = 0
    feature_views: str = "one"
    cache_features: bool = True
    # data (simulation)
    dataset: str = "fashion-mnist"
    dataset_path: str = ""
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    shards_per_site: int = 2
    examples_per_site: int = 0
    val_fraction: float = 0.1
    server_eval_data: str = ""
    enrolment: str = ""  # the federation's enrolment.json: node id -> site name (fedhead federation enrol)
    # privacy: record-level DP-SGD at the sites ('sample'), client-level DP at the server ('central'), or both
    dp: str = "none"
    accountant: str = "rdp"
    dp_sample_rate: float = 0.0  # Poisson sampling rate of DP-SGD; 0 means batch-size / the site's examples
    target_epsilon: float = 8.0
    target_delta: float = 1e-5
    max_grad_norm: float = 1.0
    keep_optimizer_state: bool = False  # DP-SGD: each site continues its optimizer's moments across a run's rounds (kept in its state-dir)
    # each site trains its head on its features minus their mean; under record-level DP a private release (client.feature_centre)
    centre_features: bool = False
    centre_noise_multiplier: float = 20.0  # the release's Gaussian noise, in units of centre-clip-norm
    centre_clip_norm: float = 40.0  # each image's features clipped to this L2 norm for the release
    central_clipping: str = "server"  # who clips each site's update to central-clip-norm: the server or the site
    central_clip_norm: float = 1.0
    central_noise_multiplier: float = 0.0  # 0: calibrated so that the run ends at target-epsilon
    # bookkeeping
    seed: int = 42
    run_dir: str = "runs"
    run_name: str = ""
    export_onnx: bool = True  # model/model.onnx beside model.pt2 (about 13 s at the end of a run on 2 cores)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The class names, in label order."""
        return tuple(name.strip() for name in self.classes.split(",") if name.strip())

    @property
    def records_dp(self) -> bool:
        """True when the sites train with record-level DP-SGD (``dp`` is ``sample`` or ``both``)."""
        return self.dp in ("sample", "both")

    @property
    def central_dp(self) -> bool:
        """True when the server adds client-level DP noise to each aggregate (``dp`` is ``central`` or ``both``)."""
        return self.dp in ("central", "both")

    @property
    def num_classes(self) -> int:
        """How many classes the head predicts."""
        return len(self.class_names)

    def to_run_config(self) -> dict[str, Any]:
        """This config as kebab-case run-config keys (what ``config.json`` records)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}


_FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert ``value`` to the type of ``default`` or raise ValueError."""
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError("expected true or false")
    if isinstance(default, int):
        if isinstance(value, bool):
            raise ValueError("expected an integer")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, (int, str)):
            return int(value)
        raise ValueError("expected an integer")
    if isinstance(default, float):
        if isinstance(value, bool):
            raise ValueError("expected a number")
        number = float(value)
        if not math.isfinite(number):
            raise ValueError("expected a finite number")
        return number
    if isinstance(value, (str, int, float)):
        return str(value)
    raise ValueError("expected a string")


def build_run_config(run_config: Mapping[str, Any] | None = None, **overrides: Any) -> RunConfig:
    """Build and validate a RunConfig from Flower's run_config mapping.

    Unknown keys are an error (they are usually typos). ``overrides`` use the
    snake_case field names and win over ``run_config``.
    """
    problems: list[str] = []
    values: dict[str, Any] = {}
    merged: dict[str, Any] = {k.replace("_", "-"): v for k, v in (run_config or {}).items()}
    merged.update({k.replace("_", "-"): v for k, v in overrides.items()})
    for key, value in merged.items():
        name = key.replace("-", "_")
        if name not in _FIELDS:
            known = ", ".join(sorted(k.replace("_", "-") for k in _FIELDS))
            problems.append(f"unknown run-config key '{key}'; known keys: {known}")
            continue
        default = _FIELDS[name].default
        try:
            values[name] = _coerce(key, value, default)
        except (TypeError, ValueError) as exc:
            problems.append(f"'{key}' = {value!r} is not valid: {exc}")
    config = RunConfig(**values)
    problems.extend(_problems(config))
    if problems:
        raise ConfigError("invalid run config:\n  - " + "\n  - ".join(problems))
    return config


def _problems(cfg: RunConfig) -> list[str]:
    problems: list[str] = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(1 <= cfg.num_server_rounds <= MAX_ROUNDS, f"'num-server-rounds' = {cfg.num_server_rounds}: must be 1 to {MAX_ROUNDS:,}")
    need(cfg.strategy in STRATEGIES, f"'strategy' = {cfg.strategy!r}: choose one of {', '.join(STRATEGIES)}")
    need(0.0 < cfg.fraction_train <= 1.0, f"'fraction-train' = {cfg.fraction_train}: must be in (0, 1]")
    need(cfg.min_sites >= 1, f"'min-sites' = {cfg.min_sites}: must be >= 1")
    need(cfg.sites_per_round >= 0, f"'sites-per-round' = {cfg.sites_per_round}: must be >= 0 (0: every connected site)")
    need(cfg.round_timeout > 0, f"'round-timeout' = {cfg.round_timeout}: must be > 0 seconds")
    need(cfg.proximal_mu >= 0, f"'proximal-mu' = {cfg.proximal_mu}: must be >= 0")
    need(cfg.server_lr > 0, f"'server-lr' = {cfg.server_lr}: must be > 0")
    need(0.0 <= cfg.trimmed_beta < 0.5, f"'trimmed-beta' = {cfg.trimmed_beta}: must be in [0, 0.5)")
    need(cfg.krum_malicious >= 0, f"'krum-malicious' = {cfg.krum_malicious}: must be >= 0")
    need(
        cfg.max_examples_per_site >= 1,
        f"'max-examples-per-site' = {cfg.max_examples_per_site}: must be >= 1 (replies claiming more are rejected)",
    )
    need(cfg.unfreeze_blocks >= 0, f"'unfreeze-blocks' = {cfg.unfreeze_blocks}: must be >= 0")
    need(cfg.backbone_lr_scale > 0, f"'backbone-lr-scale' = {cfg.backbone_lr_scale}: must be > 0")
    need(cfg.head in HEADS, f"'head' = {cfg.head!r}: choose one of {', '.join(HEADS)}")
    need(cfg.head_hidden >= 1, f"'head-hidden' = {cfg.head_hidden}: must be >= 1")
    need(16 <= cfg.image_size <= 1024, f"'image-size' = {cfg.image_size}: must be in [16, 1024] pixels")
    need(cfg.num_classes >= 2, f"'classes' = {cfg.classes!r}: give at least two comma-separated class names")
    need(len(set(cfg.class_names)) == cfg.num_classes, f"'classes' = {cfg.classes!r}: class names must be unique")
    need(cfg.local_epochs >= 1, f"'local-epochs' = {cfg.local_epochs}: must be >= 1")
    need(cfg.batch_size >= 1, f"'batch-size' = {cfg.batch_size}: must be >= 1")
    need(cfg.optimizer in OPTIMIZERS, f"'optimizer' = {cfg.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
    need(cfg.lr > 0, f"'lr' = {cfg.lr}: must be > 0")
    need(cfg.weight_decay >= 0, f"'weight-decay' = {cfg.weight_decay}: must be >= 0")
    need(0.0 <= cfg.label_smoothing < 1.0, f"'label-smoothing' = {cfg.label_smoothing}: must be in [0, 1)")
    need(cfg.early_stopping_patience >= 0, f"'early-stopping-patience' = {cfg.early_stopping_patience}: must be >= 0 (0 turns it off)")
    need(0 <= cfg.augment_views <= 16, f"'augment-views' = {cfg.augment_views}: must be in [0, 16]")
    need(cfg.feature_views in FEATURE_VIEWS, f"'feature-views' = {cfg.feature_views!r}: choose one of {', '.join(FEATURE_VIEWS)}")
    need(cfg.feature_views == "one" or cfg.unfreeze_blocks == 0,
         f"'feature-views' = {cfg.feature_views!r} averages the trunk's pooled features, so it needs 'unfreeze-blocks' = 0 "
         f"(it is {cfg.unfreeze_blocks}); use feature-views='one' to train open stages")
    need(not cfg.centre_features or cfg.unfreeze_blocks == 0,
         f"'centre-features' centres the trunk's features for the head, so it needs 'unfreeze-blocks' = 0 (it is {cfg.unfreeze_blocks})")
    need(0 < cfg.centre_noise_multiplier <= 1e6, f"'centre-noise-multiplier' = {cfg.centre_noise_multiplier}: must be in (0, 1e6]")
    need(cfg.centre_clip_norm > 0, f"'centre-clip-norm' = {cfg.centre_clip_norm}: must be > 0")
    need(cfg.dataset in DATASETS, f"'dataset' = {cfg.dataset!r}: choose one of {', '.join(DATASETS)}")
    need(cfg.partitioner in PARTITIONERS, f"'partitioner' = {cfg.partitioner!r}: choose one of {', '.join(PARTITIONERS)}")
    need(cfg.dirichlet_alpha > 0, f"'dirichlet-alpha' = {cfg.dirichlet_alpha}: must be > 0")
    need(cfg.shards_per_site >= 1, f"'shards-per-site' = {cfg.shards_per_site}: must be >= 1")
    need(cfg.examples_per_site >= 0, f"'examples-per-site' = {cfg.examples_per_site}: must be >= 0 (0 means all)")
    need(0.0 <= cfg.val_fraction < 0.9, f"'val-fraction' = {cfg.val_fraction}: must be in [0, 0.9)")
    need(cfg.target_epsilon > 0, f"'target-epsilon' = {cfg.target_epsilon}: must be > 0")
    need(0.0 < cfg.target_delta < 1.0, f"'target-delta' = {cfg.target_delta}: must be in (0, 1)")
    need(cfg.max_grad_norm > 0, f"'max-grad-norm' = {cfg.max_grad_norm}: must be > 0")
    need(cfg.dp in DP_MODES, f"'dp' = {cfg.dp!r}: choose one of {', '.join(DP_MODES)}")
    need(
        cfg.central_clipping in CENTRAL_CLIPPING,
        f"'central-clipping' = {cfg.central_clipping!r}: choose one of {', '.join(CENTRAL_CLIPPING)}",
    )
    need(cfg.central_clip_norm > 0, f"'central-clip-norm' = {cfg.central_clip_norm}: must be > 0")
    need(
        cfg.central_noise_multiplier >= 0,
        f"'central-noise-multiplier' = {cfg.central_noise_multiplier}: must be >= 0 (0: calibrated to target-epsilon)",
    )
    if cfg.central_dp:
        need(
            cfg.strategy in CENTRAL_DP_STRATEGIES,
            f"'strategy' = {cfg.strategy!r} with dp={cfg.dp!r}: Flower's DP accountant needs FedAvg's aggregation; "
            f"choose one of {', '.join(CENTRAL_DP_STRATEGIES)}",
        )
        need(
            cfg.sites_per_round >= 1,
            f"'sites-per-round' = {cfg.sites_per_round} with dp={cfg.dp!r}: the noise is calibrated for a fixed number "
            "of sites each round; set it (fedhead simulate sets it to --sites)",
        )
    need(0.0 <= cfg.dp_sample_rate <= 1.0, f"'dp-sample-rate' = {cfg.dp_sample_rate}: must be in [0, 1] (0: batch-size / examples)")
    need(cfg.accountant in ACCOUNTANTS, f"'accountant' = {cfg.accountant!r}: choose one of {', '.join(ACCOUNTANTS)}")
    need(bool(cfg.run_dir), "'run-dir' is empty: give a folder for run outputs")
    need(
        not cfg.run_name or is_plain_name(cfg.run_name),
        f"'run-name' = {cfg.run_name!r}: use letters, digits, '.', '_' and '-' only, not starting with '.' "
        "(no path separators or '..')",
    )
    return problems
