"""The ClientApp, called through Flower's own dispatch with real records."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import app
from common.config import build_run_config
from common.errors import FingerprintError
from common.exchange import to_arrayrecord
from common.model import build_split_model

pytestmark = pytest.mark.usefixtures("flower_identity")

RUN_CONFIG = {"classes": ",".join(str(d) for d in range(10)), "image-size": 32, "local-epochs": 3, "lr": 0.01}


def _context(tmp_path, digits_npz):
    node_config = {"data-dir": str(digits_npz), "site-name": "st-olav", "cache-dir": str(tmp_path / "site-cache")}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=RUN_CONFIG)


def _message(kind: str, sha256: str) -> Message:
    model = build_split_model(build_run_config(RUN_CONFIG))
    config = ConfigRecord({"server-round": 1, "backbone-sha256": sha256})
    return Message(content=RecordDict({"arrays": to_arrayrecord(model.trainable), "config": config}), dst_node_id=7, message_type=kind)


def test_train_sends_back_only_the_head_and_counts_backbone_passes(tmp_path, digits_npz):
    sha256 = build_split_model(build_run_config(RUN_CONFIG)).weights_sha256
    context = _context(tmp_path, digits_npz)
    first = app(_message("train", sha256), context)
    assert set(first.content["arrays"].keys()) == {"head.weight", "head.bias"}
    metrics = first.content["metrics"]
    assert metrics["num-examples"] == 1000
    assert (metrics["backbone-forwards-train"], metrics["backbone-forwards-eval"]) == (1000, 300)
    assert first.content["site"]["site"] == "st-olav"
    second = app(_message("train", sha256), context)
    assert (second.content["metrics"]["backbone-forwards-train"], second.content["metrics"]["cache-hits"]) == (0, 2)
    assert len(list((tmp_path / "site-cache").glob("*.safetensors"))) == 2  # the site's own disk
    evaluation = app(_message("evaluate", sha256), context)
    assert evaluation.content["metrics"]["num-examples"] == 300
    assert not evaluation.content.array_records


def test_a_site_refuses_a_server_with_another_backbone(tmp_path, digits_npz):
    with pytest.raises(FingerprintError, match="provision the same weights"):
        app(_message("train", "0" * 64), _context(tmp_path, digits_npz))
