"""Record-level privacy accounting: DP events, epsilon spent, noise calibration.

A :class:`DPEvent` is ``steps`` steps of the Poisson-subsampled Gaussian
mechanism (DP-SGD). fedhead's figures come from Opacus's accountants
(:func:`epsilon_spent`); :func:`independent_epsilon` recomputes them with
Google's ``dp-accounting``, which fedhead never uses to produce a figure.

RDP orders: both packages evaluate the integer orders :data:`RDP_ORDERS` and
convert with the same bound (Balle et al. 2020, Thm 21): they agree to ~1e-14.
Fractional orders are left out on purpose: there the packages sum different
series (dp-accounting adds |binomial| terms, Opacus subtracts the negative
ones) and differ by 1e-6 to 1e-1. The price: a noise multiplier at most ~1.5%
above Opacus's default orders (0% at epsilon 1, <0.3% at 3, 1.5% at 8).
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from common.errors import FedHeadError

__all__ = [
    "ACCOUNTANTS", "RDP_ORDERS", "PRV_EPS_ERROR", "PrivacyError", "BudgetError", "DPEvent", "accountant_history",
    "epsilon_spent", "calibrate_noise_multiplier", "independent_epsilon", "independent_central_epsilon",
    "contained_logging",
]

log = logging.getLogger(__name__)

ACCOUNTANTS = ("rdp", "prv", "gdp")
RDP_ORDERS: tuple[int, ...] = tuple(range(2, 65)) + (72, 80, 96, 112, 128, 160, 192, 256)
PRV_EPS_ERROR = 0.01  # Opacus's PRV reports an upper bound within this of its estimate
_CALIBRATION_SLACK = 0.005  # calibrated runs end within 0.5% below the target
_MAX_NOISE = 1e6


class PrivacyError(FedHeadError, ValueError):
    """A DP event, a privacy parameter or a history is malformed."""


class BudgetError(PrivacyError):
    """A privacy target cannot be reached (for example: already spent)."""

    public_message = True  # numbers only


@contextlib.contextmanager
def contained_logging() -> Iterator[None]:
    """Undo logging side effects of Opacus (and friends) made inside the block.

    Importing Opacus calls ``logging.basicConfig``, which gives the root logger
    a handler: Flower's logger (level DEBUG, its own handler at INFO) then
    prints every DEBUG record through it. On exit the root logger's handlers
    and level and the ``flwr`` logger's level are what they were.
    """
    root, flwr = logging.getLogger(), logging.getLogger("flwr")
    handlers, root_level, flwr_level = list(root.handlers), root.level, flwr.level
    try:
        yield
    finally:
        for handler in list(root.handlers):
            if handler not in handlers:
                root.removeHandler(handler)
        root.setLevel(root_level)
        flwr.setLevel(flwr_level)


@dataclass(frozen=True)
class DPEvent:
    """``steps`` DP-SGD steps: Poisson ``sample_rate``, noise std ``noise_multiplier * max_grad_norm``.

    ``accountant`` names the accountant that calibrated and reported it; any
    accountant can account any event (the mechanism is the same).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    accountant: str

    def __post_init__(self) -> None:
        problems = []
        for name, high in (("noise_multiplier", math.inf), ("sample_rate", 1.0), ("max_grad_norm", math.inf)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value <= high and math.isfinite(value)):
                problems.append(f"{name} = {value!r}: must be a finite number in (0, {high:g}]")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            problems.append(f"steps = {self.steps!r}: must be an integer >= 1")
        if self.accountant not in ACCOUNTANTS:
            problems.append(f"accountant = {self.accountant!r}: choose one of {', '.join(ACCOUNTANTS)}")
        if problems:
            raise PrivacyError("invalid DP event: " + "; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        """This event as a plain JSON object."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DPEvent:
        """Parse :meth:`to_json`'s output; missing or unknown keys are an error."""
        if not isinstance(data, Mapping):
            raise PrivacyError(f"a DP event must be a JSON object, got {type(data).__name__}")
        fields = {"noise_multiplier", "sample_rate", "steps", "max_grad_norm", "accountant"}
        missing, unknown = sorted(fields - set(data)), sorted(set(data) - fields)
        if missing or unknown:
            raise PrivacyError(f"invalid DP event: missing keys {missing}, unknown keys {unknown}")
        return cls(**{key: data[key] for key in fields})


def accountant_history(events: Iterable[DPEvent]) -> list[tuple[float, float, int]]:
    """The events as Opacus's accountant history ``[(noise_multiplier, sample_rate, steps)]``.

    Events with the same noise and sample rate are merged (composition is
    commutative), so ten identical rounds cost one composition.
    """
    steps: dict[tuple[float, float], int] = {}
    for event in events:
        key = (float(event.noise_multiplier), float(event.sample_rate))
        steps[key] = steps.get(key, 0) + event.steps
    return [(sigma, rate, count) for (sigma, rate), count in steps.items()]


def _check(delta: float, accountant: str) -> None:
    if not (isinstance(delta, (int, float)) and 0.0 < delta < 1.0):
        raise PrivacyError(f"delta = {delta!r}: must be in (0, 1)")
    if accountant not in ACCOUNTANTS:
        raise PrivacyError(f"accountant = {accountant!r}: choose one of {', '.join(ACCOUNTANTS)}")


def epsilon_spent(events: Sequence[DPEvent], *, delta: float, accountant: str) -> float:
    """Epsilon at ``delta`` of all ``events`` composed, by Opacus's ``accountant``.

    ``gdp``: Opacus's GaussianAccountant holds one (noise, rate) pair only, so
    each event's mu (Opacus's Poisson CLT formula) is composed as the root sum
    of squares, which is exact for mu-GDP; one event gives the accountant's own
    figure. GDP is a CLT approximation and can underestimate epsilon.
    """
    _check(delta, accountant)
    if not events:
        return 0.0
    history = accountant_history(events)
    with contained_logging(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if accountant == "rdp":
            from opacus.accountants import RDPAccountant
            rdp = RDPAccountant()
            rdp.history = history
            epsilon = rdp.get_epsilon(delta=delta, alphas=list(RDP_ORDERS))
        elif accountant == "prv":
            from opacus.accountants import PRVAccountant
            prv = PRVAccountant()
            prv.history = history
            epsilon = prv.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR)
        else:
            from opacus.accountants.analysis import gdp
            mu = math.sqrt(sum(gdp.compute_mu_poisson(steps=t, noise_multiplier=s, sample_rate=q) ** 2 for s, q, t in history))
            epsilon = gdp.eps_from_mu(mu=mu, delta=delta)
    for warning in caught:
        log.debug("opacus (%s accountant): %s", accountant, warning.message)
    return max(0.0, float(epsilon))


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    prior_events: Sequence[DPEvent] = (),
) -> float:
    """The smallest noise multiplier with which ``prior_events`` plus ``steps`` steps end at ``target_epsilon``.

    The result ends within 0.5% below the target. A BudgetError, with the
    numbers, when the target cannot be reached (already spent, or needing
    noise above 1e6).
    """
    _check(target_delta, accountant)
    if not (isinstance(target_epsilon, (int, float)) and math.isfinite(target_epsilon) and target_epsilon > 0):
        raise PrivacyError(f"target_epsilon = {target_epsilon!r}: must be a finite number > 0")

    def spent(sigma: float) -> float:
        event = DPEvent(sigma, sample_rate, steps, 1.0, accountant)  # validates rate and steps too
        return epsilon_spent([*prior_events, event], delta=target_delta, accountant=accountant)

    tolerance = _CALIBRATION_SLACK * target_epsilon
    before = epsilon_spent(prior_events, delta=target_delta, accountant=accountant)
    unreachable = (f"epsilon {target_epsilon:.4g} at delta {target_delta:g} ({accountant}) cannot be reached with {steps} "
                   f"more steps at sample rate {sample_rate:.4g}: {len(prior_events)} earlier events spent {before:.4g}")
    if before >= target_epsilon - tolerance:
        raise BudgetError(unreachable + ", the whole budget")
    if not prior_events:
        spent(1.0)  # validate the event before handing it to Opacus
        extra = {"alphas": list(RDP_ORDERS)} if accountant == "rdp" else {"eps_error": PRV_EPS_ERROR} if accountant == "prv" else {}
        try:
            with contained_logging(), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # GDP's "experimental" warning; optimal-order notes
                from opacus.accountants.utils import get_noise_multiplier
                return float(get_noise_multiplier(
                    target_epsilon=target_epsilon, target_delta=target_delta, sample_rate=sample_rate, steps=steps,
                    accountant=accountant, epsilon_tolerance=tolerance, **extra,
                ))
        except ValueError as exc:
            raise BudgetError(f"{unreachable}; Opacus: {exc}") from None
    low, high = 0.0, 1.0
    while (eps_high := spent(high)) > target_epsilon:
        if high > _MAX_NOISE:
            raise BudgetError(f"{unreachable}; even noise multiplier {high:g} ends at {eps_high:.4g}")
        low, high = high, high * 2
    while target_epsilon - eps_high > tolerance:
        middle = (low + high) / 2
        if (eps_middle := spent(middle)) <= target_epsilon:
            high, eps_high = middle, eps_middle
        else:
            low = middle
    return high


