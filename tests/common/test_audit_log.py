"""The signed audit log of a real ServerApp run: it verifies, and every kind of tampering is caught at its record."""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from typer.testing import CliRunner

from common.audit_log import format_line, record_sha256
from common.audit_verify import cross_check, verify_run
from common.config import build_run_config
from common.model import build_split_model
from common.paths import FEDHEAD_HOME_ENV
from common.privacy import DPEvent, epsilon_spent
from common.hashing import sha256_arrays
from common.protocol import PrivacyReport, Receipt, SiteInfo, TrainMetrics, build_train_content, receipt_payload
from common.errors import DataError
from common.receipt_ledger import append_receipt, read_receipts
from common.signing import load_or_create_key, public_hex, public_pem, sign_hex
from server.app import run_federation
from simulations.cli import app
from tests.server.scripted_grid import ScriptedGrid

NODES = (21, 22)
EVAL = {"num-examples": 10, "backbone-forwards-eval": 0, "eval-loss": 1.0, "eval-accuracy": 0.5,
        "eval-precision": 0.5, "eval-recall": 0.5, "eval-f1": 0.5}
EVENT = DPEvent(1.1, 0.05, 40, 1.0, "rdp")
RELEASE = DPEvent(5.0, 1.0, 1, 40.0, "rdp")  # site-22's feature-mean release, in its first round


@pytest.fixture(scope="module")
def signed_run(tmp_path_factory):
    """A 3-round run under both DPs (the sites' DP events scripted, the server's wrapper real), with its audit log."""
    home = tmp_path_factory.mktemp("home")
    cfg = build_run_config(
        pretrained=False, image_size=32, num_server_rounds=3, dataset="digits",
        classes=",".join(str(d) for d in range(10)), run_dir=str(tmp_path_factory.mktemp("runs")), run_name="audited", export_onnx=False,
        dp="both", sites_per_round=2, target_epsilon=8.0, central_clip_norm=1.0,
    )
    sha = build_split_model(cfg).weights_sha256
    rounds_done: dict[int, int] = {}
    site_keys = {node: load_or_create_key(home / f"site-{node}.pem") for node in NODES}

    def respond(msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        site = SiteInfo(f"site-{node}", sha)
        if msg.metadata.message_type == "evaluate":
            return Message(RecordDict({"metrics": MetricRecord(EVAL), "site": site.to_record()}), reply_to=msg)
        rounds_done[node] = rounds_done.get(node, 0) + 1
        releases = [RELEASE] if node == 22 else []
        events = [*releases, *[EVENT] * rounds_done[node]]
        epsilon = epsilon_spent(events, delta=cfg.target_delta, accountant="rdp")
        privacy = PrivacyReport(EVENT, cfg.target_delta, epsilon, epsilon, release=releases[0] if releases else None)
        arrays = ArrayRecord({k: Array(v.numpy() + np.float32(0.001 * node)) for k, v in msg.content["arrays"].items()})
        metrics = TrainMetrics(num_examples=100, train_loss=None, epochs_run=1, backbone_forwards_train=100,
                               backbone_forwards_eval=0, cache_hits=0, seconds=1.0)
        content = build_train_content(arrays, metrics, site, privacy)
        fields = dict(  # what client.receipts.sign_train_reply signs at a real site, and keeps in its ledger
            run_id="7", server_round=msg.content["config"]["server-round"], site=site.name, num_examples=100,
            update_sha256=sha256_arrays({k: arrays[k].numpy() for k in arrays}), privacy=privacy.to_json(),
        )
        key = site_keys[node]
        receipt = Receipt(public_hex(key), sign_hex(key, receipt_payload(**fields)))
        append_receipt(home / f"site-{node}", {**fields, **receipt.to_json()})
        content["receipt"] = receipt.to_record()
        return Message(content, reply_to=msg)

    from flwr.supercore.task_identity import TaskIdentity

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FEDHEAD_HOME_ENV, str(home))
        for attr, value in (("_run_id", 1), ("_task_id", 1), ("_node_id", 0)):
            patch.setattr(TaskIdentity, attr, value)
        run_federation(ScriptedGrid(NODES, respond), cfg, run_id="7")
    run_dir = Path(cfg.run_dir) / "audited"
    key = public_hex(load_or_create_key(home / "keys" / "server-audit.pem"))
    return run_dir, key, home


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]


