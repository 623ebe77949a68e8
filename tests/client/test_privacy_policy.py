"""The site's privacy policy: each rule refuses with its name and numbers, before any training."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from client.dp_training import train_privately
from client.feature_source import CachedFeatures
from client.privacy_ledger import LEDGER_FILE, PrivacyLedger
from client.privacy_policy import PolicyRefusal, SitePolicy, check_round, describe, load_policy
from common.config import build_run_config
from common.errors import ConfigError
from common.privacy import DPEvent, calibrate_noise_multiplier, epsilon_spent

WEIGHTS = hashlib.sha256(b"mobilenet_v2 weights").hexdigest()
DATA = hashlib.sha256(b"this site's training split").hexdigest()
POLICY = f"""
require-dp = true
max-epsilon = 3
max-delta = 1e-5
min-noise-multiplier = 0.8
min-examples = 100
allowed-backbones = ["{WEIGHTS.upper()}"]
"""
GOOD = dict(dp_enabled=True, delta=1e-5, noise_multiplier=1.0, num_examples=500, backbone_sha256=WEIGHTS, lifetime_epsilon_after=2.5)


@pytest.fixture
def policy(tmp_path) -> SitePolicy:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    return load_policy(path)


def test_a_policy_file_loads_into_typed_rules(policy, tmp_path):
    assert policy == SitePolicy(True, 3.0, 1e-5, 0.8, 100, (WEIGHTS,), str(tmp_path / "policy.toml"))
    check_round(policy, **GOOD)  # a round within every rule passes


def test_unknown_keys_and_wrong_types_are_all_reported_at_once(tmp_path):
    path = tmp_path / "policy.toml"
    path.write_text('require-dp = "yes"\nmax-epsilon = -1\nmin-examples = 2.5\nmax-epsilonn = 3\nallowed-backbones = "abc"\n')
    with pytest.raises(ConfigError) as caught:
        load_policy(path)
    message = str(caught.value)
    for part in ("'require-dp' = 'yes'", "'max-epsilon' = -1", "'min-examples' = 2.5", "unknown key 'max-epsilonn'", "'allowed-backbones'"):
        assert part in message
    path.write_text("max-epsilon = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_policy(path)
    path.write_bytes(b"max-epsilon = 3.0\n# \xe9t\xe9\n")  # Latin-1, as an old editor saves it
    with pytest.raises(ConfigError, match="is not UTF-8 text .* save it as UTF-8 TOML"):
        load_policy(path)


@pytest.mark.parametrize(
    ("change", "rule", "numbers"),
    [
        ({"lifetime_epsilon_after": 3.41}, "max-epsilon", "lifetime epsilon to 3.41 > 3.00 allowed"),
        ({"delta": 1e-4}, "max-delta", "delta 0.0001 > 1e-05 allowed"),
        ({"noise_multiplier": 0.62}, "min-noise-multiplier", "0.62 < 0.8 required"),
        ({"num_examples": 40}, "min-examples", "40 examples < 100 required"),
        ({"backbone_sha256": "0" * 64}, "allowed-backbones", "0000000000000000... is not one of the 1 allowed"),
    ],
)
def test_each_rule_refuses_with_its_name_and_numbers(policy, change, rule, numbers):
    with pytest.raises(PolicyRefusal) as caught:
        check_round(policy, **{**GOOD, **change})
    assert caught.value.rules == [rule]
    assert f"{rule}: " in str(caught.value) and numbers in str(caught.value)
    assert isinstance(caught.value, PermissionError)


def test_a_round_without_dp_breaks_every_dp_rule_at_once(policy):
    with pytest.raises(PolicyRefusal) as caught:
        check_round(policy, **{**GOOD, "dp_enabled": False})
    assert caught.value.rules == ["require-dp", "max-epsilon", "max-delta", "min-noise-multiplier"]
    check_round(SitePolicy(min_examples=10), **{**GOOD, "dp_enabled": False})  # no DP rule set: allowed


def test_a_second_run_that_would_exceed_the_lifetime_budget_is_refused_before_training(policy, tmp_path):
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE).load()
    g = torch.Generator().manual_seed(0)
    source, labels = CachedFeatures([torch.randn(300, 16, generator=g)], forwards=0, hits=0), torch.randint(0, 4, (300,), generator=g)
    cfg = build_run_config(max_grad_norm=1.0)
    rounds, steps, rate = 3, 20, 0.1
    trained, refused = [], []
    for run_id in ("run-1", "run-2"):  # each run calibrated to epsilon 2.5 on its own; the policy allows 3 in a lifetime
        sigma = calibrate_noise_multiplier(target_epsilon=2.5, target_delta=1e-5, sample_rate=rate, steps=rounds * steps, accountant="rdp")
        for server_round in range(1, rounds + 1):
            planned = DPEvent(sigma, rate, steps, cfg.max_grad_norm, "rdp")
            after = epsilon_spent([*ledger.events(DATA), planned], delta=1e-5, accountant="rdp")
            try:
                check_round(policy, **{**GOOD, "noise_multiplier": sigma, "num_examples": len(source), "lifetime_epsilon_after": after})
            except PolicyRefusal as refusal:
                assert refusal.rules == ["max-epsilon"] and f"{after:.2f} > 3.00" in str(refusal)
                refused.append((run_id, server_round))
                break
            _, event = train_privately(nn.Linear(16, 4), source, labels, cfg, server_round=server_round,
                                       noise_multiplier=sigma, sample_rate=rate, steps=steps, generator=torch.Generator())
            ledger.record(DATA, run_id=run_id, server_round=server_round, event=event)
            trained.append((run_id, server_round))
    assert trained == [("run-1", 1), ("run-1", 2), ("run-1", 3), ("run-2", 1)] and refused == [("run-2", 2)]
    assert len(ledger.events(DATA)) == 4  # the refused round trained nothing and spent nothing
    assert ledger.lifetime_epsilon(DATA, delta=1e-5, accountant="rdp") <= 3.0


def test_describe_shows_the_rules_and_the_budget_left(policy, tmp_path):
    ledger = PrivacyLedger(tmp_path / LEDGER_FILE).load()
    ledger.record(DATA, run_id="r", server_round=1, event=DPEvent(1.5, 0.1, 50, 1.0, "rdp"))
    summary = describe(policy, ledger=ledger, data_fingerprint=DATA, accountant="rdp")
    spent = ledger.lifetime_epsilon(DATA, delta=1e-5, accountant="rdp")
    assert summary["lifetime-epsilon"] == spent and summary["epsilon-left"] == pytest.approx(3.0 - spent)
    assert summary["max-epsilon"] == 3.0 and summary["trainings-recorded"] == 1 and summary["delta"] == 1e-5
    with pytest.raises(ConfigError, match="delta"):
        describe(SitePolicy(), ledger=ledger, data_fingerprint=DATA, accountant="rdp")
