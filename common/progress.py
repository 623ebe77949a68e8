"""Progress of long work: a bar on a terminal, a periodic log line everywhere else.

On a terminal (stderr is a TTY) a tqdm bar shows done/total, rate and ETA.
Where stderr is a pipe or a file (a SuperNode's log, the stream that
``fedhead simulate`` shows, CI) a bar would be noise, so one log line is
written about every ``interval_s`` seconds instead::

    features site-0 train: 1,024/4,000 images (26%), 812 img/s, ETA 4 s
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import TextIO

__all__ = ["ProgressReporter"]

log = logging.getLogger(__name__)


def _eta(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class ProgressReporter:
    """Report ``advance(n)`` calls against ``total`` items; use as a context manager.

    ``bar=None`` chooses a bar when ``stream`` (default stderr) is a TTY.
    ``logger`` is the logger the periodic lines go to (the caller's, so that
    a log line names the module doing the work).
    """

    def __init__(
        self,
        total: int,
        description: str,
        *,
        unit: str = "images",
        rate_unit: str = "img",
        interval_s: float = 10.0,
        logger: logging.Logger | None = None,
        bar: bool | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.total = int(total)
        self.description = description
        self.unit = unit
        self.rate_unit = rate_unit
        self.interval_s = float(interval_s)
        self.done = 0
        self.lines_logged = 0
        self.seconds: float | None = None
        self._log = logger or log
        stream = stream or sys.stderr
        self._bar = None
        if bar is None:
            bar = bool(getattr(stream, "isatty", lambda: False)())
        if bar and self.total > 0:
            from tqdm import tqdm

            self._bar = tqdm(total=self.total, desc=description, unit=rate_unit, file=stream, dynamic_ncols=True, leave=False)
        self._started = time.monotonic()
        self._last_line = self._started

    def advance(self, n: int) -> None:
        """Count ``n`` more items done; update the bar or log a line when one is due."""
        self.done += int(n)
        if self._bar is not None:
            self._bar.update(int(n))
            return
        now = time.monotonic()
        if now - self._last_line >= self.interval_s and self.done < self.total:
            self._log.info("%s", self.line(now))
            self.lines_logged += 1
            self._last_line = now

    def line(self, now: float | None = None) -> str:
        """``description: done/total unit (pct), rate, ETA`` as of ``now``."""
        elapsed = max(1e-9, (now or time.monotonic()) - self._started)
        rate = self.done / elapsed
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = f", ETA {_eta((self.total - self.done) / rate)}" if rate > 0 and self.done < self.total else ""
        return f"{self.description}: {self.done:,}/{self.total:,} {self.unit}{pct}, {rate:,.0f} {self.rate_unit}/s{eta}"

    def close(self) -> float:
        """End the report (once); return the seconds it took. A job that logged lines logs its end too."""
        if self.seconds is None:
            self.seconds = time.monotonic() - self._started
            if self._bar is not None:
                self._bar.close()
            elif self.lines_logged:
                self._log.info("%s: %s %s in %.1f s", self.description, f"{self.done:,}", self.unit, self.seconds)
        return self.seconds

    def __enter__(self) -> "ProgressReporter":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