def _write(run_dir: Path, records: list[dict]) -> None:
    (run_dir / "audit.jsonl").write_text("".join(format_line(r) + "\n" for r in records))


def _copy(signed_run, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(signed_run[0], out)
    return out


def _resign(records: list[dict], key) -> None:
    """Rebuild a whole, internally consistent chain signed by ``key`` (what a forger with that key can do)."""
    prev = "0" * 64
    for record in records:
        record["prev_sha256"] = prev
        record["sha256"] = record_sha256(record)
        record["signature"] = sign_hex(key, record["sha256"].encode())
        prev = record["sha256"]


def _first_round(records: list[dict]) -> int:
    return next(i for i, r in enumerate(records) if r["kind"] == "round" and r["content"]["record"]["round"] == 1)


def test_an_untouched_log_verifies_with_every_epsilon_recomputed(signed_run):
    run_dir, key, _ = signed_run
    records = _records(run_dir)
    assert [r["kind"] for r in records][0] == "run-start" and records[-1]["kind"] == "run-end"
    assert records[0]["content"]["server_public_key"] == key and records[0]["run_id"] == "7"
    assert (run_dir / "server.pub").is_file()
    report = verify_run(run_dir, key=key)
    assert report.ok, report.problems
    # each site's each round, the server's each round, and the declared client-level budget
    assert report.rounds == 3 and report.epsilons_checked == 2 * 3 + 3 + 1
    assert report.site_signatures == 2 * 3
    weights = records[_first_round(records)]["content"]["aggregation"]["weights"]
    assert weights == {"site-21": 0.5, "site-22": 0.5}


def test_the_cli_prints_one_line_and_exits_0(signed_run, tmp_path):
    run_dir, key, _ = signed_run
    (tmp_path / "server.hex").write_text(key)
    result = CliRunner().invoke(app, ["audit", "verify", str(run_dir), "--key", str(tmp_path / "server.hex")])
    assert result.exit_code == 0, result.output
    assert "audit log verified" in result.output and len(result.output.strip().splitlines()) == 1


def _changed(records, index):
    records[index]["content"]["record"]["sites"]["site-21"]["train"]["num_examples"] = 1_000_000
    return index, "does not hash to its sha256"


def _rehashed(records, index):
    records[index]["content"]["record"]["sites"]["site-21"]["train"]["num_examples"] = 1_000_000
    records[index]["sha256"] = record_sha256(records[index])
    return index, "signature does not verify"


def _removed(records, index):
    del records[index]
    return index, "sequence number"


def _swapped(records, index):
    records[index], records[index + 1] = records[index + 1], records[index]
    return index, "sequence number"


def _cut_off(records, index):
    del records[-1]
    return len(records) - 1, "does not end with its one run-end record"


@pytest.mark.parametrize("tamper", [_changed, _rehashed, _removed, _swapped, _cut_off])
def test_tampering_is_caught_at_the_record_it_touched(signed_run, tmp_path, tamper):
    run_dir = _copy(signed_run, tmp_path)
    records = _records(run_dir)
    index, words = tamper(records, _first_round(records))
    _write(run_dir, records)
    report = verify_run(run_dir, key=signed_run[1])
    assert any(p.startswith(f"record {index} ") and words in p for p in report.problems), report.problems
    result = CliRunner().invoke(app, ["audit", "verify", str(run_dir)])
    assert result.exit_code == 1 and f"record {index} " in result.output


def test_a_log_re_signed_by_another_key_fails_against_the_pinned_one_and_a_wrong_epsilon_is_named(signed_run, tmp_path):
    run_dir = _copy(signed_run, tmp_path)
    records = _records(run_dir)
    index = _first_round(records)
    records[index]["content"]["record"]["sites"]["site-22"]["train"]["privacy"]["epsilon_run"] = 0.01
    forger = load_or_create_key(tmp_path / "forger.pem")
    records[0]["content"]["server_public_key"] = public_hex(forger)
    _resign(records, forger)
    _write(run_dir, records)
    pinned = verify_run(run_dir, key=signed_run[1])
    assert any(p.startswith("record 0 ") and "not the pinned key" in p for p in pinned.problems)
    unpinned = verify_run(run_dir)
    assert any(p.startswith(f"record {index} ") and "site-22: reported epsilon 0.01" in p for p in unpinned.problems)
    # the site signed its real epsilon: the server's own key cannot make it say another
    assert any(p.startswith(f"record {index} ") and "site-22: the site's signature does not match" in p
               for p in unpinned.problems)


def test_an_epsilon_that_leaves_out_a_recorded_feature_mean_release_is_named(signed_run, tmp_path):
    run_dir = _copy(signed_run, tmp_path)
    records = _records(run_dir)
    index = _first_round(records)
    privacy = records[index]["content"]["record"]["sites"]["site-22"]["train"]["privacy"]
    assert privacy["feature_mean_release"] == RELEASE.to_json()
    privacy["epsilon_run"] = epsilon_spent([EVENT], delta=1e-5, accountant="rdp")  # the DP-SGD alone
    _resign(records, load_or_create_key(signed_run[2] / "keys" / "server-audit.pem"))
    _write(run_dir, records)
    problems = verify_run(run_dir, key=signed_run[1]).problems
    assert any(p.startswith(f"record {index} ") and "site-22: reported epsilon" in p and "its 2 recorded DP events" in p
               for p in problems), problems


@pytest.mark.parametrize("change, named", [
    (lambda release: release.update(noise_multiplier=6.0), "a second, different feature-mean release"),
    (lambda release: release.update(steps=3), "is not one Gaussian release"),
    (lambda release: release.clear(), "malformed record"),
])
def test_a_feature_mean_release_is_one_gaussian_release_a_run(signed_run, tmp_path, change, named):
    run_dir = _copy(signed_run, tmp_path)
    records = _records(run_dir)
    index = _first_round(records) + 1  # round 2 (or its evaluate record): the first round's release stands
    while records[index]["kind"] != "round":
        index += 1
    change(records[index]["content"]["record"]["sites"]["site-22"]["train"]["privacy"]["feature_mean_release"])
    _resign(records, load_or_create_key(signed_run[2] / "keys" / "server-audit.pem"))
    _write(run_dir, records)
    problems = verify_run(run_dir, key=signed_run[1]).problems
    assert any(p.startswith(f"record {index} ") and named in p for p in problems), problems


def test_a_server_that_strips_a_sites_release_breaks_the_sites_signature(signed_run, tmp_path):
    run_dir = _copy(signed_run, tmp_path)
    records = _records(run_dir)
    index = _first_round(records)
    del records[index]["content"]["record"]["sites"]["site-22"]["train"]["privacy"]["feature_mean_release"]
    _resign(records, load_or_create_key(signed_run[2] / "keys" / "server-audit.pem"))
    _write(run_dir, records)
    problems = verify_run(run_dir, key=signed_run[1]).problems
    assert any(p.startswith(f"record {index} ") and "site-22: the site's signature does not match" in p for p in problems)


def test_a_log_re_signed_by_another_key_disagrees_with_the_run_folders_server_pub(signed_run, tmp_path):
    run_dir = _copy(signed_run, tmp_path)
    records = _records(run_dir)
    forger = load_or_create_key(tmp_path / "forger.pem")
    records[0]["content"]["server_public_key"] = public_hex(forger)
    _resign(records, forger)
    _write(run_dir, records)
    assert verify_run(run_dir).problems == [
        f"server.pub: holds key {signed_run[1][:16]}..., but the log is signed by {public_hex(forger)[:16]}...: "
        "one of them was replaced; pin the server key you trust with --key"
    ]
    (run_dir / "server.pub").write_bytes(public_pem(forger))  # a forger who replaces both: only a pinned key tells
    assert verify_run(run_dir).ok and not verify_run(run_dir, key=signed_run[1]).ok
    (run_dir / "server.pub").write_text("not a key")
    assert any(p.startswith("server.pub: cannot be read") for p in verify_run(run_dir).problems)


def test_the_server_cannot_invent_or_alter_a_sites_update_even_with_its_own_key(signed_run, tmp_path):
    run_dir = _copy(signed_run, tmp_path)
    records = _records(run_dir)
    index = _first_round(records)
    records[index]["content"]["record"]["sites"]["site-21"]["train"]["update_sha256"] = "ab" * 32
    del records[index]["content"]["record"]["sites"]["site-22"]["train"]["receipt"]
    _resign(records, load_or_create_key(signed_run[2] / "keys" / "server-audit.pem"))
    _write(run_dir, records)
    problems = verify_run(run_dir, key=signed_run[1]).problems
    assert len(problems) == 2, problems
    assert problems[0].startswith(f"record {index} ") and "site-21: the site's signature does not match" in problems[0]
    assert problems[1].startswith(f"record {index} ") and "site-22: the update carries no site signature" in problems[1]


def test_pinned_site_keys_are_held_to(signed_run, tmp_path):
    other = public_hex(load_or_create_key(tmp_path / "other.pem"))
    problems = verify_run(signed_run[0], key=signed_run[1], site_keys={"site-21": other}).problems
    assert len(problems) == 3 and all("site-21: signed by key" in p and "not the pinned key" in p for p in problems)


def test_a_swapped_saved_head_is_caught_at_the_run_end_record(signed_run, tmp_path):
    run_dir = _copy(signed_run, tmp_path)
    from safetensors.numpy import load_file, save_file

    head = load_file(str(run_dir / "model" / "head.safetensors"))
    head["head.bias"] = head["head.bias"] + 1
    save_file(head, str(run_dir / "model" / "head.safetensors"))
    problems = verify_run(run_dir, key=signed_run[1]).problems
    last = len(_records(run_dir)) - 1
    assert problems and all(p.startswith(f"record {last} ") for p in problems)
    assert "head.safetensors hashes to" in problems[0] and "not the file's" in problems[1]


def test_any_flipped_byte_is_caught(signed_run, tmp_path):
    run_dir = _copy(signed_run, tmp_path)
    original = (run_dir / "audit.jsonl").read_bytes()
    rng = random.Random(0)
    spaces = [i for i, b in enumerate(original) if b == ord(" ")]
    for position in rng.sample(range(len(original)), 30) + spaces[:5]:
        damaged = bytearray(original)
        damaged[position] = ord("\t") if position in spaces else (damaged[position] + rng.randrange(1, 256)) % 256
        (run_dir / "audit.jsonl").write_bytes(bytes(damaged))
        report = verify_run(run_dir, key=signed_run[1])
        assert not report.ok, f"a changed byte at {position} went unnoticed"


@pytest.mark.parametrize(
    ("change", "record"),
    [
        pytest.param(lambda b: b.replace(b"\n", b"\r\n"), 0, id="crlf-endings"),
        pytest.param(lambda b: b.replace(b"\n", b"\r", 2).replace(b"\r", b"\n", 1), 1, id="one-cr-for-a-newline"),
        pytest.param(lambda b: b[:-1], -1, id="last-newline-removed"),
    ],
)
def test_changed_line_endings_are_caught_at_the_record(signed_run, tmp_path, change, record):
    run_dir = _copy(signed_run, tmp_path)
    path = run_dir / "audit.jsonl"
    original = path.read_bytes()
    count = original.count(b"\n")
    path.write_bytes(change(original))
    report = verify_run(run_dir, key=signed_run[1])
    index = record % count
    assert not report.ok
    assert any(p.startswith(f"record {index} (line {index + 1})") for p in report.problems), report.problems


def _round_of(records, k=1):
    return next(r for r in records if r["kind"] == "round" and r["content"]["record"]["round"] == k)


def _central(records):
    return _round_of(records)["content"]["record"]["central_privacy"]


# What a server holding its own key might write: each must be named, none may crash the verifier.
FORGERIES = {
    "sites as a list": (lambda rs: _round_of(rs)["content"]["record"].update(sites=[1, 2]), "malformed record"),
    "a string where a site is": (lambda rs: _round_of(rs)["content"]["record"]["sites"].update({"site-21": "x"}), "malformed"),
    "a second run-start": (lambda rs: rs.insert(2, json.loads(json.dumps(rs[0]))), "one run-start"),
    "a release hidden": (lambda rs: _central(rs).update(released=False), "released=False, but the head changed"),
    "a wrong client-level delta": (lambda rs: _central(rs).update(delta=0.5), "client-level delta 0.5"),
    "noise for more sites": (lambda rs: _central(rs).update(sites_per_round=100), "client-level sites_per_round 100"),
    "unequal weights": (
        lambda rs: _round_of(rs)["content"]["aggregation"].update(weights={"site-21": 0.9, "site-22": 0.1}), "not the equal ones"
    ),
    "a bigger declared budget": (lambda rs: rs[0]["content"]["privacy"]["central"].update(planned_epsilon=500.0), "declared client-level budget"),
    "an aggregated site without an accepted update": (
        lambda rs: _round_of(rs)["content"]["record"]["sites"]["site-21"]["train"].update(accepted=False), "aggregated without an accepted"
    ),
    "a smaller client epsilon at the end": (lambda rs: rs[-1]["content"].update(client_epsilon=0.1), "client_epsilon 0.1"),
    "more rounds completed at the end": (lambda rs: rs[-1]["content"].update(rounds_completed=99), "rounds_completed 99"),
    "a junk problem record": (lambda rs: rs.insert(2, {**rs[2], "kind": "problem", "content": {"round": "x"}}), "problem record needs"),
    "an event too noisy to recompute": (  # would take the independent accountant hours
        lambda rs: _round_of(rs)["content"]["record"]["sites"]["site-21"]["train"]["privacy"]["event"].update(
            noise_multiplier=0.05, sample_rate=1.0), "outside what is recomputed"),
    "an event of 1e11 steps": (
        lambda rs: _round_of(rs)["content"]["record"]["sites"]["site-21"]["train"]["privacy"]["event"].update(steps=10**11),
        "this site's privacy is unverified"),
}


@pytest.mark.parametrize("name", list(FORGERIES))
def test_what_the_server_could_write_with_its_own_key_is_named(signed_run, tmp_path, name):
    run_dir = _copy(signed_run, tmp_path)
    records = _records(run_dir)
    forge, words = FORGERIES[name]
    forge(records)
    for index, record in enumerate(records):
        record["seq"] = index
    _resign(records, load_or_create_key(signed_run[2] / "keys" / "server-audit.pem"))
    _write(run_dir, records)
    problems = verify_run(run_dir, key=signed_run[1]).problems
    assert any(words in p for p in problems), problems


# The report (`fedhead report`) of the same run: built from the signed log, its verification at the top.

def _report(run_dir: Path, out: Path):
    result = CliRunner().invoke(app, ["report", str(run_dir), "--out", str(out)])
    return result, out.read_text() if out.exists() else ""


def test_the_report_of_a_verified_run_says_so_and_shows_every_round(signed_run, tmp_path):
    run_dir = signed_run[0]
    result, html = _report(run_dir, tmp_path / "report.html")
    assert result.exit_code == 0 and "audit log verified" in result.output, result.output
    assert "Verified: audited: audit log verified: 6 records, 3 rounds" in html
    rounds = html.split('id="round-table"', 1)[1].split("</table>", 1)[0]
    assert rounds.count("<tr>") == 1 + 4 and "site-21, site-22" in rounds
    records = _records(run_dir)
    last = records[-2]["content"]["record"]  # the last round, as signed
    assert f"{last['central_privacy']['epsilon']:.3f}" in rounds and last["head_sha256_after"][:12] in rounds
    assert html.count('src="data:image/png;base64,') == 5 and 'id="confusion-table"' in html
    assert "default-src 'none'" in html and "http://" not in html and "https://" not in html
    assert str(tmp_path.parent) not in html and str(run_dir) not in html
    assert "not signed" not in html  # every figure is the signed log's


def test_a_report_of_a_tampered_log_is_written_and_flags_the_record(signed_run, tmp_path):
    run_dir = _copy(signed_run, tmp_path)
    records = _records(run_dir)
    index, words = _changed(records, _first_round(records))
    _write(run_dir, records)
    result, html = _report(run_dir, tmp_path / "report.html")
    assert result.exit_code == 0 and "problem(s) in the audit log" in result.output
    assert "The audit log does not verify" in html
    assert any(line.startswith(f"record {index} (line {index + 1}): ") and words in line for line in html.split("<li>"))


def test_a_run_without_a_log_is_reported_from_its_metrics_unsigned(signed_run, tmp_path):
    run_dir = _copy(signed_run, tmp_path)
    (run_dir / "audit.jsonl").unlink()
    result, html = _report(run_dir, tmp_path / "report.html")
    assert result.exit_code == 0 and "no audit log" in result.output
    assert "nothing on this page is signed" in html and html.count("<tr>") > 4
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "is not a run folder" in missing.output


def test_a_report_of_a_log_cut_off_before_its_run_end_marks_the_figures_it_takes_from_summary_json(signed_run, tmp_path):
    run_dir = _copy(signed_run, tmp_path)
    lines = (run_dir / "audit.jsonl").read_text().splitlines(keepends=True)
    (run_dir / "audit.jsonl").write_text("".join(lines[:-1]))
    result, html = _report(run_dir, tmp_path / "report.html")
    assert result.exit_code == 0 and "1 problem(s) in the audit log" in result.output, result.output
    banner = html.split('class="verdict bad"', 1)[1].split("</div>", 1)[0]
    assert "The log has no run-end record:" in banner and "come from the run folder's <code>summary.json</code>, which nobody signed" in banner
    facts = dict(re.findall(r"<tr><th>([^<]+)</th><td>(.*?)</td></tr>", html.split('id="facts-table"', 1)[1].split("</table>", 1)[0]))
    unsigned = '<span class="unsigned">(from summary.json, not signed)</span>'
    for label in ("status", "rounds", "final accuracy", "record-level epsilon", "client-level DP"):
        assert facts[label].endswith(unsigned), (label, facts[label])
    assert unsigned not in facts["strategy"] and unsigned not in facts["run id"]  # the run-start record is still there
    confusion = html.split('id="confusion"', 1)[1].split('id="confusion-table"', 1)[0]
    assert "This matrix is from summary.json, not signed: the audit log has no run-end record." in confusion
    assert "where the log lacks its run-end record, from its unsigned summary.json" in html


def test_the_versions_row_is_summary_json_s_marked_unsigned_where_the_run_start_record_has_none():
    from server.report import RunEvidence, _facts

    summary = {"versions": {"fedhead": "0.1.0", "torch": "2.5.1"}}
    evidence = RunEvidence("run", [], "audit log", start={"strategy": "fedavg"}, end={}, summary=summary, end_signed=True)
    facts = {label: (value, note) for label, value, note in _facts(evidence, summary)}
    assert facts["versions"] == ("fedhead 0.1.0, torch 2.5.1", "from summary.json, not signed")
    evidence.start["versions"] = {"torch": "2.6.0"}  # the signed record's own, where it has them
    facts = {label: (value, note) for label, value, note in _facts(evidence, summary)}
    assert facts["versions"] == ("torch 2.6.0", "")


def test_an_empty_log_is_named_empty_by_verify_and_report(signed_run, tmp_path):
    run_dir = _copy(signed_run, tmp_path)
    for content in ("", "\n \n\n"):
        (run_dir / "audit.jsonl").write_text(content)
        result = CliRunner().invoke(app, ["audit", "verify", str(run_dir)])
        assert result.exit_code == 1 and not isinstance(result.exception, Exception), result.output
        assert result.output.splitlines()[0].startswith("fedhead: audit.jsonl: the log is empty (no records)"), result.output
        assert "record -1" not in result.output and "line 0" not in result.output and "Traceback" not in result.output
    result, html = _report(run_dir, tmp_path / "report.html")
    assert result.exit_code == 0 and "1 problem(s) in the audit log" in result.output, result.output
    assert "<li>audit.jsonl: the log is empty (no records)" in html and "record -1" not in html
    assert "The log has no run-start record and no run-end record:" in html


def _boom(*args, **kwargs):
    raise AssertionError("the page was drawn before its output path was checked")


def test_report_names_an_out_path_it_cannot_write_before_drawing_the_page(signed_run, tmp_path, monkeypatch):
    import server.report

    run_dir = signed_run[0]
    (tmp_path / "file.txt").write_text("a file, not a folder")
    monkeypatch.setattr(server.report, "load_evidence", _boom)
    for out, why in ((tmp_path / "file.txt" / "out.html", "is not a folder"), (tmp_path / "missing" / "out.html", "does not exist")):
        result = CliRunner().invoke(app, ["report", str(run_dir), "--out", str(out)])
        assert result.exit_code == 2 and not isinstance(result.exception, AssertionError), result.output
        assert result.output.strip() == f"fedhead: cannot write the report to {out}: {out.parent} {why}; " \
                                         "give a file in a folder that exists and you can write, e.g. --out report.html"
    assert not (tmp_path / "missing").exists()
    with monkeypatch.context() as patch:  # a folder this user cannot write (tests run as root, so chmod cannot show it)
        patch.setattr(server.report.tempfile, "TemporaryFile", lambda **kw: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
        result = CliRunner().invoke(app, ["report", str(run_dir), "--out", str(tmp_path / "report.html")])
        default = CliRunner().invoke(app, ["report", str(run_dir)])  # a run folder on a read-only disk
    assert result.exit_code == 2 and f"cannot write the report to {tmp_path / 'report.html'}: {tmp_path} cannot be written " \
                                     "(Permission denied)" in result.output, result.output
    assert default.exit_code == 2 and default.output.strip().endswith("(Permission denied); write the page elsewhere with --out FILE.html")


def test_report_names_the_users_path_when_the_write_itself_fails(signed_run, tmp_path, monkeypatch):
    import server.report

    def refuse(path, data, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / ".report.x1y2.tmp.html"))

    monkeypatch.setattr(server.report, "render_report", lambda ev: "<html></html>")
    monkeypatch.setattr(server.report, "write_bytes_atomic", refuse)
    out = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", str(signed_run[0]), "--out", str(out)])
    assert result.exit_code == 2 and result.output.startswith(f"fedhead: cannot write the report to {out} (Permission denied)"), result.output
    assert ".tmp" not in result.output and len(result.output.strip().splitlines()) == 1


def test_paths_quoted_in_failures_are_redacted():
    from server.report import redact_paths

    text = "DataError: /srv/oslo/images/scan 3.png cannot be read; C:\\data\\x.dcm too; ~/state/keys is fine?"
    assert redact_paths(text) == "DataError: <path> 3.png cannot be read; <path> too; <path> is fine?"
    assert redact_paths("round 2: Node Unavailable (1/2)") == "round 2: Node Unavailable (1/2)"


def test_a_report_of_a_hostile_log_is_still_written(signed_run, tmp_path):
    run_dir = _copy(signed_run, tmp_path)
    records = _records(run_dir)
    index = _first_round(records)
    records[index]["content"]["record"]["central_privacy"] = {"epsilon": "lots"}
    records[index]["content"]["record"]["sites"]["site-21"]["train"]["privacy"] = ["not", "a", "dict"]
    records[0]["content"]["privacy"]["central"] = {"noise_multiplier": "loud"}
    _resign(records, load_or_create_key(signed_run[2] / "keys" / "server-audit.pem"))
    _write(run_dir, records)
    result, html = _report(run_dir, tmp_path / "report.html")
    assert result.exit_code == 0 and "problem(s) in the audit log" in result.output, result.output
    assert "The audit log does not verify" in html and "cannot be shown" in html


def _round_index(records, number):
    return next(i for i, r in enumerate(records) if r["kind"] == "round" and r["content"]["record"]["round"] == number)


def test_a_server_that_drops_a_sites_round_or_alters_its_epsilon_is_caught_by_the_sites_ledger(signed_run, tmp_path):
    """The server re-signs a consistent chain with its own key; only the site's own receipts can contradict it."""
    _, _, home = signed_run
    server_key = load_or_create_key(home / "keys" / "server-audit.pem")
    site_key = public_hex(load_or_create_key(home / "site-21.pem"))
    ledger = read_receipts(home / "site-21")
    assert [r["server_round"] for r in ledger] == [1, 2, 3]
    problems, agreed = cross_check(signed_run[0], ledger, site_key)
    assert problems == [] and len(agreed) == 3

    dropped = _copy(signed_run, tmp_path / "dropped")
    records = _records(dropped)
    index = _round_index(records, 2)
    record = records[index]["content"]["record"]
    del record["sites"]["site-21"]
    record["aggregated_sites"] = [s for s in record["aggregated_sites"] if s != "site-21"]
    _resign(records, server_key)
    _write(dropped, records)
    problems, _ = cross_check(dropped, ledger, site_key)
    assert len(problems) == 1 and problems[0].startswith("round 2: the site signed update ") \
        and "the log records neither it nor its rejection" in problems[0], problems

    altered = _copy(signed_run, tmp_path / "altered")
    records = _records(altered)
    index = _round_index(records, 1)
    records[index]["content"]["record"]["sites"]["site-21"]["train"]["privacy"]["epsilon_run"] /= 2
    _resign(records, server_key)
    _write(altered, records)
    problems, _ = cross_check(altered, ledger, site_key)
    assert problems == [f"record {index}: round 1: the log's privacy differ from the site's receipt"], problems


def test_a_damaged_site_ledger_is_named_not_a_traceback(signed_run, tmp_path):
    _, _, home = signed_run
    site_key = public_hex(load_or_create_key(home / "site-21.pem"))
    ledger = read_receipts(home / "site-21")
    damaged = [ledger[0], {**ledger[1], "site": ["site-21"]}, {**ledger[2], "server_round": [3]}]
    problems, agreed = cross_check(signed_run[0], damaged, site_key)
    assert len(agreed) == 1 and [p.split(":")[0] for p in problems[:2]] == ["receipt 2", "receipt 3"]
    assert all("is malformed: the site's ledger is damaged" in p for p in problems[:2])
    state = tmp_path / "site"
    state.mkdir()
    (state / "receipts.jsonl").write_bytes((home / "site-21" / "receipts.jsonl").read_bytes() + b"\xff\xfe\n")
    with pytest.raises(DataError, match="is not UTF-8 text"):
        read_receipts(state)


def test_report_never_writes_over_the_runs_own_files(signed_run, tmp_path):
    run_dir = _copy(signed_run, tmp_path)
    log = (run_dir / "audit.jsonl").read_bytes()
    for out in (run_dir / "audit.jsonl", run_dir / "model", run_dir / "summary.json"):
        result = CliRunner().invoke(app, ["report", str(run_dir), "--out", str(out)])
        assert result.exit_code == 2 and "give an .html file name" in result.output, result.output
    assert (run_dir / "audit.jsonl").read_bytes() == log


def test_the_exported_model_and_the_summary_are_held_to_the_signed_run_end(signed_run, tmp_path):
    run_dir = _copy(signed_run, tmp_path)
    report = verify_run(run_dir, key=signed_run[1])
    assert report.ok and report.model_files == 2  # model.pt2 and manifest.json (this run has no ONNX)
    program = bytearray((run_dir / "model" / "model.pt2").read_bytes())
    program[len(program) // 2] ^= 1
    (run_dir / "model" / "model.pt2").write_bytes(bytes(program))
    manifest = json.loads((run_dir / "model" / "manifest.json").read_text())
    manifest["output"]["classes"][0] = "renamed"
    (run_dir / "model" / "manifest.json").write_text(json.dumps(manifest))
    summary = json.loads((run_dir / "summary.json").read_text())
    summary["accuracy"] = 0.99
    (run_dir / "summary.json").write_text(json.dumps(summary))
    problems = verify_run(run_dir, key=signed_run[1]).problems
    end = len(_records(run_dir)) - 1
    assert [p.split(" hashes to")[0] for p in problems if " hashes to " in p] == [
        f"record {end} (line {end + 1}): model/manifest.json", f"record {end} (line {end + 1}): model/model.pt2"]
    assert any(p.startswith("summary.json: accuracy 0.99 is not the signed run-end record's") for p in problems), problems


def test_a_damaged_summary_and_a_missing_site_keys_folder_are_bad_input(signed_run, tmp_path):
    run_dir = _copy(signed_run, tmp_path)
    missing = CliRunner().invoke(app, ["audit", "verify", str(run_dir), "--site-keys", str(tmp_path / "no-such-folder")])
    assert missing.exit_code == 2 and "give a folder holding one <site-name>.pub" in missing.output
    (run_dir / "summary.json").write_text("{damaged")
    shown = CliRunner().invoke(app, ["show", str(run_dir)])
    assert shown.exit_code == 2 and "its summary or metrics cannot be read" in shown.output
    assert any(p.startswith("summary.json: cannot be read as JSON") for p in verify_run(run_dir).problems)


def test_a_receipt_changed_in_the_sites_ledger_is_blamed_on_the_ledger_not_the_log(signed_run):
    _, _, home = signed_run
    site_key = public_hex(load_or_create_key(home / "site-21.pem"))
    ledger = read_receipts(home / "site-21")
    changed = json.loads(json.dumps(ledger))
    changed[0]["privacy"]["epsilon_run"] /= 2
    problems, agreed = cross_check(signed_run[0], changed, site_key)
    assert problems == ["receipt of round 1: its signature does not match its own contents: "
                        "the site's ledger was changed after the site signed it"], problems
    assert len(agreed) == 2
