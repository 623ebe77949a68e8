"""The site's privacy ledger: composition across rounds, restarts and runs; never silently reset."""

from __future__ import annotations

import hashlib
import json

import pytest

from client.privacy_ledger import FEATURE_MEAN, LEDGER_FILE, LedgerError, PrivacyLedger
from common.hashing import sha256_json
from common.privacy import DPEvent, epsilon_spent, independent_epsilon

DATA_A = hashlib.sha256(b"site A training split").hexdigest()
DATA_B = hashlib.sha256(b"site A, another data set").hexdigest()


def _event(sigma: float, steps: int = 30) -> DPEvent:
    return DPEvent(sigma, 1 / 15, steps, 1.0, "rdp")


def test_two_runs_on_the_same_data_compose_into_one_lifetime_budget(tmp_path):
    run_1 = [_event(1.9), _event(1.9), _event(1.9)]
    run_2 = [_event(1.2, 45), _event(1.2, 45)]
    for server_round, event in enumerate(run_1, start=1):  # a fresh process each round: a fresh ledger object
        PrivacyLedger.in_state_dir(tmp_path).record(DATA_A, run_id="run-1", server_round=server_round, event=event)
    for server_round, event in enumerate(run_2, start=1):
        PrivacyLedger.in_state_dir(tmp_path).record(DATA_A, run_id="run-2", server_round=server_round, event=event)
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE).load()
    assert ledger.events(DATA_A) == run_1 + run_2
    lifetime = ledger.lifetime_epsilon(DATA_A, delta=1e-5, accountant="rdp")
    first = ledger.run_epsilon(DATA_A, run_id="run-1", delta=1e-5, accountant="rdp")
    second = ledger.run_epsilon(DATA_A, run_id="run-2", delta=1e-5, accountant="rdp")
    assert lifetime == epsilon_spent(run_1 + run_2, delta=1e-5, accountant="rdp")
    assert lifetime == pytest.approx(independent_epsilon(ledger.events(DATA_A), delta=1e-5), rel=1e-6)
    assert max(first, second) < lifetime <= first + second
    assert [e.server_round for e in ledger.entries(DATA_A, run_id="run-2")] == [1, 2]


def test_other_data_has_its_own_budget(tmp_path):
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE).load()
    ledger.record(DATA_A, run_id="r", server_round=1, event=_event(1.0, 300))
    ledger.record(DATA_B, run_id="r", server_round=1, event=_event(3.0))
    assert ledger.events(DATA_B) == [_event(3.0)]
    assert ledger.lifetime_epsilon(DATA_B, delta=1e-5, accountant="rdp") < ledger.lifetime_epsilon(DATA_A, delta=1e-5, accountant="rdp")
    assert ledger.lifetime_epsilon(hashlib.sha256(b"new").hexdigest(), delta=1e-5, accountant="rdp") == 0.0


def test_a_retried_round_that_trained_again_is_counted_again(tmp_path):
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE).load()
    first = ledger.record(DATA_A, run_id="r", server_round=4, event=_event(1.5))
    again = ledger.record(DATA_A, run_id="r", server_round=4, event=_event(1.5))
    assert (first.attempt, again.attempt) == (1, 2)
    assert ledger.lifetime_epsilon(DATA_A, delta=1e-5, accountant="rdp") == epsilon_spent([_event(1.5)] * 2, delta=1e-5, accountant="rdp")


def test_the_file_is_plain_json_written_without_temporary_leftovers(tmp_path):
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE).load()
    ledger.record(DATA_A, run_id="r", server_round=1, event=_event(1.5))
    data = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert data["datasets"][DATA_A][0]["event"] == _event(1.5).to_json()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEDGER_FILE, LEDGER_FILE + ".lock"]


def _recorded(tmp_path) -> tuple[PrivacyLedger, dict]:
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE).load()
    ledger.record(DATA_A, run_id="r", server_round=1, event=_event(1.5))
    ledger.record(DATA_A, run_id="r", server_round=2, event=_event(1.5))
    return ledger, json.loads(ledger.path.read_text())


