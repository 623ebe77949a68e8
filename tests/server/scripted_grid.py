"""A Flower Grid whose nodes answer from a script: the transport, replaced for tests of the server side.

Everything the server does with the replies (parsing, recording, Flower's
strategies, the run folder) is the real code; only the network is scripted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

__all__ = ["ScriptedGrid"]

Respond = Callable[[Message], Message | None]


class ScriptedGrid(Grid):
    """Nodes ``node_ids`` answer each message with ``respond(msg)``; None means no reply."""

    def __init__(self, node_ids: Iterable[int], respond: Respond) -> None:
        self.node_ids = list(node_ids)
        self.respond = respond
        self.sent: list[Message] = []

    def set_run(self, run):  # noqa: D102 - not used by the strategies
        raise NotImplementedError

    @property
    def run(self):  # noqa: D102
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # noqa: D102
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages):  # noqa: D102
        raise NotImplementedError

    def pull_messages(self, message_ids):  # noqa: D102
        raise NotImplementedError

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            self.sent.append(msg)
            reply = self.respond(msg)
            if reply is not None:
                replies.append(reply)
        return replies
