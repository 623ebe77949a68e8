"""One round of record-level DP at a site: plan, check the site's policy, train, record, report.

The order is the guarantee's: the noise multiplier is calibrated once for the
whole run (every round and local epoch, so that this run ends at
``target-epsilon``), the site's own policy is checked against what the round
would spend over this data's lifetime *before* any training, the DP event
actually run is written to the site's privacy ledger, and the report sent to
the server is computed from that ledger. A fresh ClientApp process each round,
a restarted SuperNode and a new run on the same data all continue the same sum.

With ``centre-features`` the run's first round also releases the site's
feature mean (client.feature_centre): one more event, planned, checked against
the policy and recorded like the DP-SGD one, and counted in the calibration.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from client.dp_training import DPTrainReport, secret_generator, train_privately
from client.feature_centre import (
    MAX_NOISE_TO_CLIP, CentredFeatures, centre_event, centred_head, feature_mean, first_linear, keep_centre,
    read_kept_centre, release_noise_to_clip,
)
from client.feature_source import FeatureSource
from client.privacy_ledger import FEATURE_MEAN, PrivacyLedger
from client.privacy_policy import SitePolicy, check_round, load_policy
from common.config import RunConfig
from common.errors import ConfigError
from common.files import atomic_path, remove_stale_siblings
from common.privacy import BudgetError, DPEvent, calibrate_noise_multiplier, epsilon_spent
from common.protocol import PrivacyReport
from common.site_config import SiteConfig

__all__ = ["RoundPlan", "plan_round", "check_policy", "train_round_privately"]

log = logging.getLogger(__name__)

# The accountant a site's policy is judged with, whatever the run asks for.
_SITE_ACCOUNTANT = "rdp"

# Another run's kept optimizer state or feature mean untouched this long belongs to a run that has ended: removed.
OPTIMIZER_STATE_DAYS = 7


@dataclass(frozen=True)
class RoundPlan:
    """The DP-SGD a round would run at this site, and the feature-mean release it would make first (if any)."""

    event: DPEvent
    data_fingerprint: str
    prior_events: tuple[DPEvent, ...]
    lifetime_epsilon_after: float  # at the run's delta, by the run's accountant (what is reported)
    release: DPEvent | None = None
    centred: bool = False  # this run trains this site on centred features (its release made now or earlier)

    @property
    def events(self) -> tuple[DPEvent, ...]:
        """What this round would spend, in order."""
        return (self.event,) if self.release is None else (self.release, self.event)


def plan_round(
    cfg: RunConfig, *, num_examples: int, data_fingerprint: str, ledger: PrivacyLedger, run_id: str, feature_dim: int
) -> RoundPlan:
    """Poisson rate ``dp-sample-rate`` (else ``batch-size / N``), ``local-epochs / rate`` steps, noise calibrated over all rounds.

    With ``centre-features`` the calibration counts the run's one feature-mean
    release, and the round makes it unless the ledger shows this run already
    did; a site with too few images for a useful release (feature_centre) centres nothing.
    """
    sample_rate = cfg.dp_sample_rate or min(1.0, cfg.batch_size / num_examples)
    steps = cfg.local_epochs * max(1, round(1 / sample_rate))
    centred = cfg.centre_features
    if centred and (ratio := release_noise_to_clip(cfg, num_examples=num_examples, feature_dim=feature_dim)) > MAX_NOISE_TO_CLIP:
        centred = False
        log.info("centre-features: %d training images are too few for a useful private feature mean (its noise would be "
                 "%.2f of the clip norm, over %.2f): this site trains on its plain features and releases no mean",
                 num_examples, ratio, MAX_NOISE_TO_CLIP)
    centring = (centre_event(cfg),) if centred else ()
    try:
        noise = calibrate_noise_multiplier(
            target_epsilon=cfg.target_epsilon,
            target_delta=cfg.target_delta,
            sample_rate=sample_rate,
            steps=steps * cfg.num_server_rounds,
            accountant=cfg.accountant,
            prior_events=centring,
        )
    except BudgetError as exc:
        if not centring:
            raise
        alone = epsilon_spent(centring, delta=cfg.target_delta, accountant=cfg.accountant)
        raise BudgetError(
            f"the run's feature-mean release (centre-noise-multiplier {cfg.centre_noise_multiplier:g}) alone spends "
            f"epsilon {alone:.4g} of the run's {cfg.target_epsilon:g}, leaving DP-SGD too little; raise "
            f"centre-noise-multiplier or set centre-features=false ({exc})"
        ) from None
    event = DPEvent(noise, sample_rate, steps, cfg.max_grad_norm, cfg.accountant)
    released = ledger.entries(data_fingerprint, run_id=run_id, mechanism=FEATURE_MEAN)
    release = centring[0] if centring and not released else None
    prior = tuple(ledger.events(data_fingerprint))
    spends = (event,) if release is None else (release, event)
    after = epsilon_spent([*prior, *spends], delta=cfg.target_delta, accountant=cfg.accountant)
    return RoundPlan(event, data_fingerprint, prior, after, release, centred)


def _policy_epsilon(policy: SitePolicy, plan: RoundPlan) -> float:
    """The lifetime epsilon after this round as the *site* judges it: at the policy's own delta, by RDP.

    The server chooses the run's delta and accountant; a budget judged with
    them could be gamed (a delta near 1, or the GDP approximation, make epsilon
    look small), so the policy's figure never uses them.
    """
    if policy.max_epsilon is None:
        return plan.lifetime_epsilon_after
    if policy.max_delta is None:
        raise ConfigError(
            f"policy {policy.source}: 'max-epsilon' needs 'max-delta', the delta this site judges its budget at"
        )
    return epsilon_spent([*plan.prior_events, *plan.events], delta=policy.max_delta, accountant=_SITE_ACCOUNTANT)


def check_policy(
    site_cfg: SiteConfig, cfg: RunConfig, *, plan: RoundPlan | None, num_examples: int, backbone_sha256: str
) -> None:
    """Refuse (PolicyRefusal) before any training if the round breaks the site's policy (if it has one)."""
    if site_cfg.policy is None:
        return
    policy = load_policy(site_cfg.policy)
    check_round(
        policy,
        dp_enabled=plan is not None,
        delta=cfg.target_delta,
        noise_multiplier=min(e.noise_multiplier for e in plan.events) if plan else 0.0,
        num_examples=num_examples,
        backbone_sha256=backbone_sha256,
        lifetime_epsilon_after=_policy_epsilon(policy, plan) if plan else float("inf"),
    )


