"""Progress of long work: a periodic log line where stderr is no terminal."""

from __future__ import annotations

import io
import logging

import torch
from torch import nn

from common.features import extract_features
from common.progress import ProgressReporter


def test_a_log_line_names_done_total_rate_and_eta(caplog, monkeypatch):
    now = [0.0]
    monkeypatch.setattr("common.progress.time.monotonic", lambda: now[0])
    logger = logging.getLogger("tests.progress")
    with caplog.at_level(logging.INFO, logger="tests.progress"):
        with ProgressReporter(400, "site-0 train", interval_s=10, logger=logger, bar=False) as progress:
            for _ in range(4):
                now[0] += 5.0
                progress.advance(100)
    assert [r.getMessage() for r in caplog.records] == [
        "site-0 train: 200/400 images (50%), 20 img/s, ETA 10 s",
        "site-0 train: 400 images in 20.0 s",
    ]


def test_extract_features_reports_without_a_terminal(caplog):
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    images = torch.randint(0, 255, (130, 3, 8, 8), dtype=torch.uint8)
    with caplog.at_level(logging.INFO, logger="common.features"):
        out = extract_features(trunk, lambda x: x.float() / 255, images, batch_size=64, description="demo", progress_interval_s=0.0)
    assert out.shape == (130, 4)
    messages = [r.getMessage() for r in caplog.records if r.name == "common.features"]
    assert messages[0].startswith("demo: 64/130 images (49%), ") and "img/s, ETA" in messages[0]
    assert messages[-1].startswith("demo: 130 images in ")


def test_a_terminal_gets_a_bar_instead_of_lines():
    stream = io.StringIO()
    with ProgressReporter(10, "bar", bar=True, stream=stream) as progress:
        progress.advance(10)
    assert "bar:" in stream.getvalue() and "/10" in stream.getvalue() and "img/s" in stream.getvalue()
