"""Writing files so that a crash never leaves half of one, and checking folders up front.

Every file a run or a site writes goes through :func:`atomic_path`: the
content goes to a temporary file beside the target, which is then renamed
over it, so readers see the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.errors import ConfigError

__all__ = ["atomic_path", "write_bytes_atomic", "write_text_atomic", "write_json_atomic", "ensure_writable_dir", "remove_stale_siblings"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    The temporary name keeps ``path``'s suffix, for writers that dispatch on it
    (``np.savez``, matplotlib). On an exception the temporary file is removed.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically (and durably when ``fsync``)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, content: Any) -> Path:
    """Write ``content`` as indented, key-sorted JSON, atomically."""
    return write_text_atomic(path, json.dumps(content, indent=2, sort_keys=True) + "\n")


def ensure_writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Create ``path`` if needed and prove it writable; else a ConfigError naming it.

    ``what`` says which setting named the folder (for example ``"run-dir"``).
    """
    folder = Path(path).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"{what} '{folder}' is not a writable folder ({reason}); "
            f"choose a folder this user can write, or fix its permissions"
        ) from None
    return folder.resolve()


def remove_stale_siblings(kept: Path, pattern: str, *, days: float) -> list[Path]:
    """Remove the files matching ``pattern`` beside ``kept`` (not ``kept`` itself) untouched for ``days`` days; return them.

    For per-run files a site keeps in its state-dir: a run that has ended never
    touches its file again. A file another process is writing or removing is left.
    """
    cutoff, removed = time.time() - days * 86400, []
    for path in kept.parent.glob(pattern):
        with contextlib.suppress(OSError):
            if path != kept and path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
    return removed
