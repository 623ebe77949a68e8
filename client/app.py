"""The ClientApp a site runs: thin handlers around real functions.

A ClientApp process lives for one message, so everything a site keeps between
rounds (the feature cache) is on disk. Before touching any data the site checks
that the server's backbone is the one it has.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.feature_cache import FeatureCache
from client.feature_source import build_feature_source
from client.site_data import SiteData, load_site_data, resolve_site_data_path, site_name
from client.training import evaluate_locally, train_locally
from common.config import RunConfig, build_run_config
from common.errors import FingerprintError
from common.exchange import load_arrayrecord, to_arrayrecord
from common.logs import configure_logging
from common.model import SplitModel, build_split_model

__all__ = ["app"]

log = logging.getLogger(__name__)

app = ClientApp()


def _prepare(msg: Message, context: Context) -> tuple[RunConfig, SplitModel, SiteData]:
    configure_logging()
    cfg = build_run_config(context.run_config)
    model = build_split_model(cfg)
    expected = msg.content["config"].get("backbone-sha256", "")
    if expected != model.weights_sha256:
        raise FingerprintError(
            f"the server's backbone has weights sha256 {str(expected)[:16]}..., this site's "
            f"{cfg.backbone} has {model.weights_sha256[:16]}...; provision the same weights "
            f"file (`fedhead weights stage FILE`) before joining"
        )
    load_arrayrecord(model.trainable, msg.content["arrays"])
    name = site_name(context.node_config)
    path = resolve_site_data_path(context.node_config, cfg)
    site = load_site_data(path, cfg, name=name)
    return cfg, model, site


def _cache(cfg: RunConfig, node_config: Mapping[str, Any]) -> FeatureCache | None:
    """The site's feature cache: node_config's ``cache-dir`` (the site's own disk) wins over the run's."""
    if not cfg.cache_features:
        return None
    return FeatureCache(Path(str(node_config.get("cache-dir", cfg.cache_dir))).expanduser())


def _site_record(site: SiteData, model: SplitModel) -> ConfigRecord:
    return ConfigRecord({"site": site.name, "backbone-sha256": model.weights_sha256, "skipped-images": len(site.skipped)})


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received trainable part on this site's data; send back only that part."""
    started = time.monotonic()
    cfg, model, site = _prepare(msg, context)
    server_round = int(msg.content["config"].get("server-round", 0))
    cache = _cache(cfg, context.node_config)
    train_source = build_feature_source(
        model, site.train, cache=cache, augment_views=cfg.augment_views, seed=cfg.seed, label=f"{site.name} train"
    )
    val_source = build_feature_source(model, site.val, cache=cache, augment_views=0, seed=cfg.seed, label=f"{site.name} val")
    report = train_locally(
        model.trainable,
        train_source,
        site.train.labels,
        val_source,
        site.val.labels,
        cfg,
        server_round=server_round,
        proximal_mu=float(msg.content["config"].get("proximal-mu", 0.0)),
    )
    metrics = MetricRecord(
        {
            "num-examples": report.num_examples,
            "train-loss": report.train_loss,
            "epochs-run": report.epochs_run,
            "backbone-forwards-train": train_source.forwards,
            "backbone-forwards-eval": val_source.forwards,
            "cache-hits": train_source.hits + val_source.hits,
            "seconds": time.monotonic() - started,
        }
    )
    content = RecordDict({"arrays": to_arrayrecord(model.trainable), "metrics": metrics, "site": _site_record(site, model)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received trainable part on this site's validation split."""
    cfg, model, site = _prepare(msg, context)
    val_source = build_feature_source(
        model, site.val, cache=_cache(cfg, context.node_config), augment_views=0, seed=cfg.seed, label=f"{site.name} val"
    )
    scores = evaluate_locally(model.trainable, val_source, site.val.labels, cfg.num_classes)
    metrics = MetricRecord(
        {
            "num-examples": len(site.val),
            **{f"eval-{k}": v for k, v in scores.items()},
            "backbone-forwards-eval": val_source.forwards,
        }
    )
    return Message(content=RecordDict({"metrics": metrics, "site": _site_record(site, model)}), reply_to=msg)
