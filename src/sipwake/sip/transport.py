"""SIP transports at the asyncio edge: UDP, TCP, TLS and WebSocket (ws, wss).

Every message that arrives is parsed here and handed on with the :class:`Address` it came
from; for connection-oriented transports that address is also the key of the connection
(the *flow*), so responses and later requests to the same address reuse it: that is how a
phone behind NAT is reached (RFC 5626's idea, without its registration machinery).

Requests get ``received``/``rport`` set on their top Via (RFC 3261 18.2.1, RFC 3581)
before anyone sees them. Unparseable requests are answered 400/505/513 here; unparseable
responses are dropped; nothing a peer sends stops a listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import ssl
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from sipwake.clock import Clock, SystemClock
from sipwake.sip import stun
from sipwake.sip.headers import Via
from sipwake.sip.message import (
    PONG,
    REQUIRED_HEADERS,
    FramingError,
    KeepAlivePing,
    Request,
    Response,
    SipParseError,
    StreamFramer,
    is_keepalive,
    make_response,
    parse_message,
)
from sipwake.sip.transaction import DEFAULT_PORTS, Address

if TYPE_CHECKING:
    from sipwake.sip.websocket import WebSocketListener

log = logging.getLogger("sipwake.sip.transport")

MessageHandler = Callable[[Request | Response, Address], bytes | None]

#: RFC 3261 18.1.1: a message larger than this needs a congestion-controlled transport
#: when the path MTU is unknown (see :meth:`TransportLayer.send_udp` for why we keep UDP).
UDP_MTU_SAFE = 1300

#: Bind addresses that stand for every interface (not an address to advertise).
WILDCARD_HOSTS = ("0.0.0.0", "::", "")  # noqa: S104 - compared with, never bound
ErrorCallback = Callable[[], None]


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """Limits of the transports; the defaults suit a small deployment."""

    max_message_size: int = 65535
    #: Seconds without traffic after which a connection is closed; 0 keeps them.
    idle_timeout: float = 600.0
    #: Connections (in and out) beyond which new incoming ones are refused.
    max_connections: int = 10000
    #: Incoming connections (TCP, TLS, WebSocket) one source IP address may hold.
    max_connections_per_ip: int = 32
    #: Slots of ``max_connections`` kept for outgoing connections (at most a tenth).
    outgoing_reserve: int = 100
    #: Octets waiting to be sent on a connection above which we stop reading from it
    #: (its peer does not read our answers: it gets no more until it does).
    write_buffer_high: int = 64 * 1024
    #: Octets waiting to be sent on a connection above which it is closed.
    max_write_buffer: int = 1024 * 1024
    #: Seconds to wait for an outgoing connection (and its TLS handshake).
    connect_timeout: float = 10.0


def error_response(exc: SipParseError, data: bytes | None = None) -> bytes | None:
    """The answer to a request that could not be parsed, when one can be built.

    Without the request's Via, Call-ID, CSeq, From and To there is nowhere to send an
    answer that the peer could match, so only ``exc.partial`` makes one possible.
    """
    if exc.is_response:
        return None
    if data is not None and data.lstrip(b"\r\n")[:4].upper() == b"ACK ":
        return None  # an ACK is never answered (RFC 3261 17.2.1, 17.2.3)
    partial = exc.partial
    if partial is None and exc.status == 513 and data is not None:
        # Too large for us, but its head may still be readable enough to answer.
        try:
            parsed = parse_message(data, datagram=True, max_size=len(data))
        except SipParseError:
            return None
        partial = parsed if isinstance(parsed, Request) else None
    if partial is None or partial.method == "ACK":
        return None
    return answer_bytes(partial, exc.status, exc.reason)


def answer_bytes(request: Request, status: int, reason: str) -> bytes | None:
    """A response to a request the transport refuses, if it has a Via to send it along.

    An ACK gets none: it is never answered (RFC 3261 17.2.1, 17.2.3).
    """
    if request.method == "ACK":
        return None
    try:
        if request.top_via is None:
            return None
        return make_response(request, status, reason).to_bytes()
    except ValueError:  # fields too broken to copy into an answer
        return None


#: The mandatory fields check_request insists on (Max-Forwards may be absent).
_NEEDED_HEADERS = frozenset(REQUIRED_HEADERS) - {"max-forwards"}


def check_request(request: Request) -> str | None:
    """Why a parsed request cannot go to the transaction layer (RFC 3261 8.1.1), or None."""
    keys = [e[0] for e in request.headers._entries]
    present = set(keys)
    if len(present) == len(keys) and present >= _NEEDED_HEADERS:
        return None  # the usual request: nothing missing, no field given twice
    # Max-Forwards may be absent: a proxy adds 70 when it forwards (RFC 3261 16.6 step 3).
    missing = [name for name in request.missing_headers() if name != "max-forwards"]
    if missing:
        return "Bad Request - missing " + ", ".join(missing)
    repeated = request.repeated_single_headers()
    if repeated:
        return "Bad Request - repeated " + ", ".join(repeated)
    return None


def fill_via(request: Request, host: str, port: int) -> None:
    """Set ``received`` and ``rport`` on the top Via (RFC 3261 18.2.1, RFC 3581 4).

    A ``received`` the client wrote itself is never kept: it is replaced by the real
    source address, or removed when the sent-by host already is that address.
    """
    vias = request.via_list
    if not vias:
        return
    via = vias[0]
    wants_rport = via.rport is not None
    params = via.params
    if not wants_rport and _same_host(via.host, host):
        if "received" not in params:
            return
        del params["received"]  # forged: the sent-by host is the source already
    else:
        params["received"] = host
        if wants_rport:
            params["rport"] = str(port)
    sent_by = via.host if via.port is None else f"{via.host}:{via.port}"
    text = "".join([f";{k}" if v is None else f";{k}={v}" for k, v in params.items()])
    replace_top_via(request, f"{via.protocol}/{via.transport} {sent_by}{text}")
    keep_parsed_vias(request, vias)


def _same_host(sent_by: str, host: str) -> bool:
    return sent_by == host or sent_by.strip("[]").lower() == host.lower()


def bracket(host: str) -> str:
    """``host`` as written in a header: an IPv6 address in brackets (RFC 3261 25.1)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def keep_parsed_vias(request: Request, vias: list[Via]) -> None:
    """Put the already parsed (and now updated) Via list back into the message's cache.

    Changing a header clears the message's parsed views; the Vias are still right, and
    parsing them again for every request costs more than the rest of the UDP path.
    """
    request.headers._cache["via"] = vias


