"""Client-side clipping for client-level DP (``central-clipping = 'client'``): Flower's own mod, when asked.

Flower's :func:`~flwr.clientapp.mod.fixedclipping_mod` clips a site's update
to the norm that the server's ``DifferentialPrivacyClientSideFixedClipping``
wrapper puts into the train message, and answers an error to any message
without one. A fedhead site serves every kind of run, so the mod runs only on
train messages that carry the clip norm; the server checks the norm of what
comes back (``server.checked_strategy``).
"""

from __future__ import annotations

from flwr.app import Context, Message, MessageType
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

__all__ = ["clip_when_asked"]


def clip_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Apply ``fixedclipping_mod`` to train messages whose config carries a clip norm; pass others through."""
    asked = msg.metadata.message_type == MessageType.TRAIN and any(
        KEY_CLIPPING_NORM in record for record in msg.content.config_records.values()
    )
    return fixedclipping_mod(msg, context, call_next) if asked else call_next(msg, context)
