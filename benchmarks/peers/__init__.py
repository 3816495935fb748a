"""Protocol drivers: one minimal raw-socket client per broker protocol.

Each driver (a :class:`~benchmarks.peers.base.Driver`) pre-encodes publish frames,
sets up subscribers and queue consumers with blocking handshakes, and hands the load
generator non-blocking :class:`~benchmarks.peers.base.Receiver` objects whose
per-read work is a few C-level calls. No client library is used for any protocol.
"""

from __future__ import annotations

from benchmarks.peers.amqp import AmqpDriver
from benchmarks.peers.base import Driver
from benchmarks.peers.mqtt import MqttDriver
from benchmarks.peers.msg import MsgDriver, MsgNoReplyDriver, RelayDriver
from benchmarks.peers.nats import NatsDriver, NatsVerboseDriver
from benchmarks.peers.redis import RedisDriver

DRIVERS: dict[str, type[Driver]] = {
    "msg": MsgDriver,
    "msg-noreply": MsgNoReplyDriver,
    "relay": RelayDriver,
    "redis": RedisDriver,
    "nats": NatsDriver,
    "nats-verbose": NatsVerboseDriver,
    "mqtt": MqttDriver,
    "amqp": AmqpDriver,
}


def get_driver(name: str, host: str, port: int, run_id: str) -> Driver:
    """The driver for protocol ``name`` talking to ``host:port``."""
    return DRIVERS[name](host, port, run_id)


__all__ = ["DRIVERS", "Driver", "get_driver"]
