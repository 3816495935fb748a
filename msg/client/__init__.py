"""Clients for the msg broker.

:class:`Client` is the asyncio client; :class:`SyncClient` is a blocking client for
scripts, which runs a :class:`Client` on a private event loop in a background thread
(one protocol implementation, not two). Both speak the JSON-lines protocol of
:mod:`msg.protocol` and nothing else: this package never imports the broker.

::

    async with await Client.connect("localhost", 8888) as client:
        await client.publish("news", {"title": "hello"})

    with SyncClient.connect("localhost", 8888) as client:
        client.publish("news", {"title": "hello"})
"""

from msg.client.aio import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_HOST,
    DEFAULT_MAX_RECONNECT_ATTEMPTS,
    DEFAULT_PORT,
    DEFAULT_REQUEST_TIMEOUT,
    Client,
)
from msg.client.backoff import Backoff
from msg.client.errors import (
    BatchPublishError,
    ConnectFailedError,
    ConnectionClosedError,
    MsgError,
    PublishRefusedError,
    ReceiveTimeoutError,
    RemoteError,
    RequestTimeoutError,
    SlowConsumerError,
    StaleMessageError,
    SubscriptionClosedError,
)
from msg.client.subscription import DEFAULT_MAX_PENDING, Message, Subscription
from msg.client.sync import SyncClient, SyncMessage, SyncSubscription

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_HOST",
    "DEFAULT_MAX_PENDING",
    "DEFAULT_MAX_RECONNECT_ATTEMPTS",
    "DEFAULT_PORT",
    "DEFAULT_REQUEST_TIMEOUT",
    "Backoff",
    "BatchPublishError",
    "Client",
    "ConnectFailedError",
    "ConnectionClosedError",
    "Message",
    "MsgError",
    "PublishRefusedError",
    "ReceiveTimeoutError",
    "RemoteError",
    "RequestTimeoutError",
    "SlowConsumerError",
    "StaleMessageError",
    "Subscription",
    "SubscriptionClosedError",
    "SyncClient",
    "SyncMessage",
    "SyncSubscription",
]