def independent_epsilon(events: Sequence[DPEvent], *, delta: float, accountant: str = "rdp") -> float:
    """Recompute :func:`epsilon_spent` with Google's ``dp-accounting`` (never used for a fedhead figure).

    ``rdp``: its RdpAccountant on :data:`RDP_ORDERS`; equal to ~1e-14 relative
    (unless some order's RDP < ~delta**2, a negligible spend it reports as 0).
    ``prv``: its PLD accountant, another numerical method for the same curve;
    Opacus's PRV upper bound lies within ~``PRV_EPS_ERROR`` above it.
    ``gdp``: the closed-form CLT mu, then its exact epsilon of the Gaussian
    mechanism with noise 1/mu: checks the conversion (~1e-9), not whether the
    CLT's mu bounds the true loss (it may not; compare with ``rdp``).
    """
    _check(delta, accountant)
    if not events:
        return 0.0
    history = accountant_history(events)
    import dp_accounting
    if accountant == "gdp":
        mu = math.sqrt(sum(t * q * q * math.expm1(s**-2) for s, q, t in history))
        return float(dp_accounting.get_epsilon_gaussian(1.0 / mu, delta))
    if accountant == "rdp":
        counter = dp_accounting.rdp.RdpAccountant(orders=list(RDP_ORDERS))
    else:
        counter = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    for sigma, rate, steps in history:
        counter.compose(dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma)), steps)
    return float(counter.get_epsilon(delta))


def independent_central_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """Client-level epsilon of ``releases`` Gaussian releases (no sampling amplification), by Opacus's RDP.

    Flower's ``RdpAccountant`` (Google's ``dp-accounting``) produces the
    figure fedhead reports for client-level DP; this recomputes it with the
    other package, on the same integer orders.
    """
    if releases == 0:
        return 0.0
    return epsilon_spent([DPEvent(noise_multiplier, 1.0, releases, 1.0, "rdp")], delta=delta, accountant="rdp")
