"""The Flower app's own files, staged for ``flwr run``.

``flwr run DIR`` walks every file under DIR before it filters what goes into
the app bundle (FAB). From the project root that walk takes in ``.venv/`` and
``.cache/``: about 53,000 files and 10 s of every run on a 2-core machine. A
run is therefore submitted from a copy holding only what the ServerApp and
ClientApp import (``common/``, ``client/``, ``server/``) and the app's
``pyproject.toml``, made afresh for each run and removed after it.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

__all__ = ["APP_FILES", "staged_app"]

APP_FILES = ("pyproject.toml", "README.md", ".gitignore", "common", "client", "server")


@contextlib.contextmanager
def staged_app(root: Path, under: Path) -> Iterator[Path]:
    """A fresh copy of the app in ``root`` (its ``APP_FILES``), in a folder under ``under``; removed afterwards."""
    source = under / "app-source"
    shutil.rmtree(source, ignore_errors=True)  # left by a run that was killed
    source.mkdir(parents=True)
    try:
        for name in APP_FILES:
            path = root / name
            if path.is_dir():
                shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif path.is_file():
                shutil.copy2(path, source / name)
        yield source
    finally:
        shutil.rmtree(source, ignore_errors=True)
