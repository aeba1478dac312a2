"""SIP, SIPS and tel URIs (RFC 3261 §19.1, RFC 3966) and opaque URIs of other schemes.

A URI keeps the text it was parsed from: ``to_string()`` returns it unchanged while the
parsed fields are untouched, so parameters such as ``pn-prid`` (whose values hold ``:`` and
``&``) survive a round trip byte for byte. Unknown schemes are kept as :class:`AbsoluteUri`
so that a server can still answer 416.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = [
    "AbsoluteUri",
    "SipUri",
    "TelUri",
    "Uri",
    "UriError",
    "is_request_uri",
    "parse_params",
    "parse_uri",
    "unescape",
]


class UriError(ValueError):
    """A URI that does not follow its scheme's grammar."""


_SCHEME_RE = re.compile(r"[A-Za-z][A-Za-z0-9+\-.]*\Z")
# Characters that may appear unescaped in the user, password, host, params and headers.
_BAD_URI_CHARS = re.compile(r"[\x00-\x20\x7f<>\"]")


# --- character-class checks without a regex -------------------------------------------------
# A regex spends ~20 instructions per character on a class like [^\x00-\x20<>"]; a
# bytes.translate table spends ~4, which matters on Contact values with long pn-* tokens.


def char_table(allowed: str) -> bytes:
    """A ``bytes.translate`` table that keeps the octets of ``allowed`` and changes the rest."""
    keep = allowed.encode("ascii")
    return bytes(c if c in keep else (1 if c == 0 else 0) for c in range(256))


def only(text: str, table: bytes) -> bool:
    """True when every character of ``text`` (ASCII: check ``isascii()`` first) is in ``table``."""
    data = text.encode()
    return data.translate(table) == data


def made_of(text: str, table: bytes) -> bool:
    """True when ``text`` is non-empty and ASCII, and every character is in ``table``."""
    return bool(text) and text.isascii() and only(text, table)


ALNUM = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
#: What may appear unescaped in a URI after its scheme: not _BAD_URI_CHARS (ASCII only).
_URI_TEXT = char_table("".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '<>"'))
HOST_TABLE = char_table(ALNUM + "-_.")
#: A SIP URI in <> or a Request-URI without ?headers (those go to the regex).
SIP_URI_TABLE = char_table("".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '<>"?'))
#: A SIP URI outside <> (an addr-spec ends at ';', ',' or '?').
SIP_BARE_URI_TABLE = char_table(
    "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '<>"?;,')
)
# Parameters whose presence in only one of two URIs makes them differ (§19.1.4).
_STRICT_PARAMS = ("user", "ttl", "method", "maddr", "transport")


def unescape(text: str) -> str:
    """Decode ``%HH`` escapes (a ``%`` not followed by two hex digits stays as it is)."""
    if "%" not in text:
        return text
    return unquote(text, errors="surrogateescape")


def parse_params(text: str) -> dict[str, str | None]:
    """Split ``;a=b;c`` into an ordered dict with lower-cased names and raw values."""
    params: dict[str, str | None] = {}
    if not text:
        return params
    for item in text.split(";"):
        if not item:
            raise UriError("empty URI parameter")
        name, eq, value = item.partition("=")
        if not name:
            raise UriError("URI parameter without a name")
        params[name.lower()] = value if eq else None
    return params


