"""SIP header fields: the ordered multi-valued container and parsed views of common values.

:class:`Headers` keeps every field as it arrived (name spelling, compact form, folding) and
writes untouched fields back byte for byte. Values are plain strings until someone asks for
a parsed view (:class:`Via`, :class:`NameAddr`, :class:`CSeq`), so a proxy pays only for
the fields it reads.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from sipwake.sip.uri import (
    ALNUM,
    OTHER_ANGLE_SYNTAX,
    OTHER_BARE_SYNTAX,
    SIP_ADDR_SYNTAX,
    SIP_BARE_ADDR_SYNTAX,
    SIP_BARE_URI_TABLE,
    SIP_HEADERS_SYNTAX,
    SIP_PARAMS_SYNTAX,
    SIP_URI_TABLE,
    TEL_BARE_SYNTAX,
    TEL_SYNTAX,
    AbsoluteUri,
    SipUri,
    Uri,
    UriError,
    char_table,
    host_port_fast,
    only,
    parse_uri,
    sip_uri_fast,
    unescape,
)

__all__ = [
    "COMPACT_FORMS",
    "NAME_ADDR_LENIENT_SYNTAX",
    "NAME_ADDR_SYNTAX",
    "VIA_SYNTAX",
    "CSeq",
    "HeaderError",
    "Headers",
    "NameAddr",
    "Via",
    "canonical_key",
    "name_addr_fast",
    "parse_header_params",
    "parse_uint",
    "split_list",
    "via_fast",
]


class HeaderError(ValueError):
    """A header field value that does not follow its grammar."""


def parse_uint(value: str, max_digits: int = 10) -> int | None:
    """An unsigned decimal of ASCII digits (no sign, no space), or None."""
    if not value or len(value) > max_digits or not value.isascii() or not value.isdigit():
        return None
    return int(value)


COMPACT_FORMS: dict[str, str] = {
    "v": "via",
    "f": "from",
    "t": "to",
    "i": "call-id",
    "m": "contact",
    "l": "content-length",
    "c": "content-type",
    "k": "supported",
    "e": "content-encoding",
    "s": "subject",
    "o": "event",
    "r": "refer-to",
    "b": "referred-by",
    "u": "allow-events",
    "x": "session-expires",
    "a": "accept-contact",
    "j": "reject-contact",
    "d": "request-disposition",
    "y": "identity",
    "n": "identity-info",
}

# Fields whose grammar is a comma-separated list (RFC 3261 §7.3.1 and extensions).
LIST_HEADERS = frozenset(
    {
        "via",
        "contact",
        "route",
        "record-route",
        "path",
        "service-route",
        "allow",
        "supported",
        "require",
        "proxy-require",
        "unsupported",
        "accept",
        "accept-encoding",
        "accept-language",
        "allow-events",
        "content-encoding",
        "content-language",
        "in-reply-to",
        "alert-info",
        "call-info",
        "error-info",
        "warning",
        "reason",
        "p-associated-uri",
        "accept-contact",
        "reject-contact",
        "request-disposition",
        "security-client",
        "security-server",
        "security-verify",
        "feature-caps",
    }
)

_CANON: dict[str, str] = {}


def canonical_key(name: str) -> str:
    """The lookup key of a header name: lower-case, compact forms expanded."""
    key = _CANON.get(name)
    if key is None:
        low = name.strip().lower()
        key = COMPACT_FORMS.get(low, low)
        if len(_CANON) < 4096:
            _CANON[name] = key
    return key


_LIST_TOKEN_RE = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+(")?|<[^>]*+|,', re.DOTALL)


def split_list(value: str) -> list[str]:
    """Split a comma-separated field value, ignoring commas inside quotes and ``<>``."""
    if "," not in value:
        return [value.strip()]
    if '"' not in value and "<" not in value:
        return [part.strip() for part in value.split(",")]
    parts: list[str] = []
    start = 0
    for m in _LIST_TOKEN_RE.finditer(value):
        piece = m.group()
        if piece == ",":
            parts.append(value[start : m.start()].strip())
            start = m.end()
        elif piece[0] == '"' and m.group(1) is None:
            raise HeaderError("unterminated quoted string")
    parts.append(value[start:].strip())
    return parts


def field_entries(items: Iterable[tuple[str, str]]) -> list[tuple[str, str, str, str | None]]:
    """``(name, value)`` pairs as :class:`Headers` entries with their wire lines written.

    A response that adds the same fields every time (the keep-alive OPTIONS answer) builds
    them once; ``make_response`` appends them without a lookup or a format per message.
    """
    return [(canonical_key(n), n, v, f"{n}: {v}") for n, v in items]


class Headers:
    """Ordered, multi-valued, case-insensitive header fields that remember their wire form."""

    __slots__ = ("_cache", "_entries", "_modified")

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        # Each entry: (key, name as written, value, original line or None when changed).
        self._entries: list[tuple[str, str, str, str | None]] = (
            [(canonical_key(n), n, v, None) for n, v in items] if items else []
        )
        self._cache: dict[str, object] = {}
        self._modified = True  # built by hand: no wire form to reuse

    @classmethod
    def _from_entries(cls, entries: list[tuple[str, str, str, str | None]]) -> Headers:
        h = cls()
        h._entries = entries
        h._modified = False
        return h

    def get(self, name: str) -> str | None:
        """The first value of ``name`` (unfolded), or None."""
        key = canonical_key(name)
        for entry in self._entries:
            if entry[0] == key:
                return entry[2]
        return None

    def get_values(self, name: str) -> list[str]:
        """Every field line of ``name``, without splitting on commas."""
        key = canonical_key(name)
        return [e[2] for e in self._entries if e[0] == key]

    def get_all(self, name: str) -> list[str]:
        """All values of ``name``; list-valued fields are split on their commas."""
        key = canonical_key(name)
        values = [e[2] for e in self._entries if e[0] == key]
        if key not in LIST_HEADERS:
            return values
        out: list[str] = []
        for v in values:
            out.extend(split_list(v))
        return out

    def count(self, name: str) -> int:
        key = canonical_key(name)
        return sum(1 for e in self._entries if e[0] == key)

    def add(self, name: str, value: str) -> None:
        """Append a field after the existing ones."""
        key = canonical_key(name)
        self._entries.append((key, name, value, None))
        self._changed(key)

    def insert(self, index: int, name: str, value: str) -> None:
        """Insert a field at ``index`` (a proxy puts its Via first)."""
        key = canonical_key(name)
        self._entries.insert(index, (key, name, value, None))
        self._changed(key)

    def set(self, name: str, value: str) -> None:
        """Replace every field of ``name`` by one, at the position of the first."""
        key = canonical_key(name)
        for i, e in enumerate(self._entries):
            if e[0] == key:
                if e[2] != value or e[3] is None:  # an unchanged line keeps its bytes
                    self._entries[i] = (key, name, value, None)
                self._entries[i + 1 :] = [x for x in self._entries[i + 1 :] if x[0] != key]
                self._changed(key)
                return
        self.add(name, value)

    def remove(self, name: str) -> None:
        """Remove every field of ``name``."""
        key = canonical_key(name)
        self._entries = [e for e in self._entries if e[0] != key]
        self._changed(key)

    def remove_first(self, name: str) -> None:
        """Remove the first value of ``name`` (the top Via), splitting a list line if needed."""
        key = canonical_key(name)
        for i, e in enumerate(self._entries):
            if e[0] == key:
                rest = split_list(e[2])[1:] if key in LIST_HEADERS else []
                if rest:
                    self._entries[i] = (key, e[1], ", ".join(rest), None)
                else:
                    del self._entries[i]
                self._changed(key)
                return

    def replace_first(self, name: str, value: str) -> None:
        """Put ``value`` in place of the first value of ``name`` (the top Via).

        The same as :meth:`remove_first` then :meth:`insert` at its index, in one pass;
        appended when ``name`` is absent.
        """
        key = canonical_key(name)
        entries = self._entries
        for i, e in enumerate(entries):
            if e[0] == key:
                new = (key, name, value, None)
                old = e[2]
                rest = split_list(old)[1:] if "," in old and key in LIST_HEADERS else []
                if rest:
                    entries[i : i + 1] = [new, (key, e[1], ", ".join(rest), None)]
                else:
                    entries[i] = new
                self._changed(key)
                return
        self.add(name, value)

    def _changed(self, key: str) -> None:
        """Forget the parsed views of field ``key`` and the wire form after a change.

        The views of other fields still hold: a proxy or transport that rewrites the top
        Via or adds a Record-Route must not make every later reader parse From, To,
        Contact and CSeq again.
        """
        cache = self._cache
        if cache:
            cache.pop(key, None)
            cache.pop(key + "*", None)
        self._modified = True

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        key = canonical_key(name)
        return any(e[0] == key for e in self._entries)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return ((e[1], e[2]) for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Headers({list(self)!r})"

    def lines(self) -> list[str]:
        """Each field as one wire line (without CRLF); untouched fields as received."""
        return [e[3] if e[3] is not None else f"{e[1]}: {e[2]}" for e in self._entries]


# --- parameters and quoted strings ---------------------------------------------------------

_TOKEN_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~]+\Z")
#: A word of an unquoted display name. RFC 3261 wants tokens; phones also send UTF-8
#: (``Jörg Müller``) and punctuation (``John (Office)``), which Kamailio reads: accepted
#: unless it could end or split the value (quote, backslash, comma, semicolon, <, >, @, :)
#: or is a control character. ``Bell, Alexander`` (RFC 4475 3.1.2.15) stays refused.
_DISPLAY_WORD = r'[^\x00-\x20\x7f-\x9f"\\,;<>@:\ud800-\udfff]++'
_DISPLAY_WORD_RE = re.compile(_DISPLAY_WORD + r"\Z")
_PARAM_VALUE_RE = re.compile(r"[A-Za-z0-9\-.!%*_+`'~:\[\]&/=@?$]+\Z")


def _unquote(value: str) -> str:
    """The content of a quoted-string with its backslash escapes resolved."""
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        inner = value[1:-1]
        return re.sub(r"\\(.)", r"\1", inner, flags=re.DOTALL) if "\\" in inner else inner
    return value


_QUOTED_RE = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+"', re.DOTALL)
_HPARAM_RE = re.compile(
    r"[ \t]*;[ \t]*([A-Za-z0-9\-.!%*_+`'~]+)[ \t]*"
    r'(?:=[ \t]*("[^"\\]*+(?:\\.[^"\\]*+)*+"|[A-Za-z0-9\-.!%*_+`\'~:\[\]&/=@?$]++))?[ \t]*',
    re.DOTALL,
)


def _end_of_quoted(text: str, start: int) -> int:
    """Index just after the quoted-string opening at ``start``."""
    m = _QUOTED_RE.match(text, start)
    if m is None:
        raise HeaderError("unterminated quoted string")
    return m.end()


def parse_header_params(text: str) -> dict[str, str | None]:
    """Parse ``;name[=value]...`` (values raw: quoted ones keep their quotes)."""
    if text.isascii() and text.startswith(";"):
        fast = _header_params_fast(text)
        if fast is not None:
            return fast
    params: dict[str, str | None] = {}
    pos, end = 0, len(text)
    match = _HPARAM_RE.match
    while pos < end:
        m = match(text, pos)
        if m is None:
            if text[pos:].strip():
                raise HeaderError(f"malformed parameters near {text[pos : pos + 20]!r}")
            break
        params[m.group(1).lower()] = m.group(2)
        pos = m.end()
    return params


def _header_params_fast(text: str) -> dict[str, str | None] | None:
    """What the _HPARAM_RE loop reads from ASCII ``;a=b;c;d="q"`` without spaces or
    escapes, at a fraction of its cost; None when it cannot tell (the loop decides)."""
    params: dict[str, str | None] = {}
    for item in text[1:].split(";"):
        name, eq, value = item.partition("=")
        if not name or not (name.isalnum() or only(name, _TOKEN_TABLE)):
            return None
        if not eq:
            params[name.lower()] = None
            continue
        if value[:1] == '"':
            inner = value[1:-1]
            if len(value) < 2 or value[-1] != '"' or '"' in inner or "\\" in inner:
                return None
        elif not value or not (value.isalnum() or only(value, _PVALUE_TABLE)):
            return None
        params[name.lower()] = value
    return params


def _params_text(params: dict[str, str | None]) -> str:
    return "".join(f";{k}" if v is None else f";{k}={v}" for k, v in params.items())


# --- Via -----------------------------------------------------------------------------------

_VIA_RE = re.compile(
    r"\s*([A-Za-z0-9\-.!%*_+`'~]+)\s*/\s*([A-Za-z0-9\-.!%*_+`'~]+)\s*/\s*"
    r"([A-Za-z0-9\-.!%*_+`'~]+)\s+(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-_.]+)"
    r"(?:\s*:\s*([0-9]{1,5}))?\s*(;.*)?\Z",
    re.DOTALL,
)


class Via:
    """One Via value: ``SIP/2.0/UDP host:port;branch=...``."""

    __slots__ = ("_raw", "host", "params", "port", "protocol", "transport")

    def __init__(
        self,
        transport: str,
        host: str,
        port: int | None = None,
        params: dict[str, str | None] | None = None,
        protocol: str = "SIP/2.0",
    ) -> None:
        self.protocol = protocol
        self.transport = transport.upper()
        self.host = host
        self.port = port
        self.params: dict[str, str | None] = dict(params) if params else {}
        self._raw: str | None = None

    @classmethod
    def parse(cls, value: str) -> Via:
        m = _VIA_RE.match(value)
        if m is None:
            raise HeaderError("malformed Via")
        name, version, transport, host, port_text, ptext = m.groups()
        port = int(port_text) if port_text else None
        if port is not None and port > 65535:
            raise HeaderError("Via port out of range")
        via = cls(
            transport,
            host,
            port,
            parse_header_params(ptext) if ptext else None,
            f"{name}/{version}",
        )
        via._raw = value.strip()
        return via

    def _state(self) -> tuple[object, ...]:
        return (self.protocol, self.transport, self.host, self.port, tuple(self.params.items()))

    @property
    def branch(self) -> str | None:
        return self.params.get("branch")

    @property
    def received(self) -> str | None:
        return self.params.get("received")

    @property
    def rport(self) -> str | None:
        """None when absent, "" when present without a value, else the value."""
        if "rport" not in self.params:
            return None
        return self.params["rport"] or ""

    @property
    def sent_by(self) -> tuple[str, int | None]:
        return self.host, self.port

    def to_string(self) -> str:
        if self._raw is not None and Via.parse(self._raw)._state() == self._state():
            return self._raw  # unchanged since parsed: the bytes as received
        port = f":{self.port}" if self.port is not None else ""
        return f"{self.protocol}/{self.transport} {self.host}{port}{_params_text(self.params)}"

    def __str__(self) -> str:
        return self.to_string()

    def __repr__(self) -> str:
        return f"Via({self.to_string()!r})"


# --- name-addr / addr-spec -----------------------------------------------------------------


class NameAddr:
    """From, To, Contact, Route and Record-Route values: display name, URI, parameters.

    ``params`` are the header parameters (tag, expires, q, +sip.instance, reg-id, and pn-*
    when a client puts them there); values are raw, so quoted ones keep their quotes (use
    :meth:`param` for the unquoted value). Parameters inside the URI are ``uri.params``.
    """

    __slots__ = ("_raw", "angle", "display_name", "params", "uri")

    def __init__(
        self,
        uri: Uri,
        display_name: str | None = None,
        params: dict[str, str | None] | None = None,
    ) -> None:
        self.uri = uri
        self.display_name = display_name
        self.params: dict[str, str | None] = dict(params) if params else {}
        self.angle = True
        self._raw: str | None = None

    @classmethod
    def parse(cls, value: str) -> NameAddr:
        """Parse one value; raise :class:`HeaderError` naming the problem."""
        text = value.strip()
        if text == "*":
            na = cls(AbsoluteUri("*"))
            na.angle = False
            na._raw = text
            return na
        display: str | None = None
        if text.startswith('"'):
            end = _end_of_quoted(text, 0)
            display = _unquote(text[:end])
            lt = end + len(text[end:]) - len(text[end:].lstrip())
            if lt >= len(text) or text[lt] != "<":
                raise HeaderError("quoted display name not followed by <URI>")
        else:
            lt = text.find("<")
            if lt >= 0:
                words = text[:lt].split()
                for w in words:
                    if not _TOKEN_RE.match(w) and not _DISPLAY_WORD_RE.match(w):
                        raise HeaderError("display name has characters that need quoting")
                display = " ".join(words) if words else None
        if lt >= 0:
            gt = text.find(">", lt)
            if gt < 0:
                raise HeaderError("unterminated <URI>")
            uri_text = text[lt + 1 : gt]
            rest = text[gt + 1 :]
            angle = True
        else:
            uri_text, semi, after = text.partition(";")
            uri_text = uri_text.rstrip(" \t")
            rest = semi + after
            angle = False
            if "?" in uri_text or "," in uri_text:
                raise HeaderError("URI with headers or commas must be enclosed in <>")
        if not uri_text or uri_text != uri_text.strip() or " " in uri_text or "\t" in uri_text:
            raise HeaderError("whitespace inside addr-spec")
        try:
            uri = parse_uri(uri_text)
        except UriError as exc:
            raise HeaderError(str(exc)) from None
        na = cls(uri, display)
        na.angle, na._raw = angle, text
        na.params = parse_header_params(rest) if rest else {}  # fresh: no defensive copy
        return na

    def _state(self) -> tuple[object, ...]:
        return (self.uri.to_string(), self.display_name, tuple(self.params.items()))

    @property
    def is_wildcard(self) -> bool:
        """True for ``Contact: *`` (remove all bindings)."""
        return isinstance(self.uri, AbsoluteUri) and self.uri.raw == "*"

    @property
    def tag(self) -> str | None:
        return self.params.get("tag")

    @tag.setter
    def tag(self, value: str | None) -> None:
        if value is None:
            self.params.pop("tag", None)
        else:
            self.params["tag"] = value

    def param(self, name: str) -> str | None:
        """A header parameter's value with quotes removed (None when absent or valueless)."""
        value = self.params.get(name.lower())
        return None if value is None else _unquote(value)

    @property
    def expires(self) -> int | None:
        value = self.params.get("expires")
        return None if value is None else parse_uint(value)

    def pn_params(self) -> dict[str, str]:
        """RFC 8599 ``pn-*`` parameters, from the URI and the header (header ones win)."""
        out: dict[str, str] = {}
        if isinstance(self.uri, SipUri):
            for k, v in self.uri.params.items():
                if k.startswith("pn-") and v is not None:
                    out[k] = unescape(v)
        for k, hv in self.params.items():
            if k.startswith("pn-") and hv is not None:
                out[k] = _unquote(hv)
        return out

    def to_string(self) -> str:
        if self._raw is not None and NameAddr.parse(self._raw)._state() == self._state():
            return self._raw  # unchanged since parsed: the bytes as received
        uri = self.uri.to_string()
        if self.display_name is not None:
            dn = self.display_name.replace("\\", "\\\\").replace('"', '\\"')
            head = f'"{dn}" <{uri}>'
        elif self.angle or (isinstance(self.uri, SipUri) and (self.uri.params or self.uri.headers)):
            head = f"<{uri}>"
        else:
            head = uri
        return head + _params_text(self.params)

    def __str__(self) -> str:
        return self.to_string()

    def __repr__(self) -> str:
        return f"NameAddr({self.to_string()!r})"