def _read_optimizer_state(path: Path | None) -> dict | None:
    """The optimizer state a previous round kept in ``path``; None when there is none or it cannot be read."""
    if path is None or not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True)
    except Exception as exc:  # a damaged file costs this round's momentum, nothing else
        log.warning("%s cannot be read (%s); the optimizer starts afresh this round", path.name, type(exc).__name__)
        return None


def _remove_stale_states(kept: Path) -> None:
    """Remove the other runs' optimizer states beside ``kept`` not written for OPTIMIZER_STATE_DAYS days."""
    for path in remove_stale_siblings(kept, "*.pt", days=OPTIMIZER_STATE_DAYS):
        log.info("removed %s, the optimizer state of a run that ended (untouched for %d days)", path.name, OPTIMIZER_STATE_DAYS)


def _run_centre(
    source: FeatureSource, cfg: RunConfig, *, plan: RoundPlan, ledger: PrivacyLedger, run_id: str, server_round: int,
    centre_file: Path, feature_dim: int, generator: torch.Generator,
) -> torch.Tensor | None:
    """This run's private feature mean: released now if planned (recorded, then kept in ``centre_file``), else the kept one.

    The release is recorded before the mean is used or kept, and at most once a
    run (checked under the ledger's lock): a mean another process of the same
    run released first is read from its kept copy instead.
    """
    if plan.release is not None:
        centre = feature_mean(source, clip=cfg.centre_clip_norm, noise_multiplier=cfg.centre_noise_multiplier, generator=generator)
        if ledger.record_once(plan.data_fingerprint, run_id=run_id, server_round=server_round, event=plan.release,
                              mechanism=FEATURE_MEAN) is not None:
            keep_centre(centre_file, centre, stale_days=OPTIMIZER_STATE_DAYS)
            log.info("round %d: released this site's feature mean (Gaussian, noise %.3g x clip norm %.3g) for centring",
                     server_round, plan.release.noise_multiplier, plan.release.max_grad_norm)
            return centre
    centre = read_kept_centre(centre_file, feature_dim=feature_dim)
    if centre is None:
        log.warning("round %d: this run released its feature mean already, but the kept copy is missing or damaged; "
                    "this round trains on uncentred features rather than spend budget on it again", server_round)
    return centre


