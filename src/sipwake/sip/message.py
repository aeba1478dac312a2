"""SIP requests and responses (RFC 3261 §7): the model, parser, serializer and stream framer.

Sans-IO: :func:`parse_message` turns the bytes of one message into a :class:`Request` or
:class:`Response`, and ``to_bytes()`` turns it back. Header fields stay as the text that
arrived and are written back byte for byte unless changed; parsed views (``top_via``,
``from_``, ``contacts``...) are built on first read and cached.

A message that cannot be accepted raises :class:`SipParseError` carrying the status to
answer with (400, 505, 513) and a reason phrase naming the problem; when the broken message
is a response, ``is_response`` tells the caller to drop it (RFC 4475 §3.1.2.5, §3.1.2.19).

:class:`StreamFramer` cuts a TCP/TLS byte stream into messages by Content-Length and reports
double-CRLF keep-alive pings (answer with :data:`PONG`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

from sipwake.sip.headers import (
    NAME_ADDR_LENIENT_SYNTAX,
    NAME_ADDR_SYNTAX,
    VIA_SYNTAX,
    CSeq,
    HeaderError,
    Headers,
    NameAddr,
    Via,
    canonical_key,
    name_addr_fast,
    parse_uint,
    split_list,
    via_fast,
)
from sipwake.sip.uri import SipUri, Uri, UriError, is_request_uri, parse_uri

__all__ = [
    "PONG",
    "REASON_PHRASES",
    "CSeq",
    "FramerEvent",
    "FramingError",
    "Headers",
    "KeepAlivePing",
    "Message",
    "NameAddr",
    "Request",
    "Response",
    "SipParseError",
    "StreamFramer",
    "Via",
    "is_keepalive",
    "make_response",
    "parse_message",
]

SIP_VERSION = "SIP/2.0"
DEFAULT_MAX_SIZE = 65535

REASON_PHRASES: dict[int, str] = {
    100: "Trying",
    110: "Push sent",
    180: "Ringing",
    181: "Call Is Being Forwarded",
    182: "Queued",
    183: "Session Progress",
    200: "OK",
    202: "Accepted",
    300: "Multiple Choices",
    301: "Moved Permanently",
    302: "Moved Temporarily",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    406: "Not Acceptable",
    407: "Proxy Authentication Required",
    408: "Request Timeout",
    410: "Gone",
    413: "Request Entity Too Large",
    414: "Request-URI Too Long",
    415: "Unsupported Media Type",
    416: "Unsupported URI Scheme",
    420: "Bad Extension",
    421: "Extension Required",
    423: "Interval Too Brief",
    480: "Temporarily Unavailable",
    481: "Call/Transaction Does Not Exist",
    482: "Loop Detected",
    483: "Too Many Hops",
    484: "Address Incomplete",
    485: "Ambiguous",
    486: "Busy Here",
    487: "Request Terminated",
    488: "Not Acceptable Here",
    489: "Bad Event",
    491: "Request Pending",
    500: "Server Internal Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Server Time-out",
    505: "Version Not Supported",
    513: "Message Too Large",
    555: "Push Notification Service Not Supported",
    600: "Busy Everywhere",
    603: "Decline",
    604: "Does Not Exist Anywhere",
    606: "Not Acceptable",
}

# Fields a request must carry (RFC 3261 §8.1.1) and fields that may appear only once.
REQUIRED_HEADERS = ("to", "from", "cseq", "call-id", "max-forwards", "via")
SINGLE_HEADERS = frozenset(
    {"to", "from", "cseq", "call-id", "max-forwards", "content-length", "content-type", "expires"}
)


class SipParseError(Exception):
    """A message that cannot be accepted: answer ``status reason`` (or drop a response)."""

    def __init__(
        self,
        status: int,
        reason: str,
        *,
        is_response: bool = False,
        partial: Request | None = None,
    ) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason
        self.is_response = is_response
        self.partial = partial


class Message:
    """What requests and responses share: version, header fields, body, parsed views."""

    __slots__ = ("_wire", "_wire_length", "_wire_start", "body", "headers", "version")

    def __init__(self, headers: Headers | None, body: bytes, version: str) -> None:
        self.headers = headers if headers is not None else Headers()
        self.body = body
        self.version = version
        # The head as received, reused by to_bytes() while nothing in it has changed.
        self._wire: bytes | None = None
        self._wire_start: tuple[object, ...] = ()
        self._wire_length: int | None = None

    def _start_line(self) -> str:
        raise NotImplementedError

    def _start_state(self) -> tuple[object, ...]:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """The message on the wire; Content-Length is set to the body's length.

        Header fields are written as received unless changed through ``headers``; parsed
        views are read-only projections (change a field with ``headers.set``).
        """
        h = self.headers
        if (
            self._wire is not None
            and not h._modified
            and self._wire_length == len(self.body)
            and self._wire_start == self._start_state()
        ):
            return self._wire + self.body if self.body else self._wire
        size = str(len(self.body))
        found = False
        for entry in h._entries:
            if entry[0] == "content-length":
                found = entry[2] == size
                break
        if not found:
            h.set("Content-Length", size)
        lines = [self._start_line(), *h.lines(), "\r\n"]
        head = "\r\n".join(lines).encode("utf-8", "surrogateescape")
        return head + self.body if self.body else head

    # --- parsed views, built on first read and cached until the fields change ---------

    def _cached(self, key: str) -> object:
        return self.headers._cache.get(key, _MISSING)

    @property
    def via_list(self) -> list[Via]:
        cache = self.headers._cache
        got = cache.get("via", _MISSING)
        if got is _MISSING:
            got = [Via.parse(v) for v in self.headers.get_all("via")]
            cache["via"] = got
        return cast(list[Via], got)

    @property
    def top_via(self) -> Via | None:
        vias = self.via_list
        return vias[0] if vias else None

    def _name_addr(self, key: str) -> NameAddr | None:
        got = self._cached(key)
        if got is _MISSING:
            value = self.headers.get(key)
            got = NameAddr.parse(value) if value is not None else None
            self.headers._cache[key] = got
        return cast(NameAddr | None, got)

    def _name_addr_list(self, key: str) -> list[NameAddr]:
        cache_key = key + "*"
        got = self._cached(cache_key)
        if got is _MISSING:
            got = [NameAddr.parse(v) for v in self.headers.get_all(key)]
            self.headers._cache[cache_key] = got
        return cast(list[NameAddr], got)

    @property
    def from_(self) -> NameAddr | None:
        return self._name_addr("from")

    @property
    def to(self) -> NameAddr | None:
        return self._name_addr("to")

    @property
    def contacts(self) -> list[NameAddr]:
        """Contact values; ``Contact: *`` gives one value whose ``is_wildcard`` is True."""
        return self._name_addr_list("contact")

    @property
    def routes(self) -> list[NameAddr]:
        return self._name_addr_list("route")

    @property
    def record_routes(self) -> list[NameAddr]:
        return self._name_addr_list("record-route")

    @property
    def call_id(self) -> str | None:
        return self.headers.get("call-id")

    @property
    def cseq(self) -> CSeq | None:
        got = self._cached("cseq")
        if got is _MISSING:
            value = self.headers.get("cseq")
            got = CSeq.parse(value) if value is not None else None
            self.headers._cache["cseq"] = got
        return cast(CSeq | None, got)

    @property
    def max_forwards(self) -> int | None:
        value = self.headers.get("max-forwards")
        number = None if value is None else parse_uint(value)
        return number if number is not None and number <= 255 else None

    @property
    def expires(self) -> int | None:
        """The Expires field in seconds; None when absent or out of range (use the default)."""
        value = self.headers.get("expires")
        number = None if value is None else parse_uint(value)
        return number if number is not None and number <= 2**32 - 1 else None

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("content-length")
        return None if value is None else parse_uint(value)

    def missing_headers(self) -> list[str]:
        """Mandatory fields (RFC 3261 §8.1.1) that are absent, as lower-case names."""
        present = {e[0] for e in self.headers._entries}
        return [name for name in REQUIRED_HEADERS if name not in present]

    def repeated_single_headers(self) -> list[str]:
        """Single-valued fields given more than once (RFC 4475 §3.3.8: answer 400)."""
        seen: set[str] = set()
        repeated: list[str] = []
        for entry in self.headers._entries:
            key = entry[0]
            if key in SINGLE_HEADERS:
                if key in seen and key not in repeated:
                    repeated.append(key)
                seen.add(key)
        return repeated


_MISSING = object()


class Request(Message):
    """A SIP request. ``uri`` is the Request-URI text; ``parsed_uri`` its parsed form."""

    __slots__ = ("_parsed_uri", "method", "uri")

    def __init__(
        self,
        method: str,
        uri: str,
        headers: Headers | None = None,
        body: bytes = b"",
        version: str = SIP_VERSION,
    ) -> None:
        super().__init__(headers, body, version)
        self.method = method
        self.uri = uri
        self._parsed_uri: tuple[str, Uri] | None = None

    @property
    def parsed_uri(self) -> Uri:
        """The Request-URI as SipUri, TelUri or AbsoluteUri (unknown scheme: answer 416)."""
        cached = self._parsed_uri
        if cached is not None and cached[0] == self.uri:
            return cached[1]
        parsed = parse_uri(self.uri)
        self._parsed_uri = (self.uri, parsed)
        return parsed

    def _start_line(self) -> str:
        return f"{self.method} {self.uri} {self.version}"

    def _start_state(self) -> tuple[object, ...]:
        return (self.method, self.uri, self.version)

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.uri}>"


class Response(Message):
    """A SIP response."""

    __slots__ = ("reason", "status")

    def __init__(
        self,
        status: int,
        reason: str | None = None,
        headers: Headers | None = None,
        body: bytes = b"",
        version: str = SIP_VERSION,
    ) -> None:
        super().__init__(headers, body, version)
        self.status = status
        self.reason = REASON_PHRASES.get(status, "") if reason is None else reason

    def _start_line(self) -> str:
        return f"{self.version} {self.status} {self.reason}"

    def _start_state(self) -> tuple[object, ...]:
        return (self.status, self.reason, self.version)

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason}>"


# --- parser --------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+\Z")
_VERSION_RE = re.compile(r"SIP/[0-9]+\.[0-9]+\Z", re.IGNORECASE)
_DATE_RE = re.compile(
    r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun), [0-9]{2} "
    r"(Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) [0-9]{4} "
    r"[0-9]{2}:[0-9]{2}:[0-9]{2} GMT\Z"
)
_LWS = " \t"
# Header names as sent (maybe with spaces before the colon) -> (lookup key, clean name).
_known_names: dict[str, tuple[str, str]] = {}


def _bad(reason: str, is_response: bool, partial: Request | None = None) -> SipParseError:
    if is_response:
        return SipParseError(400, f"Bad Response - {reason}", is_response=True)
    return SipParseError(400, f"Bad Request - {reason}", partial=partial)


def parse_message(
    data: bytes, *, datagram: bool = True, max_size: int = DEFAULT_MAX_SIZE
) -> Request | Response:
    """Parse one SIP message.

    ``datagram``: octets beyond Content-Length are ignored, and a missing Content-Length
    means the body is the rest of the datagram. Raises :class:`SipParseError`.
    """
    is_response = data[:4].upper() == b"SIP/"
    if len(data) > max_size:
        raise SipParseError(513, "Message Too Large", is_response=is_response)
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return _parse_lenient(data, datagram, max_size, is_response)
    head = data[:head_end].decode("utf-8", "surrogateescape")
    start, _, fields = head.partition("\r\n")
    lines = fields.split("\r\n") if fields else []
    # An LF of the head that ends no CRLF line (a bare-LF line end, maybe inside one line of
    # an otherwise CRLF message, or an earlier LF empty line), or a CR that ends no line,
    # goes the slow way, where every LF ends a line as for the parsers behind us: what we
    # forward is read as we read it. Joined lines and memchr: cheaper than counting.
    rest = "".join(lines)
    if not start or "\n" in start or "\r" in start or "\n" in rest or "\r" in rest:
        return _parse_lenient(data, datagram, max_size, is_response)

    entries: list[tuple[str, str, str, str | None]] = []
    headers = Headers._from_entries(entries)  # filled in place below: a partial sees it
    msg: Request | Response
    partial: Request | None = None
    pending: SipParseError | None = None
    if is_response:
        msg = _parse_status_line(start, headers)
    else:
        msg, pending = _parse_request_line(start, headers)
        partial = msg

    if lines:
        _split_fields(lines, entries, is_response, partial)
    if pending is not None:
        pending.partial = partial
        raise pending

    body_start = head_end + 4
    cl_values = [e[2] for e in entries if e[0] == "content-length"]
    if len(cl_values) > 1:
        raise _bad("multiple Content-Length values", is_response, partial)
    if cl_values:
        text = cl_values[0]
        length = parse_uint(text)
        if length is None:
            what = "negative Content-Length" if text.startswith("-") else "invalid Content-Length"
            raise _bad(what, is_response, partial)
        if body_start + length > len(data):
            raise _bad("Content-Length larger than message", is_response, partial)
        msg.body = data[body_start : body_start + length]
        msg._wire_length = length
    else:
        msg.body = data[body_start:]

    _check_fields(msg, is_response, partial)
    msg._wire = data[:body_start]
    msg._wire_start = msg._start_state()
    return msg


_BLANK_LINE = re.compile(rb"\r?\n\r?\n")
_LENIENT = NAME_ADDR_LENIENT_SYNTAX.match


def _parse_lenient(
    data: bytes, datagram: bool, max_size: int, is_response: bool
) -> Request | Response:
    """Parse a message whose lines end in bare LF, or that has CRLFs before its start line.

    Some phones send these; like Kamailio we read them (a line ends at LF, with or without
    CR before it) and go on with the message rewritten with CRLF line ends, so what we
    forward or answer is in correct form. A bare LF inside a line of a CRLF message ends
    that line too: a parser behind us that splits at LF reads the same fields as we do
    (and we check them). The head ends at the first empty line, as in
    :class:`StreamFramer`. A CR that does not end a line stays ambiguous and is refused.
    Only this slow path pays.
    """
    text = data.lstrip(b"\r\n")
    blank = _BLANK_LINE.search(text)
    if blank is None:
        raise _bad("no empty line after the header fields", is_response)
    head = text[: blank.start()].replace(b"\r\n", b"\n")
    if b"\r" in head:
        raise _bad("CR without LF in the header", is_response)
    fixed = head.replace(b"\n", b"\r\n") + b"\r\n\r\n" + text[blank.end() :]
    # The rewritten head has one empty line, at its end, and a start line: no way back here.
    return parse_message(fixed, datagram=datagram, max_size=max_size + len(fixed) - len(data))


def _split_fields(
    lines: list[str],
    entries: list[tuple[str, str, str, str | None]],
    is_response: bool,
    partial: Request | None,
) -> None:
    """Split header lines into (key, name, value, line), unfolding continuation lines."""
    known, lws, append = _known_names, _LWS, entries.append
    for line in lines:
        if line[0] in lws:
            if not entries:
                raise _bad("header folding before the first field", is_response, partial)
            prev = entries[-1]
            folded = (prev[2] + " " + line.strip(_LWS)).strip(_LWS)
            entries[-1] = (prev[0], prev[1], folded, f"{prev[3]}\r\n{line}")
            continue
        name, colon, value = line.partition(":")
        if not colon:
            raise _bad("header line without a colon", is_response, partial)
        seen = known.get(name)
        if seen is None:
            clean = name.rstrip(_LWS)
            if not _TOKEN_RE.match(clean):
                raise _bad(f"invalid header name {clean[:40]!r}", is_response, partial)
            seen = (canonical_key(clean), clean)
            if len(known) < 1024:
                known[name] = seen
        append((seen[0], seen[1], value.strip(lws), line))


def _parse_request_line(line: str, headers: Headers) -> tuple[Request, SipParseError | None]:
    """The request, plus the error to raise once the header fields are read."""
    parts = line.split(" ")
    if len(parts) != 3 or not all(parts):
        words = line.split()
        req = Request(words[0] if words else "", words[1] if len(words) > 1 else "", headers)
        if line.endswith(" ") or "  " in line:
            return req, _bad("extra spaces in the Request-Line", False)
        return req, _bad("malformed Request-Line", False)
    method, uri, version = parts
    req = Request(method, uri, headers, version=version)
    if not _TOKEN_RE.match(method):
        return req, _bad("invalid method", False)
    if not _VERSION_RE.match(version):
        return req, _bad("malformed SIP version", False)
    if version.upper() != SIP_VERSION:
        return req, SipParseError(505, "Version Not Supported")
    return req, None


def _parse_status_line(line: str, headers: Headers) -> Response:
    version, _, rest = line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not _VERSION_RE.match(version):
        raise _bad("malformed SIP version", True)
    if version.upper() != SIP_VERSION:
        raise SipParseError(505, "Version Not Supported", is_response=True)
    status = parse_uint(code, 3)
    if status is None or len(code) != 3 or not 100 <= status <= 699:
        raise _bad("invalid status code", True)
    return Response(status, reason, headers, version=version)


def _check_fields(msg: Request | Response, is_response: bool, partial: Request | None) -> None:
    """Check the fields every element relies on, so a broken one is answered with 400.

    Structured values are checked with one regular expression each; the objects are built
    only when read. On failure the object parser runs to name the problem precisely.
    """
    request = msg if isinstance(msg, Request) else None
    method = request.method if request is not None else None
    if request is not None and not is_request_uri(request.uri):
        raise _bad(_uri_problem(request.uri), is_response, partial)
    stars = contacts = 0
    cseq_seen = False
    checks, name_addr_ok, via_ok = _CHECKS, NAME_ADDR_SYNTAX.match, VIA_SYNTAX.match
    for key, name, value, _raw in msg.headers._entries:
        kind = checks.get(key)
        if kind is None:
            continue
        # name_addr_fast/via_fast: True only where the regex matches (never for "*").
        if kind == _NAME_ADDR:
            if not name_addr_fast(value) and (
                (not name_addr_ok(value) and not _LENIENT(value)) or value == "*"
            ):
                raise _bad(_field_problem(name, value, NameAddr.parse), is_response, partial)
        elif kind == _NAME_ADDR_LIST:
            items = _split(name, value, is_response, partial) if "," in value else [value]
            for item in items:
                if not name_addr_fast(item) and (
                    (not name_addr_ok(item) and not _LENIENT(item))
                    or (item == "*" and key != "contact")
                ):
                    raise _bad(_field_problem(name, item, NameAddr.parse), is_response, partial)
            if key == "contact":
                contacts += len(items)
                stars += items.count("*")
        elif kind == _VIA:
            for item in _split(name, value, is_response, partial) if "," in value else [value]:
                if not via_fast(item) and not via_ok(item):
                    raise _bad(_field_problem(name, item, Via.parse), is_response, partial)
        elif kind == _CSEQ:
            if not cseq_seen:
                cseq_seen = True
                try:
                    cseq = CSeq.parse(value)
                except HeaderError as exc:
                    raise _bad(f"invalid CSeq: {exc}", is_response, partial) from None
                msg.headers._cache["cseq"] = cseq
                if method is not None and cseq.method != method:
                    raise _bad("CSeq method does not match the Request-Line", is_response, partial)
        elif kind == _MAX_FORWARDS:
            hops = parse_uint(value)
            if hops is None or hops > 255:
                raise _bad("invalid Max-Forwards: value out of range", is_response, partial)
        elif not _DATE_RE.match(value):
            raise _bad("invalid Date: not an RFC 1123 date in GMT", is_response, partial)
    if stars and contacts > 1:
        raise _bad("invalid Contact: '*' must be the only value", is_response, partial)


def _split(name: str, value: str, is_response: bool, partial: Request | None) -> list[str]:
    try:
        return split_list(value)
    except HeaderError as exc:
        raise _bad(f"invalid {name}: {exc}", is_response, partial) from None


_VIA, _NAME_ADDR, _NAME_ADDR_LIST, _CSEQ, _MAX_FORWARDS, _DATE = range(6)
_CHECKS: dict[str, int] = {
    "via": _VIA,
    "from": _NAME_ADDR,
    "to": _NAME_ADDR,
    "contact": _NAME_ADDR_LIST,
    "route": _NAME_ADDR_LIST,
    "record-route": _NAME_ADDR_LIST,
    "cseq": _CSEQ,
    "max-forwards": _MAX_FORWARDS,
    "date": _DATE,
}


def _uri_problem(uri: str) -> str:
    try:
        parsed = parse_uri(uri)
    except UriError as exc:
        return f"invalid Request-URI: {exc}"
    if isinstance(parsed, SipUri) and parsed.headers:
        return "invalid Request-URI: header components are not allowed"
    return "invalid Request-URI"


def _field_problem(name: str, value: str, parser: Callable[[str], object]) -> str:
    try:
        parser(value)
    except (HeaderError, UriError) as exc:
        return f"invalid {name}: {exc}"
    return f"invalid {name}: malformed value"


# --- responses -----------------------------------------------------------------------------


def make_response(
    request: Request,
    status: int,
    reason: str | None = None,
    *,
    to_tag: str | None = None,
    fields: Iterable[tuple[str, str, str, str | None]] = (),
) -> Response:
    """A response to ``request`` with Via, From, To, Call-ID and CSeq copied (§8.2.6).

    ``fields`` (from :func:`field_entries`) follow Content-Length: appended in one pass,
    they cost less than ``headers.add`` for each (the keep-alive OPTIONS answer is built
    per request, its fields once).
    """
    entries: list[tuple[str, str, str, str | None]] = []
    copied, append = _COPIED, entries.append
    for entry in request.headers._entries:
        key = entry[0]
        if key not in copied:
            continue
        if key == "to" and to_tag is not None:
            if "tag" not in entry[2].lower():  # no tag parameter: append one, no parse
                append((key, entry[1], f"{entry[2]};tag={to_tag}", None))
                continue
            to = NameAddr.parse(entry[2])
            if to.tag is None:
                to.tag = to_tag
                append((key, entry[1], to.to_string(), None))
                continue
        append(entry)
    append(_NO_BODY)
    entries.extend(fields)
    return Response(status, reason, Headers._from_entries(entries), version=SIP_VERSION)


_COPIED = frozenset({"via", "from", "to", "call-id", "cseq"})
#: The Content-Length of a response without a body, with its wire line.
_NO_BODY = ("content-length", "Content-Length", "0", "Content-Length: 0")


# --- stream framing and keep-alives (RFC 3261 §18.3, RFC 5626 §3.5.1) ---------------------

PING = b"\r\n\r\n"
PONG = b"\r\n"


@dataclass(frozen=True, slots=True)
class KeepAlivePing:
    """The peer sent a double-CRLF ping: write :data:`PONG` back on the same connection."""


@dataclass(frozen=True, slots=True)
class FramingError:
    """A message that could not be accepted. ``fatal``: the stream is out of sync, close it.

    ``error.status``/``error.reason`` say what to answer (unless ``error.is_response``).
    """

    error: SipParseError
    fatal: bool


FramerEvent = Request | Response | KeepAlivePing | FramingError

_CONTENT_LENGTH_RE = re.compile(rb"^(?:content-length|l)[ \t]*:[ \t]*([^\r\n]*)", re.I | re.M)


def is_keepalive(datagram: bytes) -> bool:
    """True when a datagram carries only CRLFs (a keep-alive; no answer is expected)."""
    return bool(datagram) and not datagram.strip(b"\r\n")


class StreamFramer:
    """Cuts a byte stream into SIP messages and keep-alive pings."""

    def __init__(self, max_size: int = DEFAULT_MAX_SIZE) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        self._closed = False
        #: Where the search for the end of the head resumes: the buffer before it
        #: (minus 2 octets, for an LF CRLF split across reads) holds none.
        self._scanned = 0
        #: Length of the message whose head is complete but whose body is not, or 0.
        self._awaiting = 0

    @property
    def closed(self) -> bool:
        """True after a fatal error: further input is ignored."""
        return self._closed

    @property
    def buffered(self) -> int:
        """Octets received but not yet part of a complete message."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[FramerEvent]:
        """Add received octets; return the events they complete, in order."""
        if self._closed:
            return []
        buf = self._buf
        buf += data
        if self._awaiting > len(buf):
            return []  # still inside a body: nothing to look at again
        events: list[FramerEvent] = []
        while buf:
            if buf[0] == 0x0A:  # a stray bare-LF line end between messages
                del buf[:1]
                self._scanned = 0
                continue
            if buf[0] == 0x0D:  # CR: a keep-alive, or a stray CRLF between messages
                if buf.startswith(PING):
                    del buf[:4]
                    self._scanned = 0
                    events.append(KeepAlivePing())
                    continue
                if len(buf) < 4 and PING.startswith(bytes(buf)):
                    break  # maybe the start of a ping: wait for more
                if buf.startswith(b"\r\n"):
                    del buf[:2]
                    self._scanned = 0
                    continue
            # The head ends at the first LF followed by LF or CRLF (CRLFCRLF, or the bare-LF
            # forms parse_message reads), wherever the reads happened to cut the stream.
            lf = buf.find(b"\n\r\n", self._scanned)
            bare = buf.find(b"\n\n", self._scanned, lf + 2 if lf >= 0 else len(buf))
            if bare >= 0:
                lf, body_at = bare, bare + 2
            elif lf >= 0:
                body_at = lf + 3
            else:
                if len(buf) > self.max_size:
                    events.append(self._fatal(SipParseError(513, "Message Too Large")))
                else:
                    self._scanned = max(len(buf) - 2, 0)
                break
            head_end = lf - 1 if lf and buf[lf - 1] == 0x0D else lf
            head = bytes(buf[:head_end])
            lengths = _CONTENT_LENGTH_RE.findall(head)
            is_response = head[:4].upper() == b"SIP/"
            if len(lengths) > 1:
                events.append(self._fatal(_error("multiple Content-Length values", is_response)))
                break
            length_text = lengths[0].strip() if lengths else b"0"
            if not length_text.isdigit() or len(length_text) > 10:
                events.append(self._fatal(_error("invalid Content-Length", is_response)))
                break
            total = body_at + int(length_text)
            if total > self.max_size:
                err = SipParseError(513, "Message Too Large", is_response=is_response)
                events.append(self._fatal(err))
                break
            if len(buf) < total:
                self._scanned = head_end  # the head is complete: found again at once
                self._awaiting = total
                break
            frame = bytes(buf[:total])
            del buf[:total]
            self._scanned = 0
            self._awaiting = 0
            try:
                events.append(parse_message(frame, datagram=False, max_size=self.max_size))
            except SipParseError as exc:
                events.append(FramingError(exc, fatal=False))
        return events

    def _fatal(self, error: SipParseError) -> FramingError:
        self._closed = True
        self._buf.clear()
        return FramingError(error, fatal=True)


def _error(what: str, is_response: bool) -> SipParseError:
    prefix = "Bad Response" if is_response else "Bad Request"
    return SipParseError(400, f"{prefix} - {what}", is_response=is_response)