def replace_top_via(request: Request, value: str) -> None:
    """Write a changed top Via back into the headers, keeping the others in order."""
    request.headers.replace_first("Via", value)


def reconnect_address(response: Request | Response, flow: Address) -> Address | None:
    """Where to open a new connection for a response whose flow has closed (18.2.2).

    ``response`` may also be the request it answers: the top Via is the same.

    The host is the flow's real peer (what ``received`` says when we set it), never a
    ``received`` taken from the message; the port is the Via's sent-by port.
    """
    via = response.top_via
    if via is None:
        return None
    return Address(flow.transport, flow.host, via.port or DEFAULT_PORTS.get(flow.transport, 5060))


def response_address(request: Request, source: Address) -> Address:
    """Where responses to ``request`` go (RFC 3261 18.2.2, RFC 3581 4).

    Over a connection: back over that connection (its flow is ``source``). Over UDP: to
    ``received`` (the source address) at ``rport`` when the client asked for it, else at
    the sent-by port.
    """
    if source.reliable:
        return source
    via = request.top_via
    if via is None:
        return source
    rport = via.rport
    port = int(rport) if rport else via.port or DEFAULT_PORTS["UDP"]
    return source if port == source.port else Address("UDP", source.host, port)


# --------------------------------------------------------------------------- UDP


#: Source addresses a UDP listener keeps as shared :class:`Address` objects.
MAX_CACHED_SOURCES = 16384