# --- CSeq ----------------------------------------------------------------------------------

_CSEQ_RE = re.compile(r"\s*([0-9]+)\s+([A-Za-z0-9\-.!%*_+`'~]+)\s*\Z")
MAX_CSEQ = 2**31 - 1


class CSeq:
    """The CSeq value: sequence number and method."""

    __slots__ = ("method", "number")

    def __init__(self, number: int, method: str) -> None:
        self.number = number
        self.method = method

    @classmethod
    def parse(cls, value: str) -> CSeq:
        # "21 REGISTER" without extra spaces: str methods read it as _CSEQ_RE would, for a
        # fraction of the regex's cost (a match and two group calls); anything else: regex.
        digits, space, method = value.partition(" ")
        if (
            space
            and 0 < len(digits) <= 10
            and digits.isascii()
            and digits.isdigit()
            and method.isascii()
            and method
            and (method.isalnum() or only(method, _TOKEN_TABLE))
        ):
            number = int(digits)
            if number > MAX_CSEQ:
                raise HeaderError("CSeq number too large")
            return cls(number, method)
        m = _CSEQ_RE.match(value)
        if m is None:
            raise HeaderError("malformed CSeq")
        digits = m.group(1)
        if len(digits) > 10 or int(digits) > MAX_CSEQ:
            raise HeaderError("CSeq number too large")
        return cls(int(digits), m.group(2))

    def to_string(self) -> str:
        return f"{self.number} {self.method}"

    def __str__(self) -> str:
        return self.to_string()

    def __repr__(self) -> str:
        return f"CSeq({self.number}, {self.method!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CSeq):
            return NotImplemented
        return (self.number, self.method) == (other.number, other.method)

    def __hash__(self) -> int:
        return hash((self.number, self.method))


