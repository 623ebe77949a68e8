"""Site receipts: the site signs every train reply it sends and keeps its own ledger of them.

The site's Ed25519 key lives in its ``state-dir`` (``keys/site-ed25519.pem``,
made on first use; its public half beside it in ``site-ed25519.pub``). :func:`sign_train_reply` is the ClientApp's outermost
mod, so it signs exactly what leaves the site (after Flower's clipping mod,
if that ran): the run id, the round, the site's name, the update's sha256,
the number of examples and the DP figures (:func:`common.protocol.receipt_payload`).
The signature travels in the reply's RECEIPT_RECORD, the server's audit log
embeds it, and the site appends the same receipt to ``receipts.jsonl`` in its
``state-dir``, fsynced, before the reply leaves: ``fedhead audit cross-check``
holds that ledger against the server's log.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from common.hashing import sha256_arrays
from common.protocol import (
    ARRAYS_RECORD,
    CONFIG_RECORD,
    METRICS_RECORD,
    PRIVACY_RECORD,
    RECEIPT_RECORD,
    SERVER_ROUND,
    SITE_NAME,
    SITE_RECORD,
    PrivacyReport,
    Receipt,
    TrainMetrics,
    metric_keys,
    receipt_payload,
)
from common.receipt_ledger import append_receipt, site_key_path, site_public_key_path
from common.signing import load_or_create_key, public_hex, sign_hex
from common.site_config import build_site_config

__all__ = ["sign_train_reply"]

log = logging.getLogger(__name__)


def sign_train_reply(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Sign the train reply that leaves this site, and record the receipt in the site's ledger first."""
    reply = call_next(msg, context)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error():
        return reply
    content = reply.content
    site_cfg = build_site_config(context.node_config)
    arrays = content.array_records[ARRAYS_RECORD]
    examples_key = next(key for key, f in metric_keys(TrainMetrics).items() if f.name == "num_examples")
    num_examples = int(content.metric_records[METRICS_RECORD][examples_key])
    problems: list[str] = []
    privacy = (
        PrivacyReport.from_record(content.config_records[PRIVACY_RECORD], problems)
        if PRIVACY_RECORD in content.config_records
        else None
    )
    fields = {
        "run_id": str(context.run_id),
        "server_round": int(msg.content.config_records[CONFIG_RECORD].get(SERVER_ROUND, 0)),
        "site": str(content.config_records[SITE_RECORD][SITE_NAME]),
        "update_sha256": sha256_arrays({name: arrays[name].numpy() for name in arrays}),
        "num_examples": num_examples,
        "privacy": privacy.to_json() if privacy else None,
    }
    key = load_or_create_key(site_key_path(site_cfg.state_dir))
    public = site_public_key_path(site_cfg.state_dir)
    if not public.exists():
        public.write_text(public_hex(key) + "\n")
    receipt = Receipt(public_hex(key), sign_hex(key, receipt_payload(**fields)))
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    append_receipt(site_cfg.state_dir, {"time": now, **fields, **receipt.to_json()})
    content[RECEIPT_RECORD] = receipt.to_record()
    log.info("round %d: signed the update %s... for run %s", fields["server_round"], fields["update_sha256"][:16], fields["run_id"])
    return reply
