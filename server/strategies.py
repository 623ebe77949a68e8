"""Choosing one of Flower's own strategies from the run config (used, not rewritten)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, Strategy

from common.config import RunConfig
from common.errors import ConfigError

__all__ = ["STRATEGY_BUILDERS", "build_strategy"]

_VANISHING_FRACTION = 1e-9

Builder = Callable[[RunConfig, dict[str, Any]], Strategy]

# run-config 'strategy' -> how to build it (common.config.STRATEGIES names the same keys).
STRATEGY_BUILDERS: dict[str, Builder] = {
    "fedavg": lambda cfg, kw: FedAvg(**kw),
    "fedprox": lambda cfg, kw: FedProx(**kw, proximal_mu=cfg.proximal_mu),
    "fedadam": lambda cfg, kw: FedAdam(**kw, eta=cfg.server_lr, eta_l=cfg.lr),
    "fedyogi": lambda cfg, kw: FedYogi(**kw, eta=cfg.server_lr, eta_l=cfg.lr),
    "fedmedian": lambda cfg, kw: FedMedian(**kw),
    "fedtrimmedavg": lambda cfg, kw: FedTrimmedAvg(**kw, beta=cfg.trimmed_beta),
    "krum": lambda cfg, kw: Krum(**kw, num_malicious_nodes=cfg.krum_malicious),
}


def build_strategy(cfg: RunConfig) -> Strategy:
    """The Flower strategy named by ``strategy``, with fedhead's sampling settings."""
    if cfg.strategy not in STRATEGY_BUILDERS:
        raise ConfigError(f"unknown strategy '{cfg.strategy}'; choose one of: {', '.join(STRATEGY_BUILDERS)}")
    sampling = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": cfg.min_sites,
        "min_evaluate_nodes": cfg.min_sites,
        "min_available_nodes": cfg.min_sites,
    }
    if cfg.sites_per_round:
        # Flower samples max(int(fraction x connected), min_train_nodes) sites once min_available_nodes are
        # connected: a vanishing fraction makes that exactly sites-per-round, however many are connected.
        sampling.update(
            fraction_train=_VANISHING_FRACTION,
            min_train_nodes=cfg.sites_per_round,
            min_available_nodes=max(cfg.min_sites, cfg.sites_per_round),
        )
    return STRATEGY_BUILDERS[cfg.strategy](cfg, sampling)
