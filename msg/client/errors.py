"""The client's exceptions: the shared ones from :mod:`msg.errors`, and a few of its own.

Every exception derives from :class:`~msg.errors.MsgError`. The ones only the client
raises live here; they subclass the shared ones where that keeps a broad ``except``
clause working (a failed connect *is* a ``ConnectionClosedError``, and so a
``ConnectionError``).
"""

from __future__ import annotations

from msg.errors import ConnectionClosedError, MsgError, RemoteError, RequestTimeoutError

__all__ = [
    "BatchPublishError",
    "ConnectFailedError",
    "ConnectionClosedError",
    "MsgError",
    "PublishRefusedError",
    "ReceiveTimeoutError",
    "RemoteError",
    "RequestTimeoutError",
    "SlowConsumerError",
    "StaleMessageError",
    "SubscriptionClosedError",
]


class ConnectFailedError(ConnectionClosedError):
    """No connection to the broker could be opened (refused, unreachable, timed out,
    or the peer did not answer the handshake like a msg broker)."""


class PublishRefusedError(RemoteError):
    """The broker refused a publish sent with ``reply=False``.

    Nobody awaits such a publish, so this is not raised: the client hands it to its
    ``error_callback`` (by default, logged as a warning). ``code`` and ``text`` are as
    for any :class:`~msg.errors.RemoteError`; ``request_id`` is the id the client gave
    the request (None if the broker could not read one), which tells refusals apart
    and orders them among the client's other requests.
    """

    def __init__(self, code: str, text: str, reply: dict[str, object]) -> None:
        super().__init__(code, text, reply)
        rid = reply.get("id")
        # The client only sends integer ids, which the broker echoes as they came.
        self.request_id: int | None = rid if type(rid) is int else None


class SubscriptionClosedError(MsgError):
    """``next()`` on a subscription that was unsubscribed or whose client was closed."""


class ReceiveTimeoutError(MsgError, TimeoutError):
    """``Subscription.next(timeout=...)`` waited that long and no message came."""


class SlowConsumerError(MsgError):
    """An auto-ack subscription was full and messages for it had to be dropped.

    Raised once by :meth:`Subscription.next` before the messages that were kept;
    iterating again continues with them. ``dropped`` counts the messages lost since the
    previous report, ``pending`` is how many the subscription held at the time, and
    ``max_pending`` its limit. See "Flow control" in :mod:`msg.client.aio` for when the
    client drops rather than pushing back.
    """

    def __init__(self, topic: str, dropped: int, pending: int, max_pending: int) -> None:
        super().__init__(
            f"slow consumer on {topic!r}: {dropped} messages dropped "
            f"({pending} pending, limit {max_pending})"
        )
        self.topic = topic
        self.dropped = dropped
        self.pending = pending
        self.max_pending = max_pending


class StaleMessageError(MsgError):
    """ack/nack of a message that came over a connection that has since been lost.

    The broker forgets what a connection held when it goes: an unacked queue message
    is handed out again (perhaps to this client, as a new delivery) and a durable
    subscription resumes from its last acked position. So there is nothing left to
    settle, and the client says so instead of sending a request the broker would only
    answer with ``unknown_message``.
    """

    def __init__(self, message_id: str) -> None:
        super().__init__(
            f"message {message_id!r} was delivered on a connection that has since been "
            "lost; the broker will deliver it again, so it cannot be acked or nacked now"
        )
        self.message_id = message_id


class BatchPublishError(MsgError):
    """Some publishes of a :meth:`Client.publish_many` call were refused.

    ``results`` has one entry per message, in order: the message id if it was stored,
    or the :class:`~msg.errors.RemoteError` the broker answered with.
    """

    def __init__(self, results: list[str | RemoteError]) -> None:
        errors = [r for r in results if isinstance(r, RemoteError)]
        super().__init__(
            f"{len(errors)} of {len(results)} publishes were refused; first: {errors[0]}"
            if errors
            else "no publish was refused"
        )
        self.results = results
        self.errors = errors