# --- syntax checks run at parse time (objects are built when read) -------------------------
# NAME_ADDR_SYNTAX and VIA_SYNTAX match one value each. They are at least as strict as
# NameAddr.parse and Via.parse, so a message that passed them never fails when read.

_TOK = r"[A-Za-z0-9\-.!%*_+`'~]++"
_QUOTED = r'"[^"\\\r\n]*+(?:\\[^\r\n][^"\\\r\n]*+)*+"'
_HPARAMS = (
    rf"(?:[ \t]*+;[ \t]*+{_TOK}[ \t]*+"
    rf"(?:=[ \t]*+(?:{_QUOTED}|[A-Za-z0-9\-.!%*_+`'~:\[\]&/=@?$]++))?[ \t]*+)*"
)
NAME_ADDR_SYNTAX = re.compile(
    rf"(?:\*|(?:(?:{_QUOTED}|{_TOK}(?:[ \t]++{_TOK})*)?[ \t]*+"
    rf"<(?:{SIP_ADDR_SYNTAX}{SIP_PARAMS_SYNTAX}{SIP_HEADERS_SYNTAX}|{TEL_SYNTAX}"
    rf"|{OTHER_ANGLE_SYNTAX})>"
    rf"|(?:{SIP_BARE_ADDR_SYNTAX}|{TEL_BARE_SYNTAX}|{OTHER_BARE_SYNTAX})[ \t]*+)"
    rf"{_HPARAMS})\Z"
)
#: NAME_ADDR_SYNTAX with the unquoted display names phones send (see _DISPLAY_WORD); only
#: tried when the strict one fails, so RFC 3261 messages pay nothing for it.
NAME_ADDR_LENIENT_SYNTAX = re.compile(
    rf"(?:{_DISPLAY_WORD}(?:[ \t]++{_DISPLAY_WORD})*[ \t]*+"
    rf"<(?:{SIP_ADDR_SYNTAX}{SIP_PARAMS_SYNTAX}{SIP_HEADERS_SYNTAX}|{TEL_SYNTAX}"
    rf"|{OTHER_ANGLE_SYNTAX})>"
    rf"{_HPARAMS})\Z"
)
VIA_SYNTAX = re.compile(
    rf"{_TOK}[ \t]*+/[ \t]*+{_TOK}[ \t]*+/[ \t]*+{_TOK}[ \t]++"
    rf"(?:\[[0-9A-Fa-f:.]++\]|[A-Za-z0-9\-_.]++)"
    rf"(?:[ \t]*+:[ \t]*+(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{{2}}|6[0-4][0-9]{{3}}"
    rf"|[1-5][0-9]{{4}}|[0-9]{{1,4}}))?[ \t]*+{_HPARAMS}\Z"
)


