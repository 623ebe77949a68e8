"""Choosing one of Flower's own strategies from the run config (used, not rewritten)."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam, FedAvg, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, Strategy

from common.config import STRATEGIES, RunConfig
from common.errors import ConfigError

__all__ = ["build_strategy"]


def build_strategy(cfg: RunConfig) -> Strategy:
    """The Flower strategy named by ``strategy``, with fedhead's sampling settings."""
    common = {
        "fraction_train": cfg.fraction_train,
        "fraction_evaluate": 1.0,
        "min_train_nodes": cfg.min_sites,
        "min_evaluate_nodes": cfg.min_sites,
        "min_available_nodes": cfg.min_sites,
    }
    if cfg.strategy == "fedavg":
        return FedAvg(**common)
    if cfg.strategy == "fedprox":
        return FedProx(**common, proximal_mu=cfg.proximal_mu)
    if cfg.strategy == "fedadam":
        return FedAdam(**common, eta=cfg.server_lr, eta_l=cfg.lr)
    if cfg.strategy == "fedyogi":
        return FedYogi(**common, eta=cfg.server_lr, eta_l=cfg.lr)
    if cfg.strategy == "fedmedian":
        return FedMedian(**common)
    if cfg.strategy == "fedtrimmedavg":
        return FedTrimmedAvg(**common, beta=cfg.trimmed_beta)
    if cfg.strategy == "krum":
        return Krum(**common, num_malicious_nodes=cfg.krum_malicious)
    raise ConfigError(f"unknown strategy '{cfg.strategy}'; choose one of {', '.join(STRATEGIES)}")
