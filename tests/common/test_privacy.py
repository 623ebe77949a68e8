"""Privacy accounting: every figure recomputed by dp-accounting; calibration hits its target."""

from __future__ import annotations

import pytest

from common.privacy import (
    PRV_EPS_ERROR,
    BudgetError,
    DPEvent,
    PrivacyError,
    accountant_history,
    calibrate_noise_multiplier,
    epsilon_spent,
    independent_epsilon,
)


def _events(accountant: str, *specs: tuple[float, float, int]) -> list[DPEvent]:
    return [DPEvent(sigma, rate, steps, 1.0, accountant) for sigma, rate, steps in specs]


HISTORIES = {
    "one run, epsilon ~3": [(1.95, 1 / 15, 300)],
    "one run, epsilon ~8": [(1.06, 1 / 15, 300)],
    "one run, epsilon ~1": [(4.83, 1 / 15, 300)],
    "ten identical rounds": [(1.2, 0.05, 40)] * 10,
    "mixed noise and rates": [(1.1, 0.06, 100), (0.8, 1 / 15, 45), (3.0, 0.01, 2000), (1.1, 0.06, 100)],
    "small and full batches": [(2.5, 0.2, 50), (1.2, 0.005, 900), (6.0, 1.0, 3)],
}


@pytest.mark.parametrize("delta", [1e-5, 1e-3])
@pytest.mark.parametrize("name", list(HISTORIES))
def test_rdp_epsilon_equals_dp_accounting(name, delta):
    events = _events("rdp", *HISTORIES[name])
    ours = epsilon_spent(events, delta=delta, accountant="rdp")
    theirs = independent_epsilon(events, delta=delta, accountant="rdp")
    assert ours > 0.1
    assert ours == pytest.approx(theirs, rel=1e-6)


@pytest.mark.parametrize("name", list(HISTORIES))
def test_gdp_epsilon_equals_independent_conversion(name):
    events = _events("gdp", *HISTORIES[name])
    assert epsilon_spent(events, delta=1e-5, accountant="gdp") == pytest.approx(
        independent_epsilon(events, delta=1e-5, accountant="gdp"), rel=1e-6
    )


@pytest.mark.parametrize("name", ["one run, epsilon ~3", "mixed noise and rates"])
def test_prv_upper_bound_lies_just_above_dp_accounting_pld(name):
    events = _events("prv", *HISTORIES[name])
    ours = epsilon_spent(events, delta=1e-5, accountant="prv")
    theirs = independent_epsilon(events, delta=1e-5, accountant="prv")
    assert 0.0 <= ours - theirs <= PRV_EPS_ERROR * 1.5


def test_any_accountant_composes_any_history_and_more_events_cost_more():
    one = _events("rdp", (1.5, 0.05, 100))
    for accountant in ("rdp", "prv", "gdp"):
        single = epsilon_spent(one, delta=1e-5, accountant=accountant)
        assert epsilon_spent(one * 2, delta=1e-5, accountant=accountant) > single > 0
    assert epsilon_spent([], delta=1e-5, accountant="rdp") == 0.0


def test_history_merges_equal_events_in_opacus_format():
    events = _events("rdp", (1.0, 0.1, 10), (2.0, 0.1, 5), (1.0, 0.1, 7))
    assert accountant_history(events) == [(1.0, 0.1, 17), (2.0, 0.1, 5)]


@pytest.mark.parametrize("accountant", ["rdp", "gdp", "prv"])
def test_calibrated_noise_ends_within_one_percent_below_target(accountant):
    rounds, steps_per_round, rate = 5, 30, 1 / 15
    sigma = calibrate_noise_multiplier(
        target_epsilon=3.0, target_delta=1e-5, sample_rate=rate, steps=rounds * steps_per_round, accountant=accountant
    )
    run = [DPEvent(sigma, rate, steps_per_round, 1.0, accountant)] * rounds  # as a site records it, round by round
    epsilon = epsilon_spent(run, delta=1e-5, accountant=accountant)
    assert 0.99 * 3.0 <= epsilon <= 3.0


def test_calibration_after_earlier_runs_ends_at_the_lifetime_target():
    earlier = _events("rdp", (1.95, 1 / 15, 150), (1.5, 0.05, 60))
    spent = epsilon_spent(earlier, delta=1e-5, accountant="rdp")
    sigma = calibrate_noise_multiplier(
        target_epsilon=spent + 2.0, target_delta=1e-5, sample_rate=0.1, steps=100, accountant="rdp", prior_events=earlier
    )
    lifetime = epsilon_spent([*earlier, DPEvent(sigma, 0.1, 100, 1.0, "rdp")], delta=1e-5, accountant="rdp")
    assert 0.99 * (spent + 2.0) <= lifetime <= spent + 2.0
    fresh = calibrate_noise_multiplier(target_epsilon=spent + 2.0, target_delta=1e-5, sample_rate=0.1, steps=100, accountant="rdp")
    assert sigma > 1.1 * fresh  # the earlier spend is not forgotten: the same target needs more noise


def test_calibration_refuses_clearly_when_the_budget_is_spent():
    earlier = _events("rdp", (0.8, 0.1, 500))
    spent = epsilon_spent(earlier, delta=1e-5, accountant="rdp")
    with pytest.raises(BudgetError) as caught:
        calibrate_noise_multiplier(
            target_epsilon=3.0, target_delta=1e-5, sample_rate=0.1, steps=100, accountant="rdp", prior_events=earlier
        )
    message = str(caught.value)
    assert f"{spent:.4g}" in message and "3" in message and "100 more steps" in message


def test_calibration_refuses_an_unreachable_target():
    with pytest.raises(BudgetError, match="cannot be reached"):
        calibrate_noise_multiplier(target_epsilon=1e-9, target_delta=1e-5, sample_rate=1.0, steps=10**6, accountant="rdp")


def test_event_round_trips_through_json_and_rejects_bad_values():
    event = DPEvent(1.25, 0.05, 40, 1.0, "prv")
    assert DPEvent.from_json(event.to_json()) == event
    with pytest.raises(PrivacyError) as caught:
        DPEvent(0.0, 1.5, 0, -1.0, "moments")
    message = str(caught.value)
    for word in ("noise_multiplier", "sample_rate", "steps", "max_grad_norm", "accountant"):
        assert word in message
    with pytest.raises(PrivacyError, match="unknown keys \\['extra'\\]"):
        DPEvent.from_json({**event.to_json(), "extra": 1})
    with pytest.raises(PrivacyError, match="delta"):
        epsilon_spent([event], delta=0.0, accountant="rdp")