# --- shortcuts for the syntax checks ------------------------------------------------------
# The usual values (``<sip:user@host:port;uri-params>;tag=x``, ``SIP/2.0/UDP host:port;
# branch=x``) are checked with str methods and bytes.translate tables at a fraction of the
# regex's cost on long pn-* values. They answer True only where the regex matches by the
# same reading; False means "not decided here" and the caller asks the regex, so what is
# accepted or refused does not change (tests/sip/test_syntax_shortcuts.py compares them).

_TOKEN_TABLE = char_table(ALNUM + "-.!%*_+`'~")
_VIA_PROTOCOL_TABLE = char_table(ALNUM + "-.!%*_+`'~/")
_PVALUE_TABLE = char_table(ALNUM + "-.!%*_+`'~:[]&/=@?$")


def _hparams_fast(text: str, pos: int) -> bool:
    """True when ASCII ``text[pos:]`` is ``;name[=value]...`` as _HPARAMS reads it (no
    spaces; a quoted value without ``;`` or escapes)."""
    end = len(text)
    while pos < end:
        if text[pos] != ";":
            return False
        nxt = text.find(";", pos + 1)
        if nxt < 0:
            nxt = end
        eq = text.find("=", pos + 1, nxt)
        name_end = nxt if eq < 0 else eq
        if name_end == pos + 1:
            return False
        name = text[pos + 1 : name_end]
        if not (name.isalnum() or only(name, _TOKEN_TABLE)):
            return False
        if eq >= 0:
            if eq + 1 < nxt and text[eq + 1] == '"':  # the closing quote ends the item
                if (
                    text.find('"', eq + 2, nxt) != nxt - 1
                    or text.find("\\", eq + 2, nxt) >= 0
                    or text.find("\r", eq + 2, nxt) >= 0
                    or text.find("\n", eq + 2, nxt) >= 0
                ):
                    return False
            elif nxt == eq + 1 or not only(text[eq + 1 : nxt], _PVALUE_TABLE):
                return False
        pos = nxt
    return True


