"""A simulated run under both DPs: every reported epsilon recomputed by an independent accountant.

Record-level DP-SGD at the sites and client-level DP at the server, with the
sites clipping their own updates through Flower's ``fixedclipping_mod`` (the
real ClientApp, mods and all); the central noise is kept small so that the
run still learns.
"""

from __future__ import annotations

import pytest

from typer.testing import CliRunner

from common.audit_verify import verify_run
from common.privacy import DPEvent, independent_central_epsilon, independent_epsilon
from common.round_record import load_round_records
from simulations.cli import app
from simulations.runner import run_simulation

pytestmark = pytest.mark.slow


def test_a_dp_run_reports_epsilons_an_auditor_can_recompute(tmp_path):
    overrides = {
        "dataset": "digits", "image-size": 32, "num-server-rounds": 3, "local-epochs": 2, "lr": 0.01,
        "partitioner": "iid", "dp": "both", "target-epsilon": 8.0, "target-delta": 1e-5,
        "central-clipping": "client", "central-clip-norm": 2.0, "central-noise-multiplier": 0.002,
        "run-dir": str(tmp_path / "runs"), "export-onnx": False,
        "feature-views": "mirror",  # a per-image map: inside the guarantee, and two trunk passes per image
        # each site's first round also releases its feature mean: one more event to recompute. About 650 images a
        # site: noise 1.6 keeps the release useful (1.6 * sqrt(1280) / 650 = 0.09 of the clip norm) and costs 2.8 of the 8
        "centre-features": True, "centre-noise-multiplier": 1.6,
    }
    result = run_simulation(num_sites=2, name="private", overrides=overrides, state_dir=tmp_path / "state")
    summary = result.summary
    # chance is 0.1; DP noise is secret and unseeded, so the floor leaves room (0.50 and 0.55 seen)
    assert summary["status"] == "finished" and summary["accuracy"] > 0.35
    assert summary["max_epsilon"] == pytest.approx(8.0, rel=0.01) and summary["max_epsilon"] <= 8.0
    assert set(summary["privacy"]["by_site"]) == {"site-0", "site-1"}
    assert (result.run_dir / "plots" / "epsilon.png").is_file()
    assert summary["backbone_forwards"]["server_eval"] == 2 * 359  # digits' held-out fifth, each image and its mirror
    records = [r for r in load_round_records(result.run_dir / "metrics.jsonl") if r.round > 0]
    checked = 0
    for name in ("site-0", "site-1"):
        events = []
        for record in records:
            privacy = record.sites[name].train.privacy
            # made once a run, before the first step; carried by every reply from then on, counted once
            assert privacy["feature_mean_release"] == {"noise_multiplier": 1.6, "sample_rate": 1.0, "steps": 1,
                                                       "max_grad_norm": 40.0, "accountant": "rdp"}
            if record.round == 1:
                events.append(DPEvent(**privacy["feature_mean_release"]))
            events.append(DPEvent(**privacy["event"]))
            assert privacy["epsilon_run"] == pytest.approx(independent_epsilon(events, delta=privacy["delta"]), rel=1e-6)
            checked += 1
    assert checked == 6
    for k, record in enumerate(records, 1):  # client-level: Flower's accountant, recomputed with Opacus's
        central = record.central_privacy
        assert central["released"] and central["clipping"] == "client" and central["sites_per_round"] == 2
        assert central["epsilon"] == pytest.approx(independent_central_epsilon(0.002, k, 1e-5), rel=1e-6)
        assert all(s.train.update_l2_norm <= 2.0 * (1 + 1e-5) for s in record.sites.values())
    assert summary["client_epsilon"] == records[-1].central_privacy["epsilon"]
    shown = CliRunner().invoke(app, ["show", str(result.run_dir)], env={"COLUMNS": "200"})
    assert "record-level DP" in shown.output and "client-level DP" in shown.output, shown.output
    # the audit log: every update signed by its site, every epsilon recomputed; each site's ledger agrees with it
    report = verify_run(result.run_dir)
    assert report.ok, report.problems
    assert report.site_signatures == 6 and report.epsilons_checked == 6 + 3 + 1  # sites', server's, declared budget
    for name in ("site-0", "site-1"):
        out = CliRunner().invoke(app, ["audit", "cross-check", str(result.run_dir), str(tmp_path / "state" / "sites" / name)])
        assert out.exit_code == 0 and "all 3 receipts of this run agree" in out.output, out.output
