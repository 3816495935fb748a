"""The msg wire protocol, without any IO.

JSON objects, one per line, in both directions. :mod:`.codec` turns bytes into
request frames and reply frames into bytes; :mod:`.frames` defines the frames;
:mod:`.codes` the stable error codes; :mod:`.names` the rule for topic and queue
names. Nothing here touches sockets, files, clocks or the event loop, so every
piece can be tested by feeding it bytes.
"""

from msg.protocol.codec import RequestReader, encode_request
from msg.protocol.codes import ErrorCode
from msg.protocol.frames import (
    Ack,
    AckMode,
    Mode,
    Nack,
    Ping,
    Publish,
    Request,
    RequestError,
    Status,
    Subscribe,
    Unsubscribe,
)

__all__ = [
    "Ack",
    "AckMode",
    "ErrorCode",
    "Mode",
    "Nack",
    "Ping",
    "Publish",
    "Request",
    "RequestError",
    "RequestReader",
    "Status",
    "Subscribe",
    "Unsubscribe",
    "encode_request",
]
