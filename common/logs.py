"""Logging set-up for fedhead's own loggers (``common``, ``client``, ``server``, ``simulations``)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from types import TracebackType

from common.errors import ConfigError

__all__ = ["configure_logging", "held_logs", "HeldRecords", "LOG_LEVELS"]

log = logging.getLogger(__name__)

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


class HeldRecords(logging.Filter):
    """Holds the named loggers' WARNING records during a ``with`` block, for the caller to log each at the level it
    chooses (:meth:`pass_on`). Other levels go through; if the block raises, the held ones go as they were, unless
    ``release_on_error`` is false."""

    def __init__(self, names: Sequence[str], *, release_on_error: bool = True) -> None:
        super().__init__()
        self.loggers = [logging.getLogger(n) for n in names]
        self.release_on_error = release_on_error
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        self.records.append(record)
        return False

    def __enter__(self) -> HeldRecords:
        for logger in self.loggers:
            logger.addFilter(self)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for logger in self.loggers:
            logger.removeFilter(self)
        if kind is not None and self.release_on_error:
            for record in self.records:
                self.pass_on(record, record.levelno)

    @staticmethod
    def pass_on(record: logging.LogRecord, level: int) -> None:
        """Log ``record`` through its own logger at ``level``, if that logger logs ``level``."""
        logger = logging.getLogger(record.name)
        if logger.isEnabledFor(level):
            record.levelno, record.levelname = level, logging.getLevelName(level)
            logger.handle(record)


@contextlib.contextmanager
def held_logs(name: str) -> Iterator[None]:
    """Hold back logger ``name``'s WARNING records for the block (the caller reports what they say), then log them
    at DEBUG, whether or not the block raises."""
    with HeldRecords([name], release_on_error=False) as held:
        try:
            yield
        finally:
            for record in held.records:
                log.debug("%s: %s", name, record.getMessage(), exc_info=record.exc_info)