def name_addr_fast(value: str) -> bool:
    """True when ``value`` is ``<sip:...>;params`` or ``sip:...;params`` that
    NAME_ADDR_SYNTAX matches; False: not decided here (display names, IPv6, tel...)."""
    if not value.isascii():
        return False
    if value.startswith("<"):
        gt = value.find(">")
        return gt > 0 and sip_uri_fast(value[1:gt], SIP_URI_TABLE) and _hparams_fast(value, gt + 1)
    semi = value.find(";")
    if semi < 0:
        return sip_uri_fast(value, SIP_BARE_URI_TABLE)
    return sip_uri_fast(value[:semi], SIP_BARE_URI_TABLE) and _hparams_fast(value, semi)


def via_fast(value: str) -> bool:
    """True when ``value`` is ``PROTO/VERSION/TRANSPORT host[:port][;params]`` (one space,
    a name host) that VIA_SYNTAX matches; False: not decided here."""
    if not value.isascii():
        return False
    sp = value.find(" ")
    if sp < 0 or value.find(" ", sp + 1) >= 0 or value.find("\t", sp + 1) >= 0:
        return False
    # Three non-empty tokens around two slashes.
    first = value.find("/", 0, sp)
    second = value.find("/", first + 1, sp)
    if (
        first <= 0
        or second <= first + 1
        or second >= sp - 1
        or value.find("/", second + 1, sp) >= 0
        or not only(value[:sp], _VIA_PROTOCOL_TABLE)
    ):
        return False
    semi = host_port_fast(value, sp + 1)
    if semi < 0:
        return False
    return semi == len(value) or _hparams_fast(value, semi)
