"""fedhead's exceptions: one base, each subclass also a matching built-in."""

from __future__ import annotations

__all__ = [
    "FedHeadError",
    "ConfigError",
    "WeightsError",
    "DataError",
    "UnreadableImageError",
    "CacheError",
    "ReplyError",
    "SiteFailedError",
    "FingerprintError",
    "public_reason",
]



class FedHeadError(Exception):
    """Base class of every error fedhead raises on purpose.

    ``public_message``: True on classes whose messages hold no local path or
    name, so a site may send them to the server as they are.
    """

    public_message = False


class ConfigError(FedHeadError, ValueError):
    """A configuration value is missing, malformed or out of range."""


class WeightsError(FedHeadError, FileNotFoundError):
    """Backbone weights are missing, unreadable or not the expected bytes."""


class DataError(FedHeadError, ValueError):
    """Site or benchmark data is missing, malformed or inconsistent."""


class UnreadableImageError(DataError):
    """An image file that cannot be decoded safely; ``reason`` says why, without the path."""

    def __init__(self, path: object, reason: str) -> None:
        self.path, self.reason = str(path), reason
        super().__init__(f"cannot read image '{path}': {reason}; replace or remove the file")


class CacheError(FedHeadError, OSError):
    """A feature cache entry is unreadable or does not match its key."""


class ReplyError(FedHeadError, ValueError):
    """A message does not parse into the protocol's types; ``problems`` lists every reason."""

    public_message = True

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class SiteFailedError(ReplyError):
    """A site answered with an error instead of a result."""


class FingerprintError(FedHeadError, ValueError):
    """Server and site disagree about the backbone they are using."""

    public_message = True


# What a site tells the server about an error whose message may name local files.
_PUBLIC_SUMMARY = {
    "DataError": "the site's data failed a check",
    "ConfigError": "the site's configuration (node config, policy or run config) failed a check",
    "WeightsError": "the site's backbone weights are missing or not the expected file",
    "CacheError": "the site's feature cache could not be used",
}


def public_reason(exc: BaseException, limit: int = 300) -> str:
    """What a site may tell the server about ``exc``, without its local paths, file or folder names.

    Errors whose messages are built from protocol values only (``public_message``:
    a policy refusal's rule and numbers, a backbone hash mismatch) are sent as
    they are; any other error is sent as its type and a fixed description. The
    full message stays in the site's own log.
    """
    name = type(exc).__name__
    if getattr(exc, "public_message", False):
        text = f"{name}: {' '.join(str(exc).split())}"
    else:
        summary = next((s for cls, s in _PUBLIC_SUMMARY.items() if cls in {c.__name__ for c in type(exc).__mro__}), None)
        text = f"{name}: {summary or 'the site could not complete the request'}; the site's log has the details"
    return text if len(text) <= limit else text[: limit - 3] + "..."
