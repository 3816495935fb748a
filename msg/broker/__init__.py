"""The broker process: the asyncio server that connects sockets, core and store.

``python -m msg.broker`` starts it, exactly like ``python -m msg``.
"""

from msg.broker.server import Server, open_store

__all__ = ["Server", "open_store"]
