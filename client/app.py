"""The ClientApp a site runs: thin handlers around real functions.

A ClientApp process lives for one message, so everything a site keeps between
rounds (the feature cache) is on disk, in the site's own ``state-dir``. Before
touching any data the site checks that the server's backbone is the one it
has. What goes back is built with :mod:`common.protocol`: the trainable
parameters and declared metric numbers only. A failure is logged in full here
and reported to the server without the site's paths or file names.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from client.clipping_mod import clip_when_asked
from client.feature_cache import FeatureCache
from client.feature_centre import CentredFeatures, centred_head, feature_mean, first_linear, keep_centre, read_kept_centre
from client.feature_source import FeatureSource, build_feature_source
from client.privacy_ledger import PrivacyLedger
from client.receipts import sign_train_reply
from client.privacy_round import OPTIMIZER_STATE_DAYS, check_policy, plan_round, train_round_privately
from client.site_data import SiteData, load_site_data
from client.training import evaluate_with_class_recall, train_locally
from common.config import RunConfig, build_run_config
from common.devices import Extraction, resolve_extraction
from common.errors import FedHeadError, FingerprintError, public_reason
from common.exchange import load_arrayrecord, to_arrayrecord
from common.logs import configure_logging
from common.model import SplitModel, build_split_model
from common.paths import fedhead_home
from common.protocol import (
    EvaluateMetrics,
    Instruction,
    SiteInfo,
    TrainMetrics,
    build_evaluate_content,
    build_train_content,
    parse_instruction,
)
from common.site_config import SiteConfig, build_site_config

__all__ = ["app"]

log = logging.getLogger(__name__)

# Flower's ErrorCode.CLIENT_APP_RAISED_EXCEPTION: the site's handler raised.
_HANDLER_FAILED = 2

# Outermost first: the receipt signs exactly what leaves the site, after Flower's clipping (when asked for).
app = ClientApp(mods=[sign_train_reply, clip_when_asked])


@dataclass
class _Site:
    """What a handler works with, each part validated once."""

    cfg: RunConfig
    site_cfg: SiteConfig
    instruction: Instruction
    model: SplitModel
    data: SiteData
    run_id: str
    extraction: Extraction

    @property
    def cache(self) -> FeatureCache | None:
        return FeatureCache(self.site_cfg.cache_dir) if self.cfg.cache_features else None

    @property
    def train_device(self) -> torch.device:
        """Where the trainable part learns: the site's device, except that DP-SGD runs on the CPU.

        Opacus's Poisson sampling and noise draw from a CPU generator seeded
        from the OS's secret randomness (see client.dp_training), and the part
        that learns is small; feature extraction, the costly part, still uses the GPU.
        """
        return torch.device("cpu") if self.cfg.records_dp else self.extraction.device

    def features(self, split: str, augment_views: int) -> FeatureSource:
        """The trainable part's inputs for the site's ``train`` or ``val`` split, on the training device."""
        return build_feature_source(
            self.model,
            getattr(self.data, split),
            cache=self.cache,
            augment_views=augment_views,
            seed=self.cfg.seed,
            label=f"{self.data.name} {split}",
            extraction=self.extraction,
            device=self.train_device,
        )

    @property
    def info(self) -> SiteInfo:
        return SiteInfo(self.site_cfg.site_name, self.model.weights_sha256, len(self.data.skipped))


def _data_path(cfg: RunConfig, site_cfg: SiteConfig) -> Path:
    """The site's own data, or (simulated site) its prepared partition file."""
    if site_cfg.data_dir is not None:
        return site_cfg.data_dir
    from common.partitions import partition_file  # a real site never pays for flwr-datasets' import

    return partition_file(
        cfg,
        partition_id=int(site_cfg.partition_id or 0),
        num_partitions=int(site_cfg.num_partitions or 1),
        cache_root=fedhead_home(),
    )


def _prepare(msg: Message, context: Context) -> _Site:
    cfg = build_run_config(context.run_config)
    site_cfg = build_site_config(context.node_config)
    instruction = parse_instruction(msg)
    model = build_split_model(cfg)
    if instruction.backbone_sha256 != model.weights_sha256:
        raise FingerprintError(
            f"the server's backbone has weights sha256 {instruction.backbone_sha256[:16]}..., this site's "
            f"{cfg.backbone} has {model.weights_sha256[:16]}...; provision the same weights "
            f"file (`fedhead weights stage FILE`) before joining"
        )
    load_arrayrecord(model.trainable, instruction.arrays)
    extraction = resolve_extraction(site_cfg.device, site_cfg.precision)  # a missing GPU is named before any image is read
    run_id = str(context.run_id)
    # A ClientApp is a fresh process for every message: the state-dir remembers which data notes this run has logged.
    data = load_site_data(_data_path(cfg, site_cfg), cfg, name=site_cfg.site_name, state_dir=site_cfg.state_dir, run_id=run_id)
    site = _Site(cfg, site_cfg, instruction, model, data, run_id, extraction)
    model.place_trunk(site.extraction.device)  # built only if a feature is missing from the cache
    model.trainable.to(site.train_device)
    return site


