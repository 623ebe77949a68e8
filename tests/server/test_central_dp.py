"""Client-level DP at the server through the real ServerApp: Flower's wrappers clip, weigh equally, add noise, account."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.clipping_mod import clip_when_asked
from common.config import build_run_config
from common.errors import ConfigError
from common.model import build_split_model
from common.privacy import independent_central_epsilon
from common.round_record import load_round_records
from server.app import run_federation
from server.central_dp import calibrate_central_noise
from tests.server.scripted_grid import ScriptedGrid

NODES = (11, 12, 13)
EXAMPLES = {11: 10, 12: 100, 13: 1000}  # unequal: client-level DP must not weigh by them
EVAL = {"num-examples": 10, "backbone-forwards-eval": 0, "eval-loss": 1.0, "eval-accuracy": 0.5,
        "eval-precision": 0.5, "eval-recall": 0.5, "eval-f1": 0.5}


def _cfg(tmp_path, name, **changes):
    settings = dict(
        pretrained=False, image_size=32, num_server_rounds=3, dataset="digits",
        classes=",".join(str(d) for d in range(10)), run_dir=str(tmp_path), run_name=name, export_onnx=False,
        dp="central", sites_per_round=3, target_epsilon=3.0, central_clip_norm=0.5,
    )
    return build_run_config(**{**settings, **changes})


def _direction(node: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(node).standard_normal(shape).astype(np.float32)


def _run(cfg, *, clip_at_site: bool = False, unclipped_node: int | None = None):
    """Each node moves the head 2.0 (L2) along its own direction; returns the records and what was sent."""
    sha = build_split_model(cfg).weights_sha256
    sent: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    replied: dict[tuple[int, int], dict[str, np.ndarray]] = {}

    def respond(msg: Message) -> Message:
        node, server_round = msg.metadata.dst_node_id, msg.content["config"]["server-round"]
        site = ConfigRecord({"site-name": f"site-{node}", "backbone-sha256": sha, "skipped-images": 0})
        if msg.metadata.message_type == "evaluate":
            return Message(RecordDict({"metrics": MetricRecord(EVAL), "site": site}), reply_to=msg)
        arrays = {k: v.numpy() for k, v in msg.content["arrays"].items()}
        steps = {k: _direction(node * 10 + i, a.shape) for i, (k, a) in enumerate(arrays.items())}
        scale = 2.0 / np.sqrt(sum(float((s.astype(np.float64) ** 2).sum()) for s in steps.values()))
        new = {k: (arrays[k] + scale * steps[k]).astype(np.float32) for k in arrays}
        sent[(server_round, node)], replied[(server_round, node)] = arrays, new
        metrics = MetricRecord({
            "num-examples": EXAMPLES[node], "train-loss": 0.5, "epochs-run": 1, "backbone-forwards-train": 0,
            "backbone-forwards-eval": 0, "cache-hits": 0, "seconds": 1.0,
        })
        content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in new.items()}), "metrics": metrics, "site": site})
        reply = Message(content, reply_to=msg)
        if clip_at_site and node != unclipped_node:  # Flower's fixedclipping_mod, as the site's ClientApp runs it
            return clip_when_asked(msg, Context(0, 1, {}, RecordDict(), {}), lambda m, c: Message(content, reply_to=m))
        return reply

    from flwr.supercore.task_identity import TaskIdentity

    with pytest.MonkeyPatch.context() as patch:  # the identity Flower's runtime gives a ServerApp process
        for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
            patch.setattr(TaskIdentity, attr, value)
        try:
            run_federation(ScriptedGrid(NODES, respond), cfg)
        except RuntimeError:  # a failed run raises once its folder is written
            pass
    summary = json.loads(Path(cfg.run_dir, cfg.run_name, "summary.json").read_text())
    records = {r.round: r for r in load_round_records(f"{cfg.run_dir}/{cfg.run_name}/metrics.jsonl")}
    return summary, records, sent, replied


def _flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([a.ravel().astype(np.float64) for a in arrays.values()])


@pytest.fixture(scope="module")
def server_side(tmp_path_factory):
    cfg = _cfg(tmp_path_factory.mktemp("runs"), "central")
    return cfg, *_run(cfg)


def test_each_round_epsilon_is_flowers_and_an_independent_accountant_agrees(server_side):
    cfg, summary, records, *_ = server_side
    noise = calibrate_central_noise(target_epsilon=3.0, delta=cfg.target_delta, releases=3, sites=3)
    for k in (1, 2, 3):
        central = records[k].central_privacy
        assert central["released"] and central["releases"] == k and central["noise_multiplier"] == noise
        assert central["epsilon"] == pytest.approx(independent_central_epsilon(noise, k, cfg.target_delta), rel=1e-6)
    assert summary["status"] == "finished"
    assert summary["client_epsilon"] == pytest.approx(3.0, rel=0.005) and summary["client_epsilon"] <= 3.0
    assert summary["privacy"]["central"]["clipping"] == "server" and summary["max_epsilon"] is None


def test_updates_are_clipped_weighed_equally_and_noised(server_side):
    cfg, _, records, sent, replied = server_side
    central = records[1].central_privacy
    for k in (1, 2, 3):
        start = _flat(sent[(k, NODES[0])])
        clipped = []
        for node in NODES:
            update = _flat(replied[(k, node)]) - start
            clipped.append(update * min(1.0, cfg.central_clip_norm / np.linalg.norm(update)))
        plain_mean = start + np.mean(clipped, axis=0)  # equal weights despite 10, 100 and 1000 examples
        after = _flat(sent[(k + 1, NODES[0])]) if k < 3 else None
        if after is None:
            continue
        noise = after - plain_mean
        # 12,810 coordinates of N(0, stdev^2): the sample stdev lies within 3% of it
        assert noise.std() == pytest.approx(central["noise_stdev"], rel=0.03)
        assert abs(noise.mean()) < 0.05 * central["noise_stdev"]


def test_client_side_clipping_by_flowers_mod_and_an_unclipped_site_is_rejected(tmp_path):
    cfg = _cfg(tmp_path, "client-clip", central_clipping="client")
    summary, records, sent, replied = _run(cfg, clip_at_site=True, unclipped_node=13)
    for k in (1, 2, 3):
        norms = {name: site.train.update_l2_norm for name, site in records[k].sites.items() if site.train and site.train.accepted}
        assert set(norms) == {"site-11", "site-12"} and all(n == pytest.approx(0.5, rel=1e-4) for n in norms.values())
        (problem,) = records[k].problems
        assert problem.node_id == 13 and "exceeds the clip norm 0.5" in problem.reasons[0]
        # the noise was calibrated for three sites: with two, nothing is released and the model stays
        assert not records[k].central_privacy["released"] and records[k].aggregated_sites == []
        assert records[k].head_sha256_after == records[k].head_sha256_before
    assert summary["status"] == "failed" and summary["client_epsilon"] == 0.0


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"strategy": "fedadam"}, "needs FedAvg's aggregation"),
        ({"sites_per_round": 0}, "fixed number of sites"),
        ({"central_clip_norm": 0.0}, "central-clip-norm"),
        ({"central_clipping": "adaptive"}, "choose one of server, client"),
    ],
)
def test_central_dp_settings_are_checked(tmp_path, changes, words):
    with pytest.raises(ConfigError, match=words):
        _cfg(tmp_path, "x", **changes)
