"""A simulated run under record-level DP: every reported epsilon recomputed by an independent accountant."""

from __future__ import annotations

import pytest

from common.privacy import DPEvent, independent_epsilon
from common.round_record import load_round_records
from simulations.runner import run_simulation

pytestmark = pytest.mark.slow


def test_a_dp_run_reports_epsilons_an_auditor_can_recompute(tmp_path):
    overrides = {
        "dataset": "digits", "image-size": 32, "num-server-rounds": 3, "local-epochs": 2, "lr": 0.01,
        "partitioner": "iid", "dp": "sample", "target-epsilon": 3.0, "target-delta": 1e-5,
        "run-dir": str(tmp_path / "runs"),
    }
    result = run_simulation(num_sites=2, name="private", overrides=overrides, state_dir=tmp_path / "state")
    summary = result.summary
    assert summary["status"] == "finished" and summary["accuracy"] > 0.5  # chance is 0.1
    assert summary["max_epsilon"] == pytest.approx(3.0, rel=0.01) and summary["max_epsilon"] <= 3.0
    assert set(summary["privacy"]["by_site"]) == {"site-0", "site-1"}
    assert (result.run_dir / "plots" / "epsilon.png").is_file()
    records = [r for r in load_round_records(result.run_dir / "metrics.jsonl") if r.round > 0]
    checked = 0
    for name in ("site-0", "site-1"):
        events = []
        for record in records:
            privacy = record.sites[name].train.privacy
            events.append(DPEvent(**privacy["event"]))
            assert privacy["epsilon_run"] == pytest.approx(independent_epsilon(events, delta=privacy["delta"]), rel=1e-6)
            checked += 1
    assert checked == 6
