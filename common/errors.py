"""fedhead's exceptions: one base, each subclass also a matching built-in."""

from __future__ import annotations

__all__ = [
    "FedHeadError",
    "ConfigError",
    "WeightsError",
    "DataError",
    "CacheError",
    "ReplyError",
    "FingerprintError",
]


class FedHeadError(Exception):
    """Base class of every error fedhead raises on purpose."""


class ConfigError(FedHeadError, ValueError):
    """A configuration value is missing, malformed or out of range."""


class WeightsError(FedHeadError, FileNotFoundError):
    """Backbone weights are missing, unreadable or not the expected bytes."""


class DataError(FedHeadError, ValueError):
    """Site or benchmark data is missing, malformed or inconsistent."""


class CacheError(FedHeadError, OSError):
    """A feature cache entry is unreadable or does not match its key."""


class ReplyError(FedHeadError, ValueError):
    """A site's reply does not have the layout the server expects."""


class FingerprintError(FedHeadError, ValueError):
    """Server and site disagree about the backbone they are using."""
