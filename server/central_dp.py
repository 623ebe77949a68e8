"""Client-level DP at the server (``dp`` = ``central`` or ``both``): Flower's wrappers and accountant, configured.

Each round the wrapped FedAvg averages the sampled sites' updates with equal
weights, each update clipped to ``central-clip-norm`` (by the server, or by
the site with Flower's ``fixedclipping_mod`` when ``central-clipping`` is
``client``), and Flower's wrapper adds Gaussian noise of standard deviation
``noise multiplier x clip norm / sites`` to the average. Flower's
:class:`RdpAccountant` composes one Gaussian release per aggregated round
(no amplification by sampling: every round's sites are assumed known), so
the run's client-level epsilon is Flower's figure; fedhead recomputes it with
Opacus's RDP accountant (:func:`common.privacy.independent_central_epsilon`).

The noise multiplier, unless ``central-noise-multiplier`` gives it, is
calibrated once so that all ``num-server-rounds`` releases end at
``target-epsilon``, at ``target-delta``. Flower 1.42's adaptive-clipping
wrappers keep no accountant, so fedhead does not offer them: it reports no
guarantee it cannot recompute.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)
from flwr.serverapp import GaussianPrivacyEvent, NeighboringRelation, PrivacyConfig, RdpAccountant, SamplingMethod

from common.config import RunConfig
from common.errors import ConfigError
from common.privacy import RDP_ORDERS, independent_central_epsilon

__all__ = ["CentralDP", "CLIPPING_WRAPPERS", "build_central_dp", "calibrate_central_noise"]

log = logging.getLogger(__name__)

# run-config 'central-clipping' -> Flower's wrapper (common.config.CENTRAL_CLIPPING names the same keys)
CLIPPING_WRAPPERS = {
    "server": DifferentialPrivacyServerSideFixedClipping,
    "client": DifferentialPrivacyClientSideFixedClipping,
}
ACCOUNTANT = "rdp (Flower's RdpAccountant, no amplification)"
_SLACK = 0.005  # a calibrated run ends within 0.5% below its target epsilon


def _accountant(sites: int, delta: float) -> RdpAccountant:
    config = PrivacyConfig(
        target_delta=delta,
        population_size=sites,
        neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=SamplingMethod.NO_AMPLIFICATION,
    )
    return RdpAccountant(config, orders=tuple(float(order) for order in RDP_ORDERS))


def _flower_epsilon(noise_multiplier: float, releases: int, sites: int, delta: float) -> float:
    accountant = _accountant(sites, delta)
    accountant.compose(GaussianPrivacyEvent(noise_multiplier, sites, sites), releases)
    return accountant.get_epsilon(delta)


def calibrate_central_noise(*, target_epsilon: float, delta: float, releases: int, sites: int) -> float:
    """The smallest noise multiplier (within 0.5%) with which ``releases`` rounds end at ``target_epsilon``, by Flower's accountant."""
    low, high = 0.0, 1.0
    while _flower_epsilon(high, releases, sites, delta) > target_epsilon:
        low, high = high, high * 2
    while high - low > _SLACK * high / 4:
        middle = (low + high) / 2
        if _flower_epsilon(middle, releases, sites, delta) <= target_epsilon:
            high = middle
        else:
            low = middle
    return high


@dataclass
class CentralDP:
    """Flower's DP wrapper around the run's strategy, and what each round released under it."""

    strategy: Strategy
    clipping: str
    clip_norm: float
    noise_multiplier: float
    sites_per_round: int
    delta: float
    planned_epsilon: float  # after all num-server-rounds releases, by Flower's accountant: the run's declared budget

    @property
    def weight_key(self) -> str:
        """The metric FedAvg weighs updates by (set to 1 for every site: client-level DP averages equally)."""
        return self.strategy.strategy.weighted_by_key

    @property
    def noise_stdev(self) -> float:
        """Standard deviation of the noise added to each coordinate of the averaged update."""
        return self.noise_multiplier * self.clip_norm / self.sites_per_round

    def settings(self) -> dict[str, Any]:
        """What the run declared: clipping, clip norm, noise multiplier, sites per round, delta, accountant."""
        return {
            "clipping": self.clipping,
            "clip_norm": self.clip_norm,
            "noise_multiplier": self.noise_multiplier,
            "sites_per_round": self.sites_per_round,
            "noise_stdev": self.noise_stdev,
            "delta": self.delta,
            "planned_epsilon": self.planned_epsilon,
            "accountant": ACCOUNTANT,
        }

    def round_report(self, released: bool) -> dict[str, Any]:
        """This round's entry of the round record: the settings, whether noise was released, the epsilon so far."""
        spent = self.strategy.privacy_spent()
        return {
            **self.settings(),
            "released": released,
            "releases": spent.num_releases,
            "epsilon": spent.epsilon if spent.num_releases else 0.0,
        }


def build_central_dp(inner: Strategy, cfg: RunConfig) -> CentralDP:
    """Wrap ``inner`` in Flower's fixed-clipping DP wrapper with Flower's accountant, as ``cfg`` asks."""
    sites = cfg.sites_per_round
    if sites < 1:
        raise ConfigError(
            f"dp={cfg.dp!r} calibrates its noise for a fixed number of sites per round: set sites-per-round "
            "(fedhead simulate sets it to --sites)"
        )
    noise = cfg.central_noise_multiplier or calibrate_central_noise(
        target_epsilon=cfg.target_epsilon, delta=cfg.target_delta, releases=cfg.num_server_rounds, sites=sites
    )
    wrapper = CLIPPING_WRAPPERS[cfg.central_clipping](
        inner, noise, cfg.central_clip_norm, sites, accountant=_accountant(sites, cfg.target_delta)
    )
    final = _flower_epsilon(noise, cfg.num_server_rounds, sites, cfg.target_delta)
    central = CentralDP(wrapper, cfg.central_clipping, cfg.central_clip_norm, noise, sites, cfg.target_delta, final)
    log.info(
        "client-level DP: %s-side clipping to %g, noise multiplier %.4g (stdev %.4g on the average of %d sites); "
        "%d rounds end at epsilon %.4g, delta %g",
        cfg.central_clipping, cfg.central_clip_norm, noise, central.noise_stdev, sites, cfg.num_server_rounds,
        final, cfg.target_delta,
    )
    if not math.isfinite(final):
        raise ConfigError(f"central-noise-multiplier = {noise}: the run's epsilon would be infinite")
    return central
