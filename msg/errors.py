"""The exceptions msg raises.

Every exception msg defines derives from :class:`MsgError`, so callers can catch
everything msg-specific in one clause. Where a builtin exception describes the same
situation, the msg exception also derives from it (``RequestTimeoutError`` is a
``TimeoutError``), so generic handlers keep working.

This module imports nothing from msg: every other module may import it.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "ConnectionClosedError",
    "MsgError",
    "ProtocolError",
    "RemoteError",
    "RequestTimeoutError",
    "StorageError",
]


class MsgError(Exception):
    """Root of every exception msg raises."""


class ConfigError(MsgError, ValueError):
    """A configuration value is missing, malformed or out of range."""


class ProtocolError(MsgError):
    """A peer sent bytes that do not follow the msg protocol.

    ``code`` is the stable error code (see :class:`msg.protocol.codes.ErrorCode`)
    that the broker puts in its error reply.
    """

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


class StorageError(MsgError, OSError):
    """The storage layer could not do what was asked (disk full, I/O error, ...)."""


class RemoteError(MsgError):
    """The broker answered a client request with an error reply.

    ``code`` is the stable error code; ``text`` the broker's explanation; ``reply``
    the whole error frame as received.
    """

    def __init__(self, code: str, text: str, reply: dict[str, object]) -> None:
        super().__init__(f"{code}: {text}")
        self.code = code
        self.text = text
        self.reply = reply


class ConnectionClosedError(MsgError, ConnectionError):
    """The connection to the broker closed while a request was outstanding."""


class RequestTimeoutError(MsgError, TimeoutError):
    """The broker did not answer a request in time."""
