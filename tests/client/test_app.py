"""The ClientApp, called through Flower's own dispatch with real records."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from client.app import app
from common.config import build_run_config
from common.exchange import to_arrayrecord, trainable_layout
from common.model import build_split_model
from common.errors import ReplyError
from common.receipt_ledger import read_receipts
from common.replies import parse_evaluate_reply, parse_train_reply

pytestmark = pytest.mark.usefixtures("flower_identity")

RUN_CONFIG = {"classes": ",".join(str(d) for d in range(10)), "image-size": 32, "local-epochs": 3, "lr": 0.01}


def _context(tmp_path, data_dir, **extra):
    node_config = {"data-dir": str(data_dir), "site-name": "st-olav", "state-dir": str(tmp_path / "site-state"), **extra}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=RUN_CONFIG)


def _message(kind: str, sha256: str) -> Message:
    model = build_split_model(build_run_config(RUN_CONFIG))
    config = ConfigRecord({"server-round": 1, "backbone-sha256": sha256})
    return Message(content=RecordDict({"arrays": to_arrayrecord(model.trainable), "config": config}), dst_node_id=7, message_type=kind)


def test_train_sends_back_only_the_head_and_counts_backbone_passes(tmp_path, digits_npz):
    model = build_split_model(build_run_config(RUN_CONFIG))
    sha256, layout = model.weights_sha256, trainable_layout(model.trainable)
    context = _context(tmp_path, digits_npz)
    signed = {"run_id": "1", "server_round": 1}  # the site signs its reply for this run and round
    first = parse_train_reply(
        app(_message("train", sha256), context), layout=layout, backbone_sha256=sha256, max_examples=10**6, **signed
    )
    assert set(first.arrays.keys()) == {"head.weight", "head.bias"}
    assert first.metrics.num_examples == 1000
    assert (first.metrics.backbone_forwards_train, first.metrics.backbone_forwards_eval) == (1000, 300)
    assert first.site.name == "st-olav"
    second = parse_train_reply(
        app(_message("train", sha256), context), layout=layout, backbone_sha256=sha256, max_examples=10**6, **signed
    )
    assert (second.metrics.backbone_forwards_train, second.metrics.cache_hits) == (0, 2)
    assert first.receipt.public_key == second.receipt.public_key  # one key per site, kept in its state-dir
    receipts = read_receipts(tmp_path / "site-state")
    assert [r["update_sha256"] for r in receipts] == [first.update_sha256, second.update_sha256]
    assert [r["signature"] for r in receipts] == [first.receipt.signature, second.receipt.signature]
    with pytest.raises(ReplyError, match="signature does not match this reply"):  # replayed into another round
        parse_train_reply(app(_message("train", sha256), context), layout=layout, backbone_sha256=sha256,
                          max_examples=10**6, run_id="1", server_round=2)
    cache = tmp_path / "site-state" / "features"
    assert len(list(cache.glob("*.safetensors"))) == 2  # in the site's own state-dir
    evaluation = parse_evaluate_reply(app(_message("evaluate", sha256), context), backbone_sha256=sha256, max_examples=10**6)
    assert evaluation.metrics.num_examples == 300 and 0.0 <= evaluation.metrics.accuracy <= 1.0


def test_a_site_refuses_a_server_with_another_backbone(tmp_path, digits_npz):
    reply = app(_message("train", "0" * 64), _context(tmp_path, digits_npz))
    assert reply.has_error()
    assert "FingerprintError" in reply.error.reason and "provision the same weights" in reply.error.reason


def test_a_site_error_reaches_the_server_without_local_paths(tmp_path, digits):
    images, labels = digits
    secret = tmp_path / "patients-oslo" / "ward7.npz"
    secret.parent.mkdir()
    np.savez(secret, train_images=images[:50], train_labels=labels[:50] - 3)  # negative labels
    sha256 = build_split_model(build_run_config(RUN_CONFIG)).weights_sha256
    reply = app(_message("train", sha256), _context(tmp_path, secret))
    assert reply.has_error()
    assert reply.error.reason.startswith("DataError: the site's data failed a check")
    for private in ("patients-oslo", "ward7", str(tmp_path)):
        assert private not in reply.error.reason


def test_a_bad_node_config_is_refused_naming_the_key(tmp_path, digits_npz):
    reply = app(_message("train", "0" * 64), _context(tmp_path, digits_npz, device="tpu", colour="red"))
    assert reply.has_error() and reply.error.reason.startswith("ConfigError: the site's configuration")
    assert "colour" not in reply.error.reason  # the details stay in the site's log


def test_each_message_is_a_fresh_process_yet_the_site_warns_about_its_data_once_a_run(tmp_path, digits, caplog, monkeypatch):
    import logging

    import client.site_data
    from PIL import Image

    images, labels = digits
    data = tmp_path / "images"
    for i in range(40):
        (data / str(labels[i])).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(data / str(labels[i]) / f"{i}.png")
    (data / "0" / "export-log.txt").write_text("not an image")
    sha256 = build_split_model(build_run_config(RUN_CONFIG)).weights_sha256
    logger = logging.getLogger("client.site_data")
    monkeypatch.setattr(logger, "propagate", False)
    logger.addHandler(caplog.handler)
    try:
        for run_id, warned in ((1, True), (1, False), (2, True)):
            monkeypatch.setattr(client.site_data, "_NOTED", set())  # a deployment's ClientApp: a new process per message
            caplog.clear()
            context = _context(tmp_path, data)
            context.run_id = run_id
            assert not app(_message("evaluate", sha256), context).has_error()
            noted = [r.getMessage() for r in caplog.records if r.name == "client.site_data" and r.levelno == logging.WARNING]
            assert [("export-log.txt" in note) for note in noted] == ([True] if warned else []), (run_id, noted)
    finally:
        logger.removeHandler(caplog.handler)
    assert sorted(p.name for p in (tmp_path / "site-state" / "data-notes").iterdir()) == ["1.json", "2.json"]