def _run_release(ledger: PrivacyLedger, data_fingerprint: str, run_id: str) -> DPEvent | None:
    """The feature-mean release of this run, if it made one (every reply after it carries it: a lost reply hides nothing)."""
    released = ledger.entries(data_fingerprint, run_id=run_id, mechanism=FEATURE_MEAN)
    return released[0].event if released else None


def train_round_privately(
    trainable: torch.nn.Module,
    source: FeatureSource,
    labels: torch.Tensor,
    cfg: RunConfig,
    *,
    plan: RoundPlan,
    ledger: PrivacyLedger,
    run_id: str,
    server_round: int,
    proximal_mu: float,
    optimizer_state_file: Path | None = None,
    centre_file: Path | None = None,
) -> tuple[DPTrainReport, PrivacyReport]:
    """Run the planned DP-SGD, record its event in the ledger, report what this run and this data have spent.

    With ``optimizer_state_file`` (run-config ``keep-optimizer-state``) the
    optimizer's moments continue from this site's previous round of the same
    run: read from that file in the site's state-dir, written back after.
    In a centred plan (``centre-features``) training sees the features minus
    the run's private mean, released in the first round and kept in ``centre_file``.
    """
    if plan.centred and centre_file is None:
        raise ValueError("a centred round needs the centre_file its run keeps the released mean in")
    generator = secret_generator()
    centre = None
    if plan.centred:
        feature_dim = first_linear(trainable).in_features  # a head that cannot be centred fails before any release
        centre = _run_centre(source, cfg, plan=plan, ledger=ledger, run_id=run_id, server_round=server_round,
                             centre_file=centre_file, feature_dim=feature_dim, generator=generator)
    with centred_head(trainable, centre):
        report, event = train_privately(
            trainable, source if centre is None else CentredFeatures(source, centre), labels, cfg,
            server_round=server_round,
            noise_multiplier=plan.event.noise_multiplier,
            sample_rate=plan.event.sample_rate,
            steps=plan.event.steps,
            proximal_mu=proximal_mu,
            generator=generator,
            optimizer_state=_read_optimizer_state(optimizer_state_file),
        )
    if optimizer_state_file is not None and report.optimizer_state is not None:
        with atomic_path(optimizer_state_file) as tmp:
            torch.save(report.optimizer_state, tmp)
        _remove_stale_states(optimizer_state_file)
    ledger.record(plan.data_fingerprint, run_id=run_id, server_round=server_round, event=event)
    delta, accountant = cfg.target_delta, cfg.accountant
    privacy = PrivacyReport(
        event=event,
        release=_run_release(ledger, plan.data_fingerprint, run_id),
        delta=delta,
        epsilon_run=ledger.run_epsilon(plan.data_fingerprint, run_id=run_id, delta=delta, accountant=accountant),
        epsilon_lifetime=ledger.lifetime_epsilon(plan.data_fingerprint, delta=delta, accountant=accountant),
    )
    log.info(
        "round %d: DP-SGD with noise %.3f, sample rate %.4f, %d steps; epsilon %.3f this run, %.3f over this data's lifetime",
        server_round, event.noise_multiplier, event.sample_rate, event.steps, privacy.epsilon_run, privacy.epsilon_lifetime,
    )
    return report, privacy
