"""Logging set-up for fedhead's own loggers (``common``, ``client``, ``server``, ``simulations``)."""

from __future__ import annotations

import logging
import os

from common.errors import ConfigError

__all__ = ["configure_logging", "LOG_LEVELS"]

_PACKAGES = ("common", "client", "server", "simulations")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def configure_logging(level: str | None = None) -> None:
    """Send fedhead's log records to stderr once, at ``level`` (or $FEDHEAD_LOG_LEVEL, INFO).

    An unknown level is a ConfigError. Also undoes the DEBUG level that Opacus and friends leave on Flower's logger.
    """
    level_name = (level or os.environ.get("FEDHEAD_LOG_LEVEL") or "INFO").strip().upper()
    if level_name not in LOG_LEVELS:
        raise ConfigError(f"log level {level_name!r} is not one of {', '.join(LOG_LEVELS)}; pass --log-level INFO, for example")
    for name in _PACKAGES:
        logger = logging.getLogger(name)
        logger.setLevel(level_name)
        if not any(getattr(h, "_fedhead", False) for h in logger.handlers):
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            handler._fedhead = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
            logger.propagate = False
    flwr_logger = logging.getLogger("flwr")
    if flwr_logger.level == logging.DEBUG:
        flwr_logger.setLevel(logging.INFO)
