"""Stream framing and keep-alives for SIP over TCP/TLS (RFC 3261 §18.3, RFC 5626 §3.5.1).

The framer lives in :mod:`sipwake.sip.message` next to the parser it drives; this module
names the framing part of the API on its own.
"""

from sipwake.sip.message import (
    PONG,
    FramerEvent,
    FramingError,
    KeepAlivePing,
    StreamFramer,
    is_keepalive,
)

__all__ = ["PONG", "FramerEvent", "FramingError", "KeepAlivePing", "StreamFramer", "is_keepalive"]
