"""msg: a small, dependable message broker.

Pub/sub topics and point-to-point queues over a JSON-lines protocol on TCP, with
persistence in plain files. Start a broker with ``python -m msg``; talk to it with
:class:`msg.client.Client` (asyncio) or :class:`msg.client.SyncClient` (blocking), or
with ``nc``.
"""

from msg.errors import MsgError

__all__ = ["MsgError", "__version__"]

__version__ = "0.1.0"
