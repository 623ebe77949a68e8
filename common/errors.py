"""fedhead's exceptions: one base, each subclass also a matching built-in."""

from __future__ import annotations

__all__ = [
    "FedHeadError",
    "ConfigError",
    "WeightsError",
    "DataError",
    "CacheError",
    "ReplyError",
    "SiteFailedError",
    "FingerprintError",
    "public_reason",
]

import re


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
    """A message does not parse into the protocol's types; ``problems`` lists every reason."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class SiteFailedError(ReplyError):
    """A site answered with an error instead of a result."""


class FingerprintError(FedHeadError, ValueError):
    """Server and site disagree about the backbone they are using."""


_PATHLIKE = re.compile(r"""(?:[A-Za-z]:)?(?:~|\.{1,2})?[/\\][^\s'"]*|[^\s'"/\\]+\.(?:png|jpe?g|bmp|tiff?|gif|webp|dcm|npz|npy|csv|toml|json|safetensors|pth?)\b""", re.IGNORECASE)


def public_reason(exc: BaseException, limit: int = 300) -> str:
    """What a site may tell the server about ``exc``: its type and message, local paths and file names removed.

    The full message, paths included, stays in the site's own log.
    """
    text = _PATHLIKE.sub("<path>", " ".join(str(exc).split()))
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