def _answer(msg: Message, context: Context, handler: Callable[[_Site], RecordDict]) -> Message:
    """Run ``handler``; on any failure log it in full and send the server a path-free reason."""
    configure_logging()
    try:
        return Message(content=handler(_prepare(msg, context)), reply_to=msg)
    except FedHeadError as exc:  # a refusal or a named problem: its message says it all
        log.error("this site did not answer the server's %s request: %s", msg.metadata.message_type, exc)
        return Message(Error(code=_HANDLER_FAILED, reason=public_reason(exc)), reply_to=msg)
    except Exception as exc:  # the boundary: any other failure becomes an error reply, logged here with its traceback
        log.exception("this site could not answer the server's %s request", msg.metadata.message_type)
        return Message(Error(code=_HANDLER_FAILED, reason=public_reason(exc)), reply_to=msg)


def _centre_file(site: _Site, data_fingerprint: str) -> Path:
    """Where this run keeps this site's feature mean (named by the run and the data)."""
    return Path(site.site_cfg.state_dir) / "feature-centre" / f"{site.run_id}-{data_fingerprint[:16]}.pt"


def _exact_centre(site: _Site, train_source: FeatureSource) -> torch.Tensor:
    """Without record-level DP, the exact mean of the training features: computed once a run, kept for its later rounds.

    Nothing of it leaves the site but through the trained head (which client-level DP, if on, covers).
    """
    path = _centre_file(site, site.data.records_fingerprint())
    centre = read_kept_centre(path, feature_dim=first_linear(site.model.trainable).in_features)
    if centre is None:
        centre = feature_mean(train_source)
        keep_centre(path, centre, stale_days=OPTIMIZER_STATE_DAYS)
    return centre


def _train(site: _Site) -> RecordDict:
    started = time.monotonic()
    cfg, data = site.cfg, site.data
    # The site's policy and budget are checked before any feature is computed or any step taken.
    ledger = PrivacyLedger.in_state_dir(site.site_cfg.state_dir) if cfg.records_dp else None
    plan = (
        plan_round(cfg, num_examples=len(data.train), data_fingerprint=data.records_fingerprint(), ledger=ledger,
                   run_id=site.run_id, feature_dim=site.model.spec.feature_dim)
        if ledger is not None
        else None
    )
    check_policy(site.site_cfg, cfg, plan=plan, num_examples=len(data.train), backbone_sha256=site.model.weights_sha256)
    train_source = site.features("train", cfg.augment_views)
    val_source = site.features("val", 0)
    privacy = None
    state_dir = Path(site.site_cfg.state_dir)
    if plan is not None and ledger is not None:
        report, privacy = train_round_privately(
            site.model.trainable, train_source, data.train.labels, cfg,
            plan=plan, ledger=ledger, run_id=site.run_id,
            server_round=site.instruction.server_round, proximal_mu=site.instruction.proximal_mu,
            optimizer_state_file=state_dir / "dp-optimizer" / f"{site.run_id}.pt" if cfg.keep_optimizer_state else None,
            centre_file=_centre_file(site, plan.data_fingerprint) if cfg.centre_features else None,
        )
    else:
        centre = _exact_centre(site, train_source) if cfg.centre_features else None
        with centred_head(site.model.trainable, centre):
            report = train_locally(
                site.model.trainable,
                train_source if centre is None else CentredFeatures(train_source, centre),
                data.train.labels,
                val_source if centre is None else CentredFeatures(val_source, centre),
                data.val.labels,
                cfg,
                server_round=site.instruction.server_round,
                proximal_mu=site.instruction.proximal_mu,
            )
    metrics = TrainMetrics(
        num_examples=report.num_examples,
        train_loss=None if privacy else report.train_loss,  # under DP the loss on the site's records is not released
        epochs_run=report.epochs_run,
        backbone_forwards_train=train_source.forwards,
        backbone_forwards_eval=val_source.forwards,
        cache_hits=train_source.hits + val_source.hits,
        seconds=time.monotonic() - started,
    )
    return build_train_content(to_arrayrecord(site.model.trainable), metrics, site.info, privacy)


def _evaluate(site: _Site) -> RecordDict:
    data = site.data
    val_source = site.features("val", 0)
    scores, class_recall = {}, {}
    if len(data.val):
        scores, class_recall = evaluate_with_class_recall(site.model.trainable, val_source, data.val.labels, site.cfg.num_classes)
    metrics = EvaluateMetrics(num_examples=len(data.val), backbone_forwards_eval=val_source.forwards, **scores)
    return build_evaluate_content(metrics, site.info, class_recall)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received trainable part on this site's data; send back only that part."""
    return _answer(msg, context, _train)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received trainable part on this site's validation split."""
    return _answer(msg, context, _evaluate)
