"""Malformed and hostile replies through the real ServerApp: each rejected with its reason, the run goes on."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict

from common.config import build_run_config
from common.model import build_split_model
from common.round_record import load_round_records
from server.app import run_federation
from tests.server.scripted_grid import ScriptedGrid

pytestmark = pytest.mark.usefixtures("flower_identity")

GOOD_NODE = 1000
# Nodes that train well and send a malformed recall per class in round 1's evaluation: (recall record, reason).
BAD_RECALL = {
    2001: ({"12": 0.5}, "class-recall key '12' is not a class index 0..9"),
    2002: ({"3": 1.5}, "class-recall of class 3 must be a number in [0, 1], got 1.5"),
    2003: ({"-1": 0.5}, "class-recall key '-1' is not a class index"),
}
GOOD_RECALL = {"0": 1.0, "7": 0.25}
METRICS = {
    "num-examples": 100, "train-loss": 0.5, "epochs-run": 1, "backbone-forwards-train": 100,
    "backbone-forwards-eval": 10, "cache-hits": 0, "seconds": 1.0,
}
EVAL = {"num-examples": 10, "backbone-forwards-eval": 0, "eval-loss": 1.0, "eval-accuracy": 0.5,
        "eval-precision": 0.5, "eval-recall": 0.5, "eval-f1": 0.5}


def _arrays(msg: Message, **changes) -> ArrayRecord:
    arrays = {k: v.numpy() + 0.01 for k, v in msg.content["arrays"].items()}
    for name, value in changes.items():
        if value is None:
            arrays.pop(name.replace("__", "."), None)
        else:
            arrays[name.replace("__", ".")] = value
    return ArrayRecord({k: (v if isinstance(v, Array) else Array(np.asarray(v))) for k, v in arrays.items()})


def _site(sha: str, **changes) -> ConfigRecord:
    record = {"site-name": "site", "backbone-sha256": sha, "skipped-images": 0}
    record.update(changes)
    return ConfigRecord({k: v for k, v in record.items() if v is not None})


def _content(msg, sha, *, arrays=None, metrics=None, site=None, drop=(), extra=None) -> RecordDict:
    records = {
        "arrays": arrays if arrays is not None else _arrays(msg),
        "metrics": MetricRecord({k: v for k, v in {**METRICS, **(metrics or {})}.items() if v is not None}),
        "site": site if site is not None else _site(sha),
    }
    for name in drop:
        records.pop(name)
    records.update(extra or {})
    return RecordDict(records)


def _nan(msg):
    w = msg.content["arrays"]["head.weight"].numpy().copy()
    w[0, 0] = np.nan
    return _arrays(msg, head__weight=w)


def _scaled(msg, value):
    w = np.full_like(msg.content["arrays"]["head.weight"].numpy(), value)
    return _arrays(msg, head__weight=w)


# (name, build(msg, sha) -> content or Error, expected words in the reason)
CASES = [
    ("error reply", lambda m, s: Error(code=2, reason="DataError: site data unreadable"), "site data unreadable"),
    ("no arrays record", lambda m, s: _content(m, s, drop=["arrays"]), "'arrays' record is missing"),
    ("no metrics record", lambda m, s: _content(m, s, drop=["metrics"]), "'metrics' record is missing"),
    ("no site record", lambda m, s: _content(m, s, drop=["site"]), "'site' record is missing"),
    ("extra array record", lambda m, s: _content(m, s, extra={"more": _arrays(m)}), "unexpected record 'more'"),
    ("extra config record", lambda m, s: _content(m, s, extra={"note": ConfigRecord({"a": 1})}), "unexpected record 'note'"),
    ("metrics as config", lambda m, s: _content(m, s, drop=["metrics"], extra={"metrics": ConfigRecord({"num-examples": 5})}), "'metrics' is a ConfigRecord"),
    ("num-examples missing", lambda m, s: _content(m, s, metrics={"num-examples": None}), "'num-examples' is missing"),
    ("num-examples 0", lambda m, s: _content(m, s, metrics={"num-examples": 0}), "'num-examples' = 0 is outside"),
    ("num-examples negative", lambda m, s: _content(m, s, metrics={"num-examples": -5}), "'num-examples' = -5 is outside"),
    ("num-examples 10^12", lambda m, s: _content(m, s, metrics={"num-examples": 10**12}), "is outside [1, 1e+06]"),
    ("num-examples float", lambda m, s: _content(m, s, metrics={"num-examples": 10.5}), "must be an integer"),
    ("num-examples list", lambda m, s: _content(m, s, metrics={"num-examples": [10, 20]}), "must be a number, got list"),
    ("loss NaN", lambda m, s: _content(m, s, metrics={"train-loss": float("nan")}), "'train-loss' is not finite"),
    ("loss inf", lambda m, s: _content(m, s, metrics={"train-loss": float("inf")}), "'train-loss' is not finite"),
    ("loss 1e38", lambda m, s: _content(m, s, metrics={"train-loss": 1e38}), "'train-loss' = 1e+38 is outside"),
    ("loss list", lambda m, s: _content(m, s, metrics={"train-loss": [0.1, 0.2]}), "must be a number, got list"),
    ("extra metric", lambda m, s: _content(m, s, metrics={"weight": 1e9}), "unexpected metric 'weight'"),
    ("metric missing", lambda m, s: _content(m, s, metrics={"seconds": None}), "'seconds' is missing"),
    ("seconds negative", lambda m, s: _content(m, s, metrics={"seconds": -1.0}), "'seconds' = -1.0 is outside"),
    ("no backbone hash", lambda m, s: _content(m, s, site=_site(s, **{"backbone-sha256": None})), "'backbone-sha256' is missing"),
    ("other backbone", lambda m, s: _content(m, s, site=_site("f" * 64)), "another backbone"),
    ("empty site name", lambda m, s: _content(m, s, site=_site(s, **{"site-name": ""})), "'site-name' must be"),
    ("site name a number", lambda m, s: _content(m, s, site=_site(s, **{"site-name": 7})), "'site-name' must be"),
    ("extra site key", lambda m, s: _content(m, s, site=_site(s, role="admin")), "unexpected site keys ['role']"),
    ("empty list in site record", lambda m, s: _content(m, s, site=_site(s, junk=[])), "unexpected site keys ['junk']"),
    ("empty string in site record", lambda m, s: _content(m, s, site=_site(s, junk="")), "unexpected site keys ['junk']"),
    ("skipped negative", lambda m, s: _content(m, s, site=_site(s, **{"skipped-images": -1})), "'skipped-images' must be"),
    ("array NaN", lambda m, s: _content(m, s, arrays=_nan(m)), "1 non-finite values"),
    ("array inf", lambda m, s: _content(m, s, arrays=_scaled(m, np.inf)), "non-finite values"),
    ("array 1e38", lambda m, s: _content(m, s, arrays=_scaled(m, 1e38)), "beyond the sane magnitude"),
    ("missing array", lambda m, s: _content(m, s, arrays=_arrays(m, head__bias=None)), "missing array 'head.bias'"),
    ("extra array", lambda m, s: _content(m, s, arrays=_arrays(m, backdoor=np.ones(3, np.float32))), "unexpected array 'backdoor'"),
    ("wrong shape", lambda m, s: _content(m, s, arrays=_arrays(m, head__weight=np.ones((10, 64), np.float32))), "has shape (10, 64)"),
    ("wrong dtype", lambda m, s: _content(m, s, arrays=_arrays(m, head__bias=np.zeros(10, np.float64))), "has dtype float64"),
    ("integer array", lambda m, s: _content(m, s, arrays=_arrays(m, head__bias=np.zeros(10, np.int32))), "has dtype int32"),
    ("garbage bytes", lambda m, s: _content(m, s, arrays=_arrays(m, head__bias=Array("float32", (10,), "numpy.ndarray", b"junk"))), "cannot be decoded"),
    ("foreign stype", lambda m, s: _content(m, s, arrays=_arrays(m, head__bias=Array("float32", (10,), "torch.save", b"junk"))), "cannot be decoded"),
]


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    return build_run_config(
        pretrained=False, image_size=32, num_server_rounds=2, dataset="digits",
        classes=",".join(str(d) for d in range(10)), run_dir=str(tmp_path_factory.mktemp("runs")), run_name="hostile", export_onnx=False,
    )


@pytest.fixture(scope="module")
def run(cfg):
    sha = build_split_model(cfg).weights_sha256
    node_case = {i: case for i, case in enumerate(CASES)}

    def respond(msg: Message) -> Message:
        node, server_round = msg.metadata.dst_node_id, msg.content["config"]["server-round"]
        if msg.metadata.message_type == "evaluate":
            site = _site(sha, **{"site-name": f"site-{node}"})
            recall = BAD_RECALL[node][0] if node in BAD_RECALL and server_round == 1 else GOOD_RECALL
            return Message(RecordDict({"metrics": MetricRecord(EVAL), "site": site, "class-recall": MetricRecord(recall)}), reply_to=msg)
        if node == GOOD_NODE or node in BAD_RECALL or server_round == 2:
            return Message(_content(msg, sha, site=_site(sha, **{"site-name": f"site-{node}"})), reply_to=msg)
        content = node_case[node][1](msg, sha)
        return Message(content, reply_to=msg)

    from flwr.supercore.task_identity import TaskIdentity

    grid = ScriptedGrid([*node_case, GOOD_NODE, *BAD_RECALL], respond)
    with pytest.MonkeyPatch.context() as patch:  # the identity Flower's runtime gives a ServerApp process
        for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
            patch.setattr(TaskIdentity, attr, value)
        summary = run_federation(grid, cfg)  # never raises on a bad reply
    records = load_round_records(f"{cfg.run_dir}/hostile/metrics.jsonl")
    return summary, {r.round: r for r in records}


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_each_malformed_reply_is_rejected_with_its_reason(run, index):
    _, records = run
    problems = [p for p in records[1].problems if p.node_id == index]
    assert len(problems) == 1, problems
    problem = problems[0]
    assert problem.kind == ("failed" if index == 0 else "rejected") and problem.phase == "train"
    assert any(CASES[index][2] in reason for reason in problem.reasons), problem.reasons


@pytest.mark.parametrize("node", sorted(BAD_RECALL))
def test_a_malformed_recall_per_class_rejects_the_evaluation_naming_it(run, node):
    _, records = run
    (problem,) = [p for p in records[1].problems if p.node_id == node]
    assert (problem.phase, problem.kind) == ("evaluate", "rejected")
    assert any(BAD_RECALL[node][1] in reason for reason in problem.reasons), problem.reasons
    assert records[1].sites[f"site-{node}"].evaluate.accepted is False


def test_a_sites_recall_per_class_is_recorded_by_class_index(run):
    _, records = run
    assert records[2].sites[f"site-{GOOD_NODE}"].evaluate.class_recall == GOOD_RECALL


def test_only_the_good_reply_is_aggregated_and_the_next_round_goes_on(run):
    summary, records = run
    assert len(CASES) >= 30
    assert sorted(records[1].aggregated_sites) == sorted(f"site-{n}" for n in (GOOD_NODE, *BAD_RECALL))
    assert records[1].head_sha256_after != records[1].head_sha256_before
    assert len(records[2].aggregated_sites) == len(CASES) + 1 + len(BAD_RECALL) and not records[2].problems
    assert records[2].head_sha256_before == records[1].head_sha256_after


def test_a_run_with_rejected_replies_is_degraded_and_they_count_for_nothing(run, cfg):
    summary, _ = run
    assert summary["status"] == "degraded" and summary["rounds_completed"] == 2
    assert "round 1: train" in summary["problems"]["node-5"][0]
    assert not any(name == "site" for name in summary["problems"])  # a rejected reply's claimed name is not taken
    good = summary["backbone_forwards"]["by_site"][f"site-{GOOD_NODE}"]
    assert good == {"train": 200, "eval": 20}  # two accepted train replies of 100 + 10 passes
    assert summary["backbone_forwards"]["by_site"]["site-5"] == {"train": 100, "eval": 10}  # round 2 only
    on_disk = json.loads((__import__("pathlib").Path(cfg.run_dir) / "hostile" / "summary.json").read_text())
    assert on_disk["status"] == "degraded"