def test_a_damaged_ledger_is_a_clear_error_and_is_not_reset(tmp_path):
    ledger, _ = _recorded(tmp_path)
    ledger.path.write_text('{"format": "fedhead-privacy-ledger", "version": 1, "datasets": {')
    with pytest.raises(LedgerError, match="not JSON") as caught:
        PrivacyLedger(ledger.path).load()
    assert str(ledger.path) in str(caught.value) and "not reset" in str(caught.value)
    with pytest.raises(LedgerError):
        ledger.record(DATA_A, run_id="r", server_round=3, event=_event(1.5))
    assert ledger.path.read_text().endswith('"datasets": {')  # left for the operator to restore
    ledger.path.write_bytes(b"\xff\xfe{}")
    with pytest.raises(LedgerError, match="not UTF-8 text"):
        PrivacyLedger(ledger.path).load()


def test_an_edited_ledger_fails_its_checksum(tmp_path):
    ledger, data = _recorded(tmp_path)
    data["datasets"][DATA_A][1]["event"]["noise_multiplier"] = 50.0  # someone lowers the recorded spend
    ledger.path.write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="checksum mismatch"):
        PrivacyLedger(ledger.path).load()


def test_every_structural_problem_is_reported(tmp_path):
    ledger, data = _recorded(tmp_path)
    entries = data["datasets"][DATA_A]
    entries[0]["server_round"] = "one"
    entries[1]["event"]["sample_rate"] = 2.0
    data["datasets"]["not-a-hash"] = []
    data["sha256"] = sha256_json(data["datasets"])  # a consistent checksum does not hide bad content
    ledger.path.write_text(json.dumps(data))
    with pytest.raises(LedgerError) as caught:
        PrivacyLedger(ledger.path).load()
    message = str(caught.value)
    assert "server_round='one'" in message and "sample_rate" in message and "not-a-hash" in message


def test_bad_arguments_are_refused(tmp_path):
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE).load()
    with pytest.raises(LedgerError, match="sha256"):
        ledger.record("abc", run_id="r", server_round=1, event=_event(1.5))
    with pytest.raises(LedgerError, match="run id"):
        ledger.record(DATA_A, run_id="", server_round=1, event=_event(1.5))


def test_a_feature_mean_release_is_its_own_mechanism_in_the_sum(tmp_path):
    release = DPEvent(20.0, 1.0, 1, 40.0, "rdp")
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE).load()
    ledger.record(DATA_A, run_id="r", server_round=1, event=release, mechanism=FEATURE_MEAN)
    trained = ledger.record(DATA_A, run_id="r", server_round=1, event=_event(1.5))
    assert trained.attempt == 1  # the round's training is its first, beside the release
    assert [e.event for e in PrivacyLedger(ledger.path).load().entries(DATA_A, mechanism=FEATURE_MEAN)] == [release]
    assert ledger.run_epsilon(DATA_A, run_id="r", delta=1e-5, accountant="rdp") == epsilon_spent(
        [release, _event(1.5)], delta=1e-5, accountant="rdp")
    data = json.loads(ledger.path.read_text())
    assert [e.get("mechanism") for e in data["datasets"][DATA_A]] == ["feature-mean", None]  # DP-SGD entries as before
    data["datasets"][DATA_A][0]["mechanism"] = "gossip"
    data["sha256"] = sha256_json(data["datasets"])
    ledger.path.write_text(json.dumps(data))
    with pytest.raises(LedgerError, match="mechanism 'gossip' is not one of dp-sgd, feature-mean"):
        PrivacyLedger(ledger.path).load()
    with pytest.raises(LedgerError, match="mechanism"):
        PrivacyLedger(tmp_path / "other.json").record(DATA_A, run_id="r", server_round=1, event=release, mechanism="gossip")


def test_a_release_recorded_once_a_run_is_not_recorded_twice(tmp_path):
    release = DPEvent(20.0, 1.0, 1, 40.0, "rdp")
    first = PrivacyLedger(tmp_path / LEDGER_FILE).load()
    stale = PrivacyLedger(tmp_path / LEDGER_FILE).load()  # another process's view, read before the first recorded
    assert first.record_once(DATA_A, run_id="r", server_round=1, event=release, mechanism=FEATURE_MEAN) is not None
    assert stale.record_once(DATA_A, run_id="r", server_round=2, event=release, mechanism=FEATURE_MEAN) is None
    assert stale.record_once(DATA_A, run_id="r2", server_round=1, event=release, mechanism=FEATURE_MEAN) is not None
    assert [e.run_id for e in PrivacyLedger(tmp_path / LEDGER_FILE).load().entries(DATA_A)] == ["r", "r2"]