#: UDP peers whose listener is remembered when there are several (about 40 MB at most).
MAX_UDP_PEERS = 262144


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, layer: TransportLayer) -> None:
        self.layer = layer
        self.transport: asyncio.DatagramTransport | None = None
        #: One Address per source (phones send again and again from the same one): no new
        #: object per datagram, and the transactions of one source share it.
        self._sources: dict[tuple[object, ...], Address] = {}

    def _source(self, addr: tuple[object, ...]) -> Address:
        """The shared Address of a datagram's source (``addr`` as the loop gives it)."""
        sources = self._sources
        if len(sources) >= MAX_CACHED_SOURCES:
            sources.clear()
        source = sources[addr] = Address("UDP", cast(str, addr[0]), cast(int, addr[1]))
        return source

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's UDP transport does not subclass asyncio.DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        layer = self.layer
        host: str = addr[0]  # type: ignore[assignment]
        port: int = addr[1]  # type: ignore[assignment]
        if layer.several_udp and self.transport is not None:
            layer.heard_on(host, port, self.transport)  # also STUN keep-alives: the flow
        if data and data[0] < 0x40 and stun.is_stun(data):
            # STUN (RFC 5389 §6: first two bits 0, magic cookie): the keep-alives of RFC
            # 5626 §8, never SIP. A SIP start line begins with a letter (>= 0x41) but for
            # odd method tokens and a leading CRLF, which fail the cookie check.
            self._stun(data, host, port)
            return
        try:
            msg = parse_message(data, datagram=True, max_size=layer.config.max_message_size)
        except SipParseError as exc:
            if is_keepalive(data):
                return  # CRLF keep-alives over UDP (RFC 5626 4.4.1) need no answer
            answer = error_response(exc, data)
            if answer is not None and self.transport is not None:
                self.transport.sendto(answer, (host, port))
            log.debug("dropped a bad message from %s:%s: %s", host, port, exc.reason)
            return
        source = self._sources.get(addr)
        if source is None:
            source = self._source(addr)
        answer = layer.dispatch(msg, source)
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, (host, port))

    def _stun(self, data: bytes, host: str, port: int) -> None:
        answer = stun.answer(data, host, port)
        if answer is not None and self.transport is not None:
            self.transport.sendto(answer, (host, port))
            self.layer.stats["stun_answers"] += 1

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable) on a shared socket: nothing to tie them to.
        log.debug("UDP error: %s", exc)


# --------------------------------------------------------------------------- streams


