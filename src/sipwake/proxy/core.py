"""The proxy core: the server's transaction user (TU).

Every request passes the checks a proxy owes the network before anything else
(RFC 3261 §16.3: Max-Forwards, loops, Proxy-Require, the URI scheme) and sipwake's own
policy: it serves only its ``[sip] domains`` and is never an open relay. Then REGISTER
goes to the registrar, OPTIONS for the server itself is answered here, and everything
else goes to the router. Responses, CANCELs, timeouts and transport errors go to the
router, which owns every client transaction.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import zlib
from typing import Protocol

from sipwake.config import Config, advertised_address
from sipwake.proxy.auth import Authenticator
from sipwake.proxy.registrar import uri_address
from sipwake.sip.endpoint import Endpoint, TransactionUser
from sipwake.sip.headers import HeaderError, field_entries
from sipwake.sip.message import Request, Response, make_response
from sipwake.sip.transaction import (
    MAGIC_COOKIE,
    Address,
    ClientTransaction,
    ServerTransaction,
    Transaction,
)
from sipwake.sip.uri import SipUri, UriError

log = logging.getLogger("sipwake.proxy")

#: Methods answered by this server (Allow of OPTIONS and 405).
ALLOWED = "ACK, BYE, CANCEL, INFO, INVITE, MESSAGE, NOTIFY, OPTIONS, PRACK, REFER, REGISTER, " + (
    "SUBSCRIBE, UPDATE"
)
#: The fields of a 200 to OPTIONS after the ones copied from the request (RFC 3261 11.2).
OPTIONS_FIELDS = (("Allow", ALLOWED), ("Accept", "application/sdp"), ("Supported", "path"))
_OPTIONS_ENTRIES = tuple(field_entries(OPTIONS_FIELDS))
#: Option tags a request may require of this proxy (Proxy-Require).
PROXY_OPTIONS = frozenset({"path", "outbound"})
#: Methods for which a user of our domains must authenticate when [auth] is enabled.
AUTHENTICATED_METHODS = frozenset({"INVITE", "MESSAGE"})
#: Methods answered without a transaction when they can be (OPTIONS to the server).
STATELESS_METHODS = frozenset({"OPTIONS"})


class RouterLike(Protocol):
    """What the core needs of the router (``sipwake.proxy.router.Router``)."""

    def on_request(
        self, endpoint: Endpoint, txn: ServerTransaction | None, request: Request, source: Address
    ) -> None: ...

    def on_response(
        self,
        endpoint: Endpoint,
        txn: ClientTransaction | None,
        response: Response,
        source: Address,
    ) -> None: ...

    def on_cancel(self, endpoint: Endpoint, txn: ServerTransaction, cancel: Request) -> None: ...

    def on_timeout(self, endpoint: Endpoint, txn: Transaction) -> None: ...

    def on_transport_error(self, endpoint: Endpoint, txn: Transaction) -> None: ...


class RegistrarLike(Protocol):
    """What the core needs of the registrar (``sipwake.proxy.registrar.Registrar``)."""

    def on_register(
        self, endpoint: Endpoint, txn: ServerTransaction, request: Request, source: Address
    ) -> None: ...


def loop_hash(request: Request) -> str:
    """RFC 3261 §16.6 step 8: a hash of what makes a forwarded request this request.

    The router puts it in its branch (``z9hG4bK`` + :func:`loop_hash` + ``.`` + unique
    part); the core refuses with 482 a request carrying our Via with the same hash.
    """
    to = request.headers.get("to") or ""
    frm = request.headers.get("from") or ""
    cseq = request.cseq
    parts = [
        request.uri,
        frm,
        to,
        request.call_id or "",
        str(cseq.number) if cseq else "",
        *request.headers.get_all("proxy-require"),
        *request.headers.get_all("route"),
    ]
    return hashlib.blake2s("\n".join(parts).encode(), digest_size=6).hexdigest()


def loop_branch(request: Request, unique: str, key: bytes | None = None) -> str:
    """A Via branch for forwarding ``request`` that lets the core detect loops.

    With ``key``, the branch ends in a MAC over the loop hash and ``unique`` (see
    :func:`branch_is_ours`): only branches this process made pass that check.
    """
    stem = f"{MAGIC_COOKIE}lp{loop_hash(request)}.{unique}"
    if key is None:
        return stem
    return f"{stem}.{_branch_mac(key, stem)}"


def _branch_mac(key: bytes, stem: str) -> str:
    return hmac.new(key, stem.encode(), hashlib.sha256).hexdigest()[:20]


def branch_is_ours(branch: str | None, key: bytes) -> bool:
    """True when ``branch`` was made by :func:`loop_branch` with ``key``."""
    if not branch or not branch.startswith(MAGIC_COOKIE + "lp"):
        return False
    stem, _, mac = branch.rpartition(".")
    if not stem or stem.count(".") != 1:
        return False
    return hmac.compare_digest(mac, _branch_mac(key, stem))


def stateless_tag(prefix: str, request: Request) -> str:
    """A To tag that is the same for every copy of ``request`` (RFC 3261 8.2.7).

    ``prefix`` is random per process (19.3); the rest is a checksum of the fields that
    make the request this request (From, Call-ID, CSeq, top Via branch), so a
    retransmission answered again gets the same tag without any state kept.
    """
    parts = [e[2] for e in request.headers._entries if e[0] in _TAG_FIELDS]
    via = request.top_via
    parts.append((via.branch or "") if via is not None else "")
    return f"{prefix}{zlib.crc32(chr(10).join(parts).encode('utf-8', 'surrogateescape')):08x}"


_TAG_FIELDS = frozenset({"from", "call-id", "cseq"})


class ProxyCore(TransactionUser):
    """Sanity checks and policy, then dispatch to the registrar or the router.

    OPTIONS addressed to the server itself (the keep-alive ping of phones and peers) is
    answered statelessly (RFC 3261 8.2.7): the answer has no side effect and is the same
    for a retransmission, so no transaction is kept for it.
    """

    def __init__(
        self,
        config: Config,
        registrar: RegistrarLike,
        router: RouterLike,
        auth: Authenticator | None = None,
    ) -> None:
        self.config = config
        self.registrar = registrar
        self.router = router
        self.auth = auth
        self.stateless_methods = STATELESS_METHODS
        self.domains = frozenset(d.lower() for d in config.sip.domains)
        relay = config.router.relay_domains
        self.relay_any = "*" in relay
        self.relay_domains = frozenset(d.lower() for d in relay if d != "*")
        self._tag_prefix = "sw" + secrets.token_hex(4)

    def advertised_address(self, transport: str, host: str) -> tuple[str, int | None] | None:
        """``[sip] advertise`` for a listening point of ``transport``."""
        return advertised_address(self.config.sip, transport)

    # -- policy helpers
    def is_local(self, host: str) -> bool:
        return host.lower() in self.domains

    def is_us(self, endpoint: Endpoint, uri: SipUri) -> bool:
        """True when ``uri`` names this server: one of our domains or listening points."""
        if self.is_local(uri.host):
            return True
        host = uri.host.strip("[]")
        for transport in ("UDP", "TCP", "TLS", "WS", "WSS"):
            local = endpoint.transports.local_address(transport)
            if local is not None and local[0] == host and (uri.port in (None, local[1])):
                return True
        return False

    def may_relay(self, host: str) -> bool:
        return self.relay_any or host.lower() in self.relay_domains

    def _looped(self, endpoint: Endpoint, request: Request) -> bool:
        vias = request.via_list
        if len(vias) < 2:
            return False
        mine = None
        for via in vias[1:]:
            branch = via.branch or ""
            if not branch.startswith(MAGIC_COOKIE + "lp"):
                continue
            host, port = via.sent_by
            host = host.strip("[]")  # an IPv6 sent-by is bracketed, local_address is not
            local = endpoint.transports.local_address(via.transport.upper())
            if local is None or local[0] != host or (port or 5060) != local[1]:
                continue
            if mine is None:
                mine = loop_hash(request)
            if branch[len(MAGIC_COOKIE) + 2 :].split(".", 1)[0] == mine:
                return True
        return False

    def _options_for_us(self, endpoint: Endpoint, request: Request, uri: SipUri) -> bool:
        """OPTIONS to this server (no user part, one of our names, no Route): answered here."""
        return (
            request.method == "OPTIONS"
            and uri.user is None
            and self.is_us(endpoint, uri)
            and not request.routes
        )

    def options_response(self, request: Request) -> Response:
        """The 200 to an OPTIONS for this server: what it allows, accepts and supports."""
        tag = stateless_tag(self._tag_prefix, request)
        return make_response(request, 200, to_tag=tag, fields=_OPTIONS_ENTRIES)

    # -- TU hooks
    def answer_stateless(
        self, endpoint: Endpoint, request: Request, source: Address
    ) -> bytes | None:
        """The 200 to an OPTIONS for this server, sent without a transaction."""
        try:
            uri = request.parsed_uri
            if isinstance(uri, SipUri) and self._options_for_us(endpoint, request, uri):
                return self.options_response(request).to_bytes()
        except (HeaderError, UriError):
            pass  # the stateful path answers 400 with the reason
        return None

    def on_request(
        self, endpoint: Endpoint, txn: ServerTransaction | None, request: Request, source: Address
    ) -> None:
        try:
            self._dispatch(endpoint, txn, request, source)
        except (HeaderError, UriError) as exc:
            # A field the parser let through (it checks only what every request needs).
            last = None if txn is None else txn.last_response
            if txn is not None and (last is None or last.status < 200):
                endpoint.respond(txn, 400, f"Bad Request ({exc})")

    def _dispatch(
        self, endpoint: Endpoint, txn: ServerTransaction | None, request: Request, source: Address
    ) -> None:
        if txn is None:  # an ACK for a 2xx: the router forwards it along the dialog
            if self._allowed_in_dialog(endpoint, request):
                self.router.on_request(endpoint, None, request, source)
            return
        method = request.method
        if method == "CANCEL":
            self.router.on_cancel(endpoint, txn, request)
            return
        try:
            uri = request.parsed_uri
        except UriError:
            endpoint.respond(txn, 400, "Bad Request-URI")
            return
        if not isinstance(uri, SipUri):
            endpoint.respond(txn, 416, "Unsupported URI Scheme")
            return
        if method == "REGISTER":
            self._register(endpoint, txn, request, source, uri)
            return
        if method == "OPTIONS" and self._options_for_us(endpoint, request, uri):
            endpoint.send_response(txn, self.options_response(request))
            return
        mf = request.max_forwards
        if mf is not None and mf == 0:
            endpoint.respond(txn, 483, "Too Many Hops")
            return
        if self._looped(endpoint, request):
            endpoint.respond(txn, 482, "Loop Detected")
            return
        if self._unsupported(endpoint, txn, request):
            return
        if not self._allowed(endpoint, request, uri):
            endpoint.respond(txn, 403, f"Forbidden (domain {uri.host} is not served here)")
            return
        if self._needs_auth(request):
            assert self.auth is not None
            answer = self.auth.check(request, "proxy")
            if isinstance(answer, Response):
                endpoint.send_response(txn, answer)
                return
        self.router.on_request(endpoint, txn, request, source)

    def _register(
        self,
        endpoint: Endpoint,
        txn: ServerTransaction,
        request: Request,
        source: Address,
        uri: SipUri,
    ) -> None:
        if not self.is_us(endpoint, uri):
            endpoint.respond(txn, 403, f"Forbidden (domain {uri.host} is not served here)")
            return
        self.registrar.on_register(endpoint, txn, request, source)

    def _unsupported(self, endpoint: Endpoint, txn: ServerTransaction, request: Request) -> bool:
        tags = [
            tag
            for value in request.headers.get_all("proxy-require")
            for tag in (t.strip().lower() for t in value.split(","))
            if tag and tag not in PROXY_OPTIONS
        ]
        if tags:
            endpoint.respond(txn, 420, "Bad Extension", Unsupported=", ".join(tags))
            return True
        return False

    def _allowed(self, endpoint: Endpoint, request: Request, uri: SipUri) -> bool:
        """Never an open relay: our domains, our own dialogs, or configured relaying."""
        if self.is_us(endpoint, uri):
            return True
        if self._allowed_in_dialog(endpoint, request):
            return True
        return self.may_relay(uri.host)

    def _allowed_in_dialog(self, endpoint: Endpoint, request: Request) -> bool:
        """A request inside a dialog we record-routed: its top Route names us."""
        try:
            routes = request.routes
            to = request.to
        except HeaderError:
            return False
        if to is not None and to.tag is None:
            # Initial request with a pre-loaded Route to us: only for our domains.
            return False
        if routes:
            top = routes[0].uri
            return isinstance(top, SipUri) and self.is_us(endpoint, top)
        uri = request.parsed_uri
        return isinstance(uri, SipUri) and (self.is_us(endpoint, uri) or self.may_relay(uri.host))

    def _needs_auth(self, request: Request) -> bool:
        auth = self.auth
        if auth is None or not auth.enabled or request.method not in AUTHENTICATED_METHODS:
            return False
        to = request.to
        if to is not None and to.tag is not None:
            return False  # in-dialog: the dialog was authenticated when it was created
        frm = request.from_
        return frm is not None and isinstance(frm.uri, SipUri) and self.is_local(frm.uri.host)

    # -- everything else belongs to the router
    def on_response(
        self,
        endpoint: Endpoint,
        txn: ClientTransaction | None,
        response: Response,
        source: Address,
    ) -> None:
        self.router.on_response(endpoint, txn, response, source)

    def on_timeout(self, endpoint: Endpoint, txn: Transaction) -> None:
        self.router.on_timeout(endpoint, txn)

    def on_transport_error(self, endpoint: Endpoint, txn: Transaction) -> None:
        self.router.on_transport_error(endpoint, txn)


__all__ = [
    "ALLOWED",
    "ProxyCore",
    "RegistrarLike",
    "RouterLike",
    "branch_is_ours",
    "loop_branch",
    "loop_hash",
    "uri_address",
]
