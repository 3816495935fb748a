"""Stable error codes.

An error reply carries a human-readable ``error`` text, which may change between
releases, and one of these ``code`` values, which will not: programs branch on the
code, people read the text. A new situation gets a new code rather than a new
meaning for an old one.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["ErrorCode"]


class ErrorCode(StrEnum):
    """The ``code`` field of an error reply."""

    BAD_JSON = "bad_json"
    """The line is not valid UTF-8 JSON (or nests too deeply to decode)."""
    BAD_REQUEST = "bad_request"
    """Valid JSON, but not a request: not an object, a field missing or mistyped."""
    UNKNOWN_ACTION = "unknown_action"
    """``action`` names no request this broker knows."""
    INVALID_TOPIC = "invalid_topic"
    """The topic or queue name breaks the naming rule, or is reserved."""
    TOO_LARGE = "too_large"
    """The request line is longer than the broker's ``max_message_bytes``."""
    UNKNOWN_MESSAGE = "unknown_message"
    """ack/nack of a message id that is not outstanding on this connection."""
    ALREADY_SUBSCRIBED = "already_subscribed"
    """This connection already has a subscription to that topic or queue."""
    NOT_SUBSCRIBED = "not_subscribed"
    """unsubscribe from something this connection is not subscribed to."""
    DURABLE_IN_USE = "durable_in_use"
    """Another connection is attached to that durable subscription."""
    STORAGE_FULL = "storage_full"
    """The message was not stored: the disk is (nearly) full. Nothing was acked."""
    STORAGE_ERROR = "storage_error"
    """The message was not stored: the storage failed. Nothing was acked."""
    QUEUE_FULL = "queue_full"
    """The queue holds its maximum number of messages."""
    TOO_MANY_CONNECTIONS = "too_many_connections"
    """The broker has as many connections as it allows; this one is closed."""
    SHUTTING_DOWN = "shutting_down"
    """The broker is stopping and accepts no new work."""
    INTERNAL_ERROR = "internal_error"
    """A bug in the broker. The connection is closed; the broker keeps running."""