class SipUri:
    """A ``sip:`` or ``sips:`` URI; compare with ``==`` (RFC 3261 §19.1.4)."""

    __slots__ = (
        "_raw",
        "headers",
        "host_raw",
        "params",
        "password",
        "port",
        "scheme",
        "user_raw",
    )

    def __init__(
        self,
        host: str,
        *,
        scheme: str = "sip",
        user: str | None = None,
        password: str | None = None,
        port: int | None = None,
        params: dict[str, str | None] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.scheme = scheme.lower()
        self.user_raw = user
        self.password = password
        self.host_raw = host
        self.port = port
        self.params: dict[str, str | None] = dict(params) if params else {}
        self.headers: dict[str, str] = dict(headers) if headers else {}
        self._raw: str | None = None

    @classmethod
    def parse(cls, text: str) -> SipUri:
        """Parse a SIP or SIPS URI; raise :class:`UriError` when it is malformed."""
        scheme, colon, rest = text.partition(":")
        low = scheme.lower()
        if not colon or low not in ("sip", "sips"):
            raise UriError(f"not a SIP URI: {text!r}")
        if not (only(rest, _URI_TEXT) if rest.isascii() else _BAD_URI_CHARS.search(rest) is None):
            raise UriError("URI contains spaces or forbidden characters")
        # '@' may appear unescaped only in the userinfo, which itself may hold '?' and ';'.
        userinfo, at, after = rest.rpartition("@")
        hostpart, qmark, hdrs = after.partition("?")
        user: str | None = None
        password: str | None = None
        if at:
            if not userinfo:
                raise UriError("empty user part in URI")
            u, c, p = userinfo.partition(":")
            user = u
            password = p if c else None
        hostport, semi, ptext = hostpart.partition(";")
        if hostport.startswith("["):
            end = hostport.find("]")
            if end < 0:
                raise UriError("unterminated IPv6 reference")
            host = hostport[: end + 1]
            tail = hostport[end + 1 :]
            if tail and not tail.startswith(":"):
                raise UriError("garbage after IPv6 reference")
            port_text = tail[1:] if tail else None
        else:
            host, c, port_text_s = hostport.partition(":")
            port_text = port_text_s if c else None
            if not made_of(host, HOST_TABLE):
                raise UriError(f"invalid host in URI: {host!r}")
        port: int | None = None
        if port_text is not None:
            if (
                not 0 < len(port_text) <= 5
                or not port_text.isascii()
                or not port_text.isdigit()
                or int(port_text) > 65535
            ):
                raise UriError(f"invalid port in URI: {port_text!r}")
            port = int(port_text)
        if not host:
            raise UriError("URI without a host")
        headers: dict[str, str] = {}
        if qmark:
            for item in hdrs.split("&"):
                hname, eq, hvalue = item.partition("=")
                if not hname or not eq:
                    raise UriError("malformed URI header")
                headers[hname] = hvalue
        params = parse_params(ptext) if semi else {}
        if semi and not params:
            raise UriError("empty URI parameter")
        uri = cls(host, scheme=low, user=user, password=password, port=port)
        uri.params, uri.headers = params, headers  # fresh: no defensive copies
        uri._raw = text
        return uri

    def _state(self) -> tuple[object, ...]:
        return (
            self.scheme,
            self.user_raw,
            self.password,
            self.host_raw,
            self.port,
            tuple(self.params.items()),
            tuple(self.headers.items()),
        )

    @property
    def user(self) -> str | None:
        """The user part with ``%`` escapes decoded."""
        return None if self.user_raw is None else unescape(self.user_raw)

    @property
    def host(self) -> str:
        """The host, lower-cased (IPv6 references keep their brackets)."""
        return self.host_raw.lower()

    @property
    def transport(self) -> str | None:
        """The ``transport`` parameter, lower-cased."""
        value = self.params.get("transport")
        return value.lower() if value else None

    @property
    def secure(self) -> bool:
        return self.scheme == "sips"

    def to_string(self) -> str:
        """The URI as text: the original bytes when nothing was changed."""
        if self._raw is not None and SipUri.parse(self._raw)._state() == self._state():
            return self._raw  # unchanged since parsed: the bytes as received
        parts = [self.scheme, ":"]
        if self.user_raw is not None:
            parts.append(self.user_raw)
            if self.password is not None:
                parts += [":", self.password]
            parts.append("@")
        parts.append(self.host_raw)
        if self.port is not None:
            parts += [":", str(self.port)]
        for name, value in self.params.items():
            parts += [";", name] if value is None else [";", name, "=", value]
        if self.headers:
            parts += ["?", "&".join(f"{k}={v}" for k, v in self.headers.items())]
        return "".join(parts)

    def __str__(self) -> str:
        return self.to_string()

    def __repr__(self) -> str:
        return f"SipUri({self.to_string()!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SipUri):
            return NotImplemented
        if (
            self.scheme != other.scheme
            or self.user != other.user
            or _unesc(self.password) != _unesc(other.password)
            or self.host != other.host
            or self.port != other.port
        ):
            return False
        mine_params, their_params = _norm_params(self.params), _norm_params(other.params)
        for name in mine_params.keys() | their_params.keys():
            mine, theirs = mine_params.get(name, _MISSING), their_params.get(name, _MISSING)
            if mine is _MISSING or theirs is _MISSING:
                if name in _STRICT_PARAMS:
                    return False
                continue
            if _unesc_lower(mine) != _unesc_lower(theirs):
                return False
        return _norm_headers(self.headers) == _norm_headers(other.headers)

    def __hash__(self) -> int:
        return hash((self.scheme, self.host, self.port, self.user))


_MISSING = object()


def _unesc(value: str | None) -> str | None:
    return None if value is None else unescape(value)


def _unesc_lower(value: object) -> object:
    return unescape(value).lower() if isinstance(value, str) else value


def _norm_params(params: dict[str, str | None]) -> dict[str, str | None]:
    if not any("%" in k for k in params):
        return params
    return {unescape(k).lower(): v for k, v in params.items()}


def _norm_headers(headers: dict[str, str]) -> dict[str, str]:
    return {unescape(k).lower(): unescape(v) for k, v in headers.items()}


_TEL_VISUAL = str.maketrans("", "", "-.()")


class TelUri:
    """A ``tel:`` URI (RFC 3966): the number and its parameters."""

    __slots__ = ("_raw", "number", "params")

    def __init__(self, number: str, params: dict[str, str | None] | None = None) -> None:
        self.number = number
        self.params: dict[str, str | None] = dict(params) if params else {}
        self._raw: str | None = None

    @property
    def scheme(self) -> str:
        return "tel"

    @classmethod
    def parse(cls, text: str) -> TelUri:
        scheme, colon, rest = text.partition(":")
        if not colon or scheme.lower() != "tel":
            raise UriError(f"not a tel URI: {text!r}")
        number, semi, ptext = rest.partition(";")
        if not number or _BAD_URI_CHARS.search(rest):
            raise UriError("invalid tel URI")
        uri = cls(number, parse_params(ptext) if semi else None)
        uri._raw = text
        return uri

    @property
    def is_global(self) -> bool:
        return self.number.startswith("+")

    def to_string(self) -> str:
        if self._raw is not None:
            again = TelUri.parse(self._raw)
            if (again.number, again.params) == (self.number, self.params):
                return self._raw  # unchanged since parsed: the bytes as received
        tail = "".join(f";{k}" if v is None else f";{k}={v}" for k, v in self.params.items())
        return f"tel:{self.number}{tail}"

    def __str__(self) -> str:
        return self.to_string()

    def __repr__(self) -> str:
        return f"TelUri({self.to_string()!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TelUri):
            return NotImplemented
        return self.number.translate(_TEL_VISUAL).lower() == other.number.translate(
            _TEL_VISUAL
        ).lower() and {k: (v or "").lower() for k, v in self.params.items()} == {
            k: (v or "").lower() for k, v in other.params.items()
        }

    def __hash__(self) -> int:
        return hash(self.number.translate(_TEL_VISUAL).lower())


class AbsoluteUri:
    """A URI of a scheme sipwake does not interpret (answer 416 when it must route it)."""

    __slots__ = ("raw", "scheme")

    def __init__(self, raw: str) -> None:
        scheme, _, _ = raw.partition(":")
        self.scheme = scheme.lower()
        self.raw = raw

    def to_string(self) -> str:
        return self.raw

    def __str__(self) -> str:
        return self.to_string()

    def __repr__(self) -> str:
        return f"AbsoluteUri({self.raw!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, AbsoluteUri):
            return NotImplemented
        return self.raw == other.raw

    def __hash__(self) -> int:
        return hash(self.raw)


Uri = SipUri | TelUri | AbsoluteUri


# Whole-URI syntax, checked in one regex call when a message is parsed (objects are built
# only when read). Each pattern is at least as strict as the matching ``parse`` method, so
# a value that passes here never fails when it is read later.
_C = r"\x00-\x20\x7f<>\""
_PORT = r"(?:6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})"
_HOSTPORT = rf"(?:\[[0-9A-Fa-f:.]++\]|[A-Za-z0-9\-_.]++)(?::{_PORT})?"
SIP_ADDR_SYNTAX = rf"[Ss][Ii][Pp][Ss]?:(?:[^{_C}@:]++(?::[^{_C}@]*+)?@)?{_HOSTPORT}"
# In an addr-spec outside <>, ';' starts header parameters and ',' the next list value.
SIP_BARE_ADDR_SYNTAX = rf"[Ss][Ii][Pp][Ss]?:(?:[^{_C}@:;,?]++(?::[^{_C}@;,?]*+)?@)?{_HOSTPORT}"
SIP_PARAMS_SYNTAX = rf"(?:;[^{_C};?=@]++(?:=[^{_C};?@]++)?)*"
SIP_HEADERS_SYNTAX = rf"(?:\?[^{_C}?&=@]++=[^{_C}&@]*+(?:&[^{_C}?&=@]++=[^{_C}&@]*+)*)?"
_NOT_SIP_OR_TEL = r"(?![Ss][Ii][Pp][Ss]?:|[Tt][Ee][Ll]:)"
TEL_SYNTAX = rf"[Tt][Ee][Ll]:[^{_C};?@]++(?:;[^{_C};?=@]++(?:=[^{_C};?@]++)?)*"
TEL_BARE_SYNTAX = rf"[Tt][Ee][Ll]:[^{_C};?@,]++"
OTHER_URI_SYNTAX = rf"{_NOT_SIP_OR_TEL}[A-Za-z][A-Za-z0-9+\-.]*+:[^{_C}]++"
OTHER_ANGLE_SYNTAX = rf"{_NOT_SIP_OR_TEL}[A-Za-z][A-Za-z0-9+\-.]*+:[^{_C}>]++"
OTHER_BARE_SYNTAX = rf"{_NOT_SIP_OR_TEL}[A-Za-z][A-Za-z0-9+\-.]*+:[^{_C};,?]++"
# A Request-URI: no header components in a SIP URI (RFC 3261 §19.1.5, RFC 4475 §3.1.2.11).
_REQUEST_URI_RE = re.compile(
    rf"(?:{SIP_ADDR_SYNTAX}{SIP_PARAMS_SYNTAX}|{TEL_SYNTAX}|{OTHER_URI_SYNTAX})\Z"
)


def is_request_uri(text: str) -> bool:
    """True when ``text`` is a well-formed Request-URI (a SIP one without ``?headers``)."""
    if text.isascii() and sip_uri_fast(text, SIP_URI_TABLE):
        return True
    return _REQUEST_URI_RE.match(text) is not None


def port_fast(text: str) -> bool:
    """True when ASCII ``text`` is a port the syntax regexes accept (0-65535, as _PORT)."""
    n = len(text)
    return text.isdigit() and (n <= 4 or (n == 5 and text[0] != "0" and int(text) <= 65535))


def host_port_fast(text: str, pos: int) -> int:
    """Where the ``;`` parameters after a plain ``host[:port]`` at ``pos`` start
    (``len(text)`` when there are none), or -1 when the host or port is not the plain
    form the shortcuts decide (the caller then leaves the value to the regex)."""
    semi = text.find(";", pos)
    host_end = len(text) if semi < 0 else semi
    colon = text.find(":", pos, host_end)
    if colon >= 0:
        if not port_fast(text[colon + 1 : host_end]):
            return -1
        host_end = colon
    if host_end == pos or not only(text[pos:host_end], HOST_TABLE):
        return -1
    return len(text) if semi < 0 else semi


def sip_uri_fast(text: str, table: bytes) -> bool:
    """True when ASCII ``text`` is ``sip[s]:[user[:password]@]host[:port][;p[=v]]...``.

    A shortcut for SIP_ADDR_SYNTAX + SIP_PARAMS_SYNTAX (``table`` SIP_URI_TABLE) or
    SIP_BARE_ADDR_SYNTAX (SIP_BARE_URI_TABLE): True only when the regex matches too, by
    the same reading. False means "not decided here": upper-case schemes, IPv6, ``?``, a
    second ``@``, odd characters... go to the regex, so nothing is accepted that it refuses.
    Positions and str.find, no splitting: each new string costs as much as a character check.
    """
    if text.startswith("sip:"):
        pos = 4
    elif text.startswith("sips:"):
        pos = 5
    else:
        return False
    if not only(text, table):
        return False
    at = text.find("@", pos)
    if at >= 0:
        # userinfo: a non-empty user without ':' or '@', then maybe ':' and a password.
        if at == pos or text[pos] == ":" or text.find("@", at + 1) >= 0:
            return False
        pos = at + 1
    semi = host_port_fast(text, pos)
    if semi < 0:
        return False
    # ;name[=value]...: no empty item, name or value ("a=;" is left to the regex too).
    return semi == len(text) or not (
        text.endswith(";")
        or text.endswith("=")
        or text.find(";;", semi) >= 0
        or text.find(";=", semi) >= 0
        or text.find("=;", semi) >= 0
    )


def parse_uri(text: str) -> Uri:
    """Parse any URI: SIP/SIPS and tel are interpreted, other schemes kept opaque."""
    scheme, colon, rest = text.partition(":")
    if not colon or not _SCHEME_RE.match(scheme) or not rest:
        raise UriError(f"not a URI: {text!r}")
    low = scheme.lower()
    if low in ("sip", "sips"):
        return SipUri.parse(text)
    if low == "tel":
        return TelUri.parse(text)
    if _BAD_URI_CHARS.search(rest):
        raise UriError("URI contains spaces or forbidden characters")
    return AbsoluteUri(text)
