"""Sans-IO SIP (RFC 3261): message and URI model, parser, serializer and stream framing."""

from sipwake.sip.headers import CSeq, HeaderError, Headers, NameAddr, Via
from sipwake.sip.message import (
    PONG,
    REASON_PHRASES,
    FramerEvent,
    FramingError,
    KeepAlivePing,
    Message,
    Request,
    Response,
    SipParseError,
    StreamFramer,
    is_keepalive,
    make_response,
    parse_message,
)
from sipwake.sip.uri import AbsoluteUri, SipUri, TelUri, Uri, UriError, parse_uri

__all__ = [
    "PONG",
    "REASON_PHRASES",
    "AbsoluteUri",
    "CSeq",
    "FramerEvent",
    "FramingError",
    "HeaderError",
    "Headers",
    "KeepAlivePing",
    "Message",
    "NameAddr",
    "Request",
    "Response",
    "SipParseError",
    "SipUri",
    "StreamFramer",
    "TelUri",
    "Uri",
    "UriError",
    "Via",
    "is_keepalive",
    "make_response",
    "parse_message",
    "parse_uri",
]