class Flow(Protocol):
    """A connection the flow table holds: TCP, TLS or WebSocket."""

    address: Address | None
    last_activity: float
    closed: asyncio.Future[None]

    def is_open(self) -> bool: ...

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class StreamConnection(asyncio.Protocol):
    """One TCP or TLS connection, incoming or outgoing, framed with StreamFramer."""

    def __init__(self, layer: TransportLayer, transport_name: str, outgoing: bool = False) -> None:
        self.layer = layer
        self.name = transport_name
        #: True for a connection we opened (it may use the reserved slots).
        self.outgoing = outgoing
        self.transport: asyncio.Transport | None = None
        self.address: Address | None = None
        self.framer = StreamFramer(max_size=layer.config.max_message_size)
        self.last_activity = layer.clock.monotonic()
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.address = Address(self.name, str(peer[0]), int(peer[1]))
        with contextlib.suppress(AttributeError, NotImplementedError, ValueError):
            high = self.layer.config.write_buffer_high
            self.transport.set_write_buffer_limits(high=high, low=high // 4)
        self.layer._register(self)

    def pause_writing(self) -> None:
        """The peer does not read: stop reading its requests until it catches up."""
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.pause_reading()

    def resume_writing(self) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        layer = self.layer
        self.last_activity = layer.clock.monotonic()
        address = self.address
        assert address is not None
        for event in self.framer.feed(data):
            if isinstance(event, KeepAlivePing):
                self.write(PONG)
            elif isinstance(event, FramingError):
                answer = error_response(event.error)
                if answer is not None:
                    self.write(answer)
                if event.fatal:
                    log.debug("closing %s: %s", address, event.error.reason)
                    self.close()
                    return
            else:
                answer = layer.dispatch(event, address)
                if answer is not None:
                    self.write(answer)

    def is_open(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()

    def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self.last_activity = self.layer.clock.monotonic()
            transport.write(data)
            waiting = transport.get_write_buffer_size()
            if waiting > self.layer.config.max_write_buffer:
                log.warning("closing %s: %d octets wait, it does not read", self.address, waiting)
                transport.abort()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.layer._unregister(self)
        if not self.closed.done():
            self.closed.set_result(None)


# --------------------------------------------------------------------------- layer


class TransportLayer:
    """All listeners and connections of one SIP endpoint, and the flow table."""

    def __init__(
        self,
        on_message: MessageHandler,
        config: TransportConfig | None = None,
        clock: Clock | None = None,
        client_ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.on_message = on_message
        self.config = config or TransportConfig()
        self.clock: Clock = clock or SystemClock()
        self.client_ssl = client_ssl
        self.connections: dict[Address, Flow] = {}
        #: Bound listening points: (transport, host, port), with the real port.
        self.listening: list[tuple[str, str, int]] = []
        #: Addresses written into Via/Record-Route instead of the bind address, by
        #: transport (the first listening point of a transport that has one wins).
        self.advertised: dict[str, tuple[str, int]] = {}
        self._udp: list[tuple[asyncio.DatagramTransport, _UdpProtocol]] = []
        #: Whether each UDP listener is IPv6 (a socket sends only to its own family).
        self._udp_v6: list[bool] = []
        #: More than one UDP listener: each peer's datagrams then record the listener
        #: they came in on (:meth:`heard_on`), which is what we send to that peer from.
        self.several_udp = False
        self._udp_peers: dict[tuple[str, int], asyncio.DatagramTransport] = {}
        self._servers: list[asyncio.Server] = []
        self._ws: list[WebSocketListener] = []
        self._pending: dict[Address, asyncio.Task[Flow]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._ip_hosts: set[str] = set()
        #: Incoming connections by source IP address (max_connections_per_ip).
        self._per_ip: Counter[str] = Counter()
        #: Name-based addresses we connected to, and the IP-based flow key each became.
        self._names: dict[Address, Address] = {}
        self._tasks: set[asyncio.Task[object]] = set()
        #: Counters for /metrics: STUN keep-alives answered, datagrams over 1300 octets.
        self.stats: Counter[str] = Counter()

    # -- incoming
    def dispatch(self, msg: Request | Response, source: Address) -> bytes | None:
        """Check and hand on a parsed message; returns an answer the transport must send.

        The answer goes back through the socket or connection ``msg`` came in on: a 400
        for a request lacking mandatory fields, or the TU's stateless answer (a keep-alive
        OPTIONS to the server). Responses lacking them are dropped. A bug above the
        transport loses that message only, never the listener.
        """
        try:
            if isinstance(msg, Request):
                problem = check_request(msg)
                if problem is not None:
                    return answer_bytes(msg, 400, problem)
                fill_via(msg, source.host, source.port)
            else:
                via = msg.top_via
                if via is None or msg.cseq is None:
                    return None
                if not self.is_own_sent_by(via.transport, via.host, via.port):
                    # RFC 3261 18.1.2: a response whose top Via is not ours is discarded
                    # (forwarding it would let anyone reflect messages through us).
                    log.debug("dropped a response from %s: top Via is not ours", source)
                    return None
            return self.on_message(msg, source)
        except Exception:
            log.exception("error handling a message from %s", source)
        return None

    def _register(self, conn: Flow) -> None:
        address = conn.address
        assert address is not None
        config = self.config
        incoming = not getattr(conn, "outgoing", False)
        limit = config.max_connections
        if incoming:
            # Keep slots for the connections we must open (to reach registered phones).
            limit -= min(config.outgoing_reserve, config.max_connections // 10)
        if len(self.connections) >= limit:
            log.warning("refusing connection from %s: max-connections reached", address)
            conn.close()
            return
        old = self.connections.get(address)
        if incoming and old is None and self._per_ip[address.host] >= config.max_connections_per_ip:
            log.warning("refusing connection from %s: max-connections-per-ip reached", address)
            conn.close()
            return
        self.connections[address] = conn
        if old is not None and old is not conn:
            self._count(old, -1)
            old.close()
        if old is not conn:
            self._count(conn, 1)
        self._arm_sweeper()

    def _unregister(self, conn: Flow) -> None:
        if conn.address is not None and self.connections.get(conn.address) is conn:
            del self.connections[conn.address]
            self._count(conn, -1)

    def _count(self, conn: Flow, delta: int) -> None:
        """Keep the number of incoming connections per source IP address."""
        if getattr(conn, "outgoing", False) or conn.address is None:
            return
        host = conn.address.host
        count = self._per_ip[host] + delta
        if count > 0:
            self._per_ip[host] = count
        else:
            self._per_ip.pop(host, None)

    # -- listening
    async def listen(
        self,
        transport: str,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        advertise: tuple[str, int | None] | None = None,
    ) -> int:
        """Bind a listener (port 0 picks a free one); returns the bound port.

        ``advertise`` is the host (and port; None: the bound port) written into Via and
        Record-Route for this listening point, for a wildcard bind or behind NAT.
        """
        loop = asyncio.get_running_loop()
        name = transport.upper()
        if name == "UDP":
            udp, proto = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), local_addr=(host, port)
            )
            with contextlib.suppress(OSError, AttributeError):
                sock = udp.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            self._udp.append((udp, proto))
            self._udp_v6.append(udp.get_extra_info("socket").family == socket.AF_INET6)
            self.several_udp = len(self._udp) > 1
            bound = int(udp.get_extra_info("sockname")[1])
        elif name in ("TCP", "TLS"):
            if name == "TLS" and ssl_context is None:
                raise ValueError("a tls listener needs a certificate and key")
            server = await loop.create_server(
                lambda: StreamConnection(self, name),
                host,
                port,
                ssl=ssl_context if name == "TLS" else None,
                reuse_address=True,
            )
            self._servers.append(server)
            # uvloop's Server.sockets is a list, not the tuple typeshed declares: read it
            # untyped, compiled code checks declared types.
            bound = int(cast(Any, server).sockets[0].getsockname()[1])
        elif name in ("WS", "WSS"):
            from sipwake.sip.websocket import WebSocketListener

            if name == "WSS" and ssl_context is None:
                raise ValueError("a wss listener needs a certificate and key")
            listener = WebSocketListener(self, name, ssl_context if name == "WSS" else None)
            bound = await listener.start(host, port)
            self._ws.append(listener)
        else:
            raise ValueError(f"unsupported transport {transport!r}")
        self.listening.append((name, host, bound))
        if advertise is not None:
            self.advertised.setdefault(name, (advertise[0].strip("[]"), advertise[1] or bound))
        self._arm_sweeper()
        return bound

    def local_address(self, transport: str) -> tuple[str, int] | None:
        """The first listening point of ``transport`` (for Via and Contact).

        Its advertised address when it has one; IPv6 hosts come without brackets (use
        :func:`bracket` to write one into a header).
        """
        name = transport.upper()
        advertised = self.advertised.get(name)
        if advertised is not None:
            return advertised
        for listening, host, port in self.listening:
            if listening == name:
                return host, port
        return None

    def is_own_sent_by(self, transport: str, host: str, port: int | None) -> bool:
        """True when a Via sent-by names one of our listening points or advertised addresses.

        A wildcard bind (0.0.0.0, ::) matches any host at its port: such a listener
        cannot know its own addresses unless one is advertised. Without any listening
        point (a pure client) only connections we opened can bring responses: all pass.
        """
        if not self.listening:
            return True
        host = host.strip("[]").lower()
        port = port or DEFAULT_PORTS.get(transport.upper(), 5060)
        for own_host, own_port in self.advertised.values():
            if own_port == port and own_host.lower() == host:
                return True
        for _, own_host, own_port in self.listening:
            if own_port == port and (own_host.lower() == host or own_host in WILDCARD_HOSTS):
                return True
        return False

    # -- sending
    def heard_on(self, host: str, port: int, udp: asyncio.DatagramTransport) -> None:
        """A datagram from ``host``:``port`` came in on listener ``udp`` (of several)."""
        peers = self._udp_peers
        key = (host, port)
        if peers.get(key) is not udp:
            if len(peers) >= MAX_UDP_PEERS and key not in peers:
                del peers[next(iter(peers))]  # the peer known longest; it comes back if heard
            peers[key] = udp

    def udp_listener(self, host: str, port: int) -> asyncio.DatagramTransport | None:
        """The UDP listener to send to ``host`` (an IP address):``port`` from.

        With several: the one that peer was last heard on. RFC 3261 18.2.2 sends a
        response from the socket its request came in on, and a phone behind NAT (RFC 5626)
        only lets in what comes from the address its mapping was opened to, which is also
        what requests we send it need. Else the first listener of the address's family.
        """
        listeners = self._udp
        if not self.several_udp:
            return listeners[0][0] if listeners else None
        udp = self._udp_peers.get((host, port))
        if udp is not None:
            return udp
        v6 = ":" in host
        for (listener, _), is_v6 in zip(listeners, self._udp_v6, strict=True):
            if is_v6 == v6:
                return listener
        return listeners[0][0]

    def send_udp(
        self, data: bytes, address: Address, on_error: ErrorCallback | None = None
    ) -> bool:
        """Send a datagram from the UDP listener :meth:`udp_listener` picks; False when
        that failed at once.

        A host name is resolved first without blocking the loop (``sendto`` would block
        on DNS, and uvloop refuses names); when that fails later, ``on_error`` is called.

        A message over 1300 octets still goes over UDP, against RFC 3261 18.1.1's switch
        to TCP: the phones we send to registered over UDP, mostly from behind NAT, so
        their UDP flow is the only path to them (RFC 5626 §5.3 sends over the registered
        flow); a TCP connection to a NAT mapping gets no answer and would hold the call
        for the connect timeout. Such datagrams are counted (``udp_over_1300_bytes``):
        IP fragments may be lost on the way, and phones that send large SDP are better
        registered over TCP or TLS.
        """
        if not self._udp:
            return False
        if len(data) > UDP_MTU_SAFE:
            self.stats["udp_over_1300_bytes"] += 1
        host = address.host
        if not self.is_ip_literal(host):
            self._spawn(self._resolve_and_send(data, address), on_error)
            return True
        udp = self.udp_listener(host, address.port)
        if udp is None:
            return False
        try:
            udp.sendto(data, (host, address.port))
        except (OSError, ValueError) as exc:
            log.debug("cannot send to %s: %s", address, exc)
            return False
        return True

    def is_ip_literal(self, host: str) -> bool:
        """True when ``host`` is an IP address (cached: it is asked for every datagram)."""
        if host in self._ip_hosts:
            return True
        if not _is_ip(host):
            return False
        if len(self._ip_hosts) > 4096:
            self._ip_hosts.clear()
        self._ip_hosts.add(host)
        return True

    async def _resolve_and_send(self, data: bytes, address: Address) -> None:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(
            address.host, address.port, type=socket.SOCK_DGRAM, proto=socket.IPPROTO_UDP
        )
        if not infos:
            raise OSError(f"{address.host} has no address")
        if not self._udp:
            raise OSError("no UDP listener")
        families = {socket.AF_INET6 if v6 else socket.AF_INET for v6 in self._udp_v6}
        usable = [info for info in infos if info[0] in families] or infos
        host, port = str(usable[0][4][0]), int(usable[0][4][1])
        udp = self.udp_listener(host, port)
        if udp is None:
            raise OSError("no UDP listener")
        udp.sendto(data, (host, port))

    def _spawn(
        self, coro: Coroutine[object, object, object], on_error: ErrorCallback | None
    ) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda t: _report(t, on_error))

    def send(
        self,
        data: bytes,
        address: Address,
        on_error: ErrorCallback | None = None,
        fallback: Address | None = None,
        *,
        connect: bool = True,
    ) -> None:
        """Send over UDP, an existing flow, or a new connection; failures call ``on_error``.

        ``fallback`` is where to connect when the flow ``address`` has closed (for a
        response: the flow's peer at the Via's sent-by port, RFC 3261 18.2.2).
        ``connect=False`` never opens a connection: without an open flow it fails.
        """
        if address.transport == "UDP":
            if not self.send_udp(data, address, on_error) and on_error is not None:
                on_error()
            return
        conn = self._flow(address)
        if conn is not None and conn.is_open():
            conn.write(data)
            return
        if not connect:
            log.debug("no open flow to %s: not sent", address)
            if on_error is not None:
                on_error()
            return
        if fallback is not None:
            address = fallback
        if address.transport in ("WS", "WSS"):  # a browser cannot be connected to
            log.debug("no open flow to %s: not sent", address)
            _fail_soon(on_error)
            return
        task = asyncio.get_running_loop().create_task(self._connect_and_send(data, address))
        task.add_done_callback(lambda t: _report(t, on_error))

    async def _connect_and_send(self, data: bytes, address: Address) -> Flow:
        conn = await self.connect(address)
        conn.write(data)
        return conn

    def _flow(self, address: Address) -> Flow | None:
        """The flow for ``address``, also when it names a host we connected to by name."""
        conn = self.connections.get(address)
        if conn is None:
            key = self._names.get(address)
            if key is not None:
                conn = self.connections.get(key)
        return conn

    async def connect(self, address: Address) -> Flow:
        """The connection to ``address``: the existing flow, or a new one.

        Flows are keyed by IP address and port: a host name is resolved first (without
        blocking), so every send to that name reuses one connection.
        """
        conn = self._flow(address)
        if conn is not None and conn.is_open():
            return conn
        if address.transport not in ("TCP", "TLS"):
            raise ConnectionError(f"cannot connect over {address.transport}")
        if _is_ip(address.host):
            return await self._connect_ip(address, address.host)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(self.config.connect_timeout):
            infos = await loop.getaddrinfo(
                address.host, address.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
        error: Exception = ConnectionError(f"{address.host} has no address")
        for info in infos:
            key = Address(address.transport, str(info[4][0]), int(info[4][1]))
            try:
                conn = await self._connect_ip(key, address.host)
            except (OSError, TimeoutError) as exc:
                error = exc
                continue
            if len(self._names) > 4096:
                self._names.clear()
            self._names[address] = key
            return conn
        raise error

    async def _connect_ip(self, key: Address, server_name: str) -> Flow:
        conn = self.connections.get(key)
        if conn is not None and conn.is_open():
            return conn
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.get_running_loop().create_task(self._open(key, server_name))
            self._pending[key] = pending
            pending.add_done_callback(lambda _t: self._pending.pop(key, None))
        return await asyncio.shield(pending)

    async def _open(self, address: Address, server_name: str) -> Flow:
        loop = asyncio.get_running_loop()
        ctx: ssl.SSLContext | None = None
        if address.transport == "TLS":
            ctx = self.client_ssl or ssl.create_default_context()
        async with asyncio.timeout(self.config.connect_timeout):
            _, conn = await loop.create_connection(
                lambda: StreamConnection(self, address.transport, outgoing=True),
                address.host,
                address.port,
                ssl=ctx,
                server_hostname=server_name if ctx is not None else None,
            )
        if conn.address is None or self.connections.get(conn.address) is not conn:
            raise ConnectionError("max-connections reached")
        return conn

    # -- idle connections
    def _arm_sweeper(self) -> None:
        idle = self.config.idle_timeout
        if idle > 0 and self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.call_later(max(idle / 4, 0.05), self._sweep_tick)

    def _sweep_tick(self) -> None:
        self._sweeper = None
        self.sweep_idle()
        self._arm_sweeper()

    def sweep_idle(self) -> int:
        """Close connections idle for longer than ``idle_timeout``; returns how many."""
        idle = self.config.idle_timeout
        if idle <= 0:
            return 0
        limit = self.clock.monotonic() - idle
        stale = [c for c in self.connections.values() if c.last_activity <= limit]
        for conn in stale:
            log.debug("closing idle connection %s", conn.address)
            conn.close()
        return len(stale)

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for udp, _ in self._udp:
            udp.close()
        self._udp.clear()
        self._udp_v6.clear()
        self._udp_peers.clear()
        self.several_udp = False
        for server in self._servers:
            server.close()
        conns = list(self.connections.values())
        for conn in conns:
            conn.close()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        if conns:
            await asyncio.wait([c.closed for c in conns], timeout=5)
        for listener in self._ws:
            await listener.close()
        self._ws.clear()


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _fail_soon(on_error: ErrorCallback | None) -> None:
    """Report a send that failed at once on the next loop turn, as a connection failure
    is: the caller (a new client transaction) is not known to its TU until send returns."""
    if on_error is not None:
        asyncio.get_running_loop().call_soon(on_error)


def _report(task: asyncio.Task[Any], on_error: ErrorCallback | None) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.debug("cannot send: %s", exc)
        if on_error is not None:
            on_error()
