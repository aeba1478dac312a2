"""SIP transactions (RFC 3261 section 17, with the RFC 6026 Accepted states), sans-IO.

Transactions take events (a received message, a response from the TU, a fired timer, a
transport error) and return *actions* (send these bytes to that address, deliver this
message to the TU, the transaction timed out or ended). Nothing here touches a socket or
an event loop: timers are absolute deadlines on a :class:`~sipwake.clock.Clock`, and
whoever drives the layer calls :meth:`TransactionLayer.tick` when
:meth:`TransactionLayer.next_deadline` is reached. Tests drive it with a FakeClock.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple, TypeAlias

from sipwake.clock import Clock
from sipwake.sip.headers import CSeq, Via
from sipwake.sip.message import Headers, Request, Response

MAGIC_COOKIE = "z9hG4bK"

DEFAULT_PORTS = {"UDP": 5060, "TCP": 5060, "TLS": 5061, "WS": 80, "WSS": 443}


class Address(NamedTuple):
    """Where a message goes or came from: a transport and a remote host and port.

    A named tuple (not a dataclass): one or two are built per packet on the hot path.

    For connection-oriented transports the triple also names the connection (the flow),
    so a response or a later request to the same address reuses it.
    """

    transport: str
    host: str
    port: int

    @property
    def reliable(self) -> bool:
        """Reliable transports carry no retransmissions (RFC 3261 17.1.1.2)."""
        return self.transport != "UDP"


@dataclass(frozen=True, slots=True)
class TimerConfig:
    """T1, T2 and T4 in seconds (RFC 3261 table 4); every other timer derives from them."""

    t1: float = 0.5
    t2: float = 4.0
    t4: float = 5.0
    #: Timer D on unreliable transports: "at least 32 s".
    d: float = 32.0


class State(Enum):
    CALLING = "Calling"
    TRYING = "Trying"
    PROCEEDING = "Proceeding"
    ACCEPTED = "Accepted"
    COMPLETED = "Completed"
    CONFIRMED = "Confirmed"
    TERMINATED = "Terminated"


# --------------------------------------------------------------------------- actions


class Send(NamedTuple):
    """Send ``data`` (a serialised ``message``) to ``address`` on behalf of ``transaction``.

    ``message`` is None for the retransmission of a final response whose object was
    released (only its bytes are kept while the transaction absorbs retransmissions).
    """

    transaction: Transaction | None
    message: Request | Response | None
    data: bytes
    address: Address


class DeliverRequest(NamedTuple):
    """A new request for the TU (``transaction`` is None for an ACK outside any)."""

    transaction: ServerTransaction | None
    request: Request
    source: Address


class DeliverResponse(NamedTuple):
    """A response for the TU (``transaction`` is None for a stray one, e.g. a 2xx retransmit)."""

    transaction: ClientTransaction | None
    response: Response
    source: Address


@dataclass(frozen=True, slots=True)
class Timeout:
    """Timer B, F or H fired: the TU treats it like a 408 (client) or a lost ACK (server)."""

    transaction: Transaction


@dataclass(frozen=True, slots=True)
class TransportFailure:
    """The transport could not deliver the transaction's message (RFC 3261 17.1.4, 17.2.4)."""

    transaction: Transaction


@dataclass(frozen=True, slots=True)
class Terminated:
    """The transaction has ended and is forgotten by the layer."""

    transaction: Transaction


Action: TypeAlias = (
    Send | DeliverRequest | DeliverResponse | Timeout | TransportFailure | Terminated
)

Scheduler = Callable[["Transaction", str, float], None]


class MalformedMessage(ValueError):
    """A message without the Via or CSeq that transactions need (the transport checks)."""


def _top_via(msg: Request | Response) -> Via:
    via = msg.top_via
    if via is None:
        raise MalformedMessage("no Via")
    return via


def _cseq(msg: Request | Response) -> CSeq:
    cseq = msg.cseq
    if cseq is None:
        raise MalformedMessage("no CSeq")
    return cseq


def _tag(msg: Request | Response, which: str) -> str | None:
    addr = msg.to if which == "to" else msg.from_
    return None if addr is None else addr.tag


def _sent_by(via_host: str, via_port: int | None, transport: str) -> tuple[str, int]:
    return via_host.lower(), via_port or DEFAULT_PORTS.get(transport.upper(), 5060)


# --------------------------------------------------------------------------- base


class Transaction:
    """What client and server transactions share: state, timers, key."""

    __slots__ = (
        "_scheduler",
        "clock",
        "config",
        "intervals",
        "key",
        "method",
        "reliable",
        "state",
        "timers",
    )
    kind = ""

    def __init__(
        self,
        key: tuple[object, ...],
        request: Request,
        clock: Clock,
        timers: TimerConfig,
        reliable: bool,
        scheduler: Scheduler | None = None,
    ) -> None:
        self.key = key
        self.method = request.method
        self.clock = clock
        self.config = timers
        self.reliable = reliable
        self.state = State.TRYING
        #: Pending timers: name -> absolute deadline on ``clock.monotonic()``.
        self.timers: dict[str, float] = {}
        #: Current interval of the doubling retransmission timer (A, E or G).
        self.intervals: dict[str, float] = {}
        self._scheduler = scheduler

    @property
    def terminated(self) -> bool:
        return self.state is State.TERMINATED

    def _start(self, name: str, delay: float) -> None:
        deadline = self.clock.monotonic() + delay
        self.timers[name] = deadline
        if self._scheduler is not None:
            self._scheduler(self, name, deadline)

    def _stop(self, *names: str) -> None:
        for name in names:
            self.timers.pop(name, None)

    def _terminate(self, actions: list[Action]) -> list[Action]:
        if self.state is not State.TERMINATED:
            self.state = State.TERMINATED
            self.timers.clear()
            actions.append(Terminated(self))
        return actions

    def timer_fired(self, name: str) -> list[Action]:
        """Run timer ``name``; a timer that was stopped meanwhile does nothing."""
        if self.timers.pop(name, None) is None or self.terminated:
            return []
        return self._on_timer(name)

    def due_timers(self) -> list[str]:
        """Names of the timers whose deadline has passed, earliest first."""
        now = self.clock.monotonic()
        due = [(t, n) for n, t in self.timers.items() if t <= now]
        return [n for _, n in sorted(due)]

    def tick(self) -> list[Action]:
        """Fire every timer that is due now (for driving one transaction on its own)."""
        actions: list[Action] = []
        for name in self.due_timers():
            actions.extend(self.timer_fired(name))
        return actions

    def transport_error(self) -> list[Action]:
        """The transport failed to send this transaction's message: tell the TU, end."""
        if self.terminated:
            return []
        return self._terminate([TransportFailure(self)])

    def _on_timer(self, name: str) -> list[Action]:  # pragma: no cover - abstract
        raise NotImplementedError


# --------------------------------------------------------------------------- client


class ClientTransaction(Transaction):
    """INVITE (17.1.1) and non-INVITE (17.1.2) client transactions."""

    __slots__ = ("ack", "address", "data", "final_response", "is_invite", "request")
    kind = "client"

    def __init__(
        self,
        key: tuple[object, ...],
        request: Request,
        address: Address,
        clock: Clock,
        timers: TimerConfig,
        scheduler: Scheduler | None = None,
    ) -> None:
        super().__init__(key, request, clock, timers, address.reliable, scheduler)
        self.request = request
        self.address = address
        self.is_invite = request.method == "INVITE"
        self.data = request.to_bytes()
        self.ack: Request | None = None
        self.final_response: Response | None = None

    def start(self) -> list[Action]:
        """Send the request and start Timer A/B (INVITE) or E/F (non-INVITE)."""
        t1 = self.config.t1
        if self.is_invite:
            self.state = State.CALLING
            if not self.reliable:
                self.intervals["A"] = t1
                self._start("A", t1)
            self._start("B", 64 * t1)
        else:
            self.state = State.TRYING
            if not self.reliable:
                self.intervals["E"] = t1
                self._start("E", t1)
            self._start("F", 64 * t1)
        return [Send(self, self.request, self.data, self.address)]

    def receive(self, response: Response, source: Address | None = None) -> list[Action]:
        """A response matched this transaction."""
        src = source or self.address
        status = response.status
        state = self.state
        actions: list[Action] = []
        if self.is_invite:
            if state in (State.CALLING, State.PROCEEDING):
                if status < 200:
                    self.state = State.PROCEEDING
                    self._stop("A", "B")
                    actions.append(DeliverResponse(self, response, src))
                elif status < 300:
                    # RFC 6026: stay around (Timer M) to pass 2xx retransmissions up.
                    self.state = State.ACCEPTED
                    self._stop("A", "B")
                    self.final_response = response
                    actions.append(DeliverResponse(self, response, src))
                    self._start("M", 64 * self.config.t1)
                else:
                    self.state = State.COMPLETED
                    self._stop("A", "B")
                    self.final_response = response
                    self.ack = build_ack(self.request, response)
                    actions.append(Send(self, self.ack, self.ack.to_bytes(), self.address))
                    actions.append(DeliverResponse(self, response, src))
                    if self.reliable:
                        return self._terminate(actions)
                    self._start("D", self.config.d)
            elif state is State.ACCEPTED:
                if 200 <= status < 300:
                    actions.append(DeliverResponse(self, response, src))
            elif state is State.COMPLETED and status >= 300 and self.ack is not None:
                # A retransmitted final response: our ACK was lost; send it again.
                actions.append(Send(self, self.ack, self.ack.to_bytes(), self.address))
            return actions
        if state in (State.TRYING, State.PROCEEDING):
            if status < 200:
                self.state = State.PROCEEDING
                actions.append(DeliverResponse(self, response, src))
            else:
                self.state = State.COMPLETED
                self._stop("E", "F")
                self.final_response = response
                actions.append(DeliverResponse(self, response, src))
                if self.reliable:
                    return self._terminate(actions)
                self._start("K", self.config.t4)
        return actions

    def _on_timer(self, name: str) -> list[Action]:
        actions: list[Action] = []
        if name == "A" and self.state is State.CALLING:
            interval = self.intervals["A"] * 2
            self.intervals["A"] = interval
            self._start("A", interval)
            actions.append(Send(self, self.request, self.data, self.address))
        elif name == "E" and self.state in (State.TRYING, State.PROCEEDING):
            if self.state is State.TRYING:
                interval = min(self.intervals["E"] * 2, self.config.t2)
            else:
                interval = self.config.t2
            self.intervals["E"] = interval
            self._start("E", interval)
            actions.append(Send(self, self.request, self.data, self.address))
        elif (name == "B" and self.state is State.CALLING) or (
            name == "F" and self.state in (State.TRYING, State.PROCEEDING)
        ):
            actions.append(Timeout(self))
            self._terminate(actions)
        elif name in ("D", "K", "M"):
            self._terminate(actions)
        return actions


def build_ack(request: Request, response: Response) -> Request:
    """The ACK for a non-2xx final response (RFC 3261 17.1.1.3), sent hop by hop."""
    headers = Headers()
    via = request.headers.get_all("Via")
    if via:
        headers.add("Via", via[0])
    for name in ("Route",):
        for value in request.headers.get_all(name):
            headers.add(name, value)
    headers.add("Max-Forwards", "70")
    headers.add("From", request.headers.get("From") or "")
    headers.add("To", response.headers.get("To") or request.headers.get("To") or "")
    headers.add("Call-ID", request.headers.get("Call-ID") or "")
    headers.add("CSeq", f"{_cseq(request).number} ACK")
    headers.add("Content-Length", "0")
    return Request("ACK", request.uri, headers, b"", request.version)


# --------------------------------------------------------------------------- server


class ServerTransaction(Transaction):
    """INVITE (17.2.1) and non-INVITE (17.2.2) server transactions."""

    __slots__ = (
        "cancelled",
        "is_invite",
        "last_data",
        "last_response",
        "reply_to",
        "request",
        "request_to_tag",
        "source",
        "to_tag",
    )
    kind = "server"

    def __init__(
        self,
        key: tuple[object, ...],
        request: Request,
        source: Address,
        clock: Clock,
        timers: TimerConfig,
        scheduler: Scheduler | None = None,
    ) -> None:
        super().__init__(key, request, clock, timers, source.reliable, scheduler)
        #: The request; None once a non-INVITE transaction over UDP has sent its final
        #: response (see :meth:`_release`).
        self.request: Request | None = request
        #: The request's To tag once the request is released (RFC 2543 matching).
        self.request_to_tag: str | None = None
        self.source = source
        #: Where responses go (RFC 3261 18.2.2 / RFC 3581): the flow it came from.
        self.reply_to = source
        self.is_invite = request.method == "INVITE"
        self.state = State.PROCEEDING if self.is_invite else State.TRYING
        self.last_response: Response | None = None
        self.last_data: bytes | None = None
        #: To tag of our final response, for RFC 2543 ACK matching.
        self.to_tag: str | None = None
        #: Set by the TU when a CANCEL for this INVITE arrived.
        self.cancelled = False

    def start(self, auto_trying: bool = True) -> list[Action]:
        """Hand the request to the TU; an INVITE gets 100 Trying first (17.2.1).

        The 100 is sent before the TU sees the request: a TU that answers at once must
        not have its final response overtaken by the provisional one.
        """
        request = self.request
        assert request is not None  # released only once completed
        actions: list[Action] = []
        if self.is_invite and auto_trying:
            from sipwake.sip.message import make_response

            actions.extend(self.send_response(make_response(request, 100)))
        actions.append(DeliverRequest(self, request, self.source))
        return actions

    def start_guard(self) -> None:
        """Bound a non-INVITE transaction the TU has not answered yet to 64*T1.

        RFC 3261 gives the server no timer here, but by then the client's Timer F has
        given up; without a bound a TU that never answers would keep it forever.
        """
        if not self.is_invite and self.state in (State.TRYING, State.PROCEEDING):
            self._start("guard", 64 * self.config.t1)

    def _send(self, response: Response) -> Send:
        self.last_response = response
        self.last_data = response.to_bytes()
        return Send(self, response, self.last_data, self.reply_to)

    def _resend(self) -> list[Action]:
        if self.last_data is None:
            return []
        return [Send(self, self.last_response, self.last_data, self.reply_to)]

    def send_response(self, response: Response) -> list[Action]:
        """The TU answers; responses after the final one are refused silently."""
        status = response.status
        state = self.state
        t1 = self.config.t1
        actions: list[Action] = []
        if self.is_invite:
            if state is State.PROCEEDING:
                actions.append(self._send(response))
                if 200 <= status < 300:
                    self.state = State.ACCEPTED
                    self._start("L", 64 * t1)
                elif status >= 300:
                    self.state = State.COMPLETED
                    self.to_tag = _tag(response, "to")
                    if not self.reliable:
                        self.intervals["G"] = t1
                        self._start("G", t1)
                    self._start("H", 64 * t1)
            elif state is State.ACCEPTED and 200 <= status < 300:
                # The TU retransmits its 2xx itself (RFC 6026 7.1).
                actions.append(self._send(response))
            return actions
        if state in (State.TRYING, State.PROCEEDING):
            actions.append(self._send(response))
            if status < 200:
                self.state = State.PROCEEDING
            else:
                self.state = State.COMPLETED
                self._stop("guard")
                if self.reliable:
                    return self._terminate(actions)
                self._start("J", 64 * t1)
                self._release()
        return actions

    def _release(self) -> None:
        """Keep only what absorbing retransmissions needs for the 32 s of Timer J.

        At thousands of requests per second, over a hundred thousand completed
        transactions are alive at once; every object they hold is rescanned by the
        garbage collector, so the response and the request (with its headers) go: the
        response's bytes, where they go, the key and the timer stay, none of them an
        object the collector tracks. The request's To tag stays for RFC 2543 matching.
        """
        request = self.request
        if request is not None and self.key[0] == "2543":  # only those match by To tag
            self.request_to_tag = _tag(request, "to")
        self.last_response = None
        self.request = None

    def to_tag_of_request(self) -> str | None:
        """The To tag the request carried (kept when the request itself is released)."""
        request = self.request
        return self.request_to_tag if request is None else _tag(request, "to")

    def receive(self, request: Request, source: Address | None = None) -> list[Action]:
        """A retransmission of the request, or (INVITE) the ACK, matched this transaction."""
        state = self.state
        if request.method == "ACK":
            if not self.is_invite:
                return []
            if state is State.COMPLETED:
                self.state = State.CONFIRMED
                self._stop("G", "H")
                if self.reliable:
                    return self._terminate([])
                self._start("I", self.config.t4)
            elif state is State.ACCEPTED:
                # An ACK for our 2xx that used the INVITE's branch: the TU wants it.
                return [DeliverRequest(self, request, source or self.source)]
            return []
        # A retransmission of the request itself.
        if state in (State.PROCEEDING, State.COMPLETED):
            return self._resend()
        return []

    def _on_timer(self, name: str) -> list[Action]:
        actions: list[Action] = []
        if name == "G" and self.state is State.COMPLETED:
            interval = min(self.intervals["G"] * 2, self.config.t2)
            self.intervals["G"] = interval
            self._start("G", interval)
            actions.extend(self._resend())
        elif name == "H" and self.state is State.COMPLETED:
            actions.append(Timeout(self))
            self._terminate(actions)
        elif name in ("I", "J", "L"):
            self._terminate(actions)
        elif name == "guard" and self.state in (State.TRYING, State.PROCEEDING):
            actions.append(Timeout(self))
            self._terminate(actions)
        return actions


# --------------------------------------------------------------------------- matching


def server_key(request: Request, transport: str) -> tuple[object, ...]:
    """The key that matches a request to its server transaction (17.2.3).

    With the magic cookie: branch, sent-by and method (ACK matches INVITE). Without it
    (RFC 2543 peers): Request-URI, From tag, Call-ID, CSeq number, top Via and method;
    the To tag is checked separately because an ACK carries the tag of our response.

    The key is a flat tuple of strings and numbers: the garbage collector stops tracking
    it at its first pass, so the thousands of completed transactions Timer J keeps alive
    cost it one object less each.
    """
    via = _top_via(request)
    method = request.method
    if method == "ACK":
        method = "INVITE"
    host, port = _sent_by(via.host, via.port, via.transport or transport)
    branch = via.branch or ""
    if branch.startswith(MAGIC_COOKIE):
        return (branch, host, port, method)
    return (
        "2543",
        request.uri,
        _tag(request, "from"),
        request.call_id,
        _cseq(request).number,
        host,
        port,
        branch,
        method,
    )


def client_key(branch: str, method: str) -> tuple[object, ...]:
    """Responses match client transactions by top-Via branch and CSeq method (17.1.3)."""
    return (branch, "ACK" if method == "ACK" else method)


#: Timers that always run for the same delay and end nearly every UDP transaction (Timer J
#: of a non-INVITE server transaction, K of a client one): kept in :class:`_TimerQueue`.
_QUEUED_TIMERS = ("J", "K")


class _TimerQueue:
    """The pending timers of one name whose delay never changes, in deadline order.

    Deadlines scheduled as "now + the same delay" come in order, so a FIFO keeps them
    sorted: no heap push among the hundreds of thousands of Timer J entries a busy UDP
    server holds, and no tuple per timer for the garbage collector to track (three
    parallel deques: transaction, deadline, sequence number for ties).
    """

    __slots__ = ("deadlines", "name", "seqs", "txns")

    def __init__(self, name: str) -> None:
        self.name = name
        self.txns: collections.deque[Transaction] = collections.deque()
        self.deadlines: collections.deque[float] = collections.deque()
        self.seqs: collections.deque[int] = collections.deque()

    def push(self, txn: Transaction, deadline: float, seq: int) -> bool:
        """Append a timer; False (not taken) when it would not be the latest deadline."""
        deadlines = self.deadlines
        if deadlines and deadlines[-1] > deadline:
            return False
        self.txns.append(txn)
        deadlines.append(deadline)
        self.seqs.append(seq)
        return True

    def drop_stale(self) -> None:
        """Forget leading entries whose timer was stopped, fired or ended meanwhile."""
        txns, deadlines, name = self.txns, self.deadlines, self.name
        while deadlines and txns[0].timers.get(name) != deadlines[0]:
            txns.popleft()
            deadlines.popleft()
            self.seqs.popleft()

    def pop(self) -> Transaction:
        self.deadlines.popleft()
        self.seqs.popleft()
        return self.txns.popleft()


class TransactionLayer:
    """Matches messages to transactions, creates them, and keeps their timers in a heap
    (and the fixed-delay J and K timers in FIFOs)."""

    def __init__(self, clock: Clock, timers: TimerConfig | None = None) -> None:
        self.clock = clock
        self.timers = timers or TimerConfig()
        self.server: dict[tuple[object, ...], ServerTransaction] = {}
        self.client: dict[tuple[object, ...], ClientTransaction] = {}
        self._heap: list[tuple[float, int, Transaction, str]] = []
        self._queues: dict[str, _TimerQueue] = {name: _TimerQueue(name) for name in _QUEUED_TIMERS}
        self._queue_list = tuple(self._queues.values())
        self._seq = itertools.count()
        self._branches = itertools.count(1)
        # Random, not derived from the process: a peer must not predict our branches
        # (a guessed branch lets a forged response match a client transaction).
        self._branch_prefix = f"{MAGIC_COOKIE}sw{secrets.token_hex(4)}"
        # One bound method shared by every transaction (not one object per transaction).
        self._scheduler: Scheduler = self._schedule

    # -- timers
    def _schedule(self, txn: Transaction, name: str, deadline: float) -> None:
        seq = next(self._seq)
        queue = self._queues.get(name)
        if queue is None or not queue.push(txn, deadline, seq):
            heapq.heappush(self._heap, (deadline, seq, txn, name))

    def next_deadline(self) -> float | None:
        """The earliest pending deadline (stale entries are dropped on the way)."""
        heap = self._heap
        best: float | None = None
        while heap:
            deadline, _, txn, name = heap[0]
            if txn.timers.get(name) == deadline:
                best = deadline
                break
            heapq.heappop(heap)
        for queue in self._queue_list:
            queue.drop_stale()
            if queue.deadlines:
                first = queue.deadlines[0]
                if best is None or first < best:
                    best = first
        return best

    def tick(self) -> list[Action]:
        """Fire every timer due at ``clock.monotonic()``, earliest first (ties: in the
        order they were scheduled)."""
        now = self.clock.monotonic()
        heap = self._heap
        actions: list[Action] = []
        while True:
            chosen: _TimerQueue | None = None
            found = False
            best = 0.0
            best_seq = 0
            if heap and heap[0][0] <= now:
                found, best, best_seq = True, heap[0][0], heap[0][1]
            for queue in self._queue_list:
                queue.drop_stale()
                deadlines = queue.deadlines
                if deadlines and deadlines[0] <= now:
                    first, seq = deadlines[0], queue.seqs[0]
                    if not found or first < best or (first == best and seq < best_seq):
                        found, best, best_seq, chosen = True, first, seq, queue
            if not found:
                return actions
            if chosen is not None:
                txn, name = chosen.pop(), chosen.name
            else:
                deadline, _, txn, name = heapq.heappop(heap)
                if txn.timers.get(name) != deadline:
                    continue
            actions.extend(self._after(txn.timer_fired(name)))

    def _after(self, actions: list[Action]) -> list[Action]:
        for action in actions:
            if isinstance(action, Terminated):
                self._forget(action.transaction)
        return actions

    def _forget(self, txn: Transaction) -> None:
        if isinstance(txn, ServerTransaction):
            if self.server.get(txn.key) is txn:
                del self.server[txn.key]
        elif self.client.get(txn.key) is txn:
            del self.client[txn.key]

    # -- incoming
    def receive_request(
        self, request: Request, source: Address, reply_to: Address | None = None
    ) -> list[Action]:
        """A request from the transport: absorbed, matched, or a new server transaction.

        ``reply_to`` is where the transport says responses go (RFC 3261 18.2.2); it
        defaults to ``source``.
        """
        key = server_key(request, source.transport)
        txn = self.server.get(key)
        if txn is not None and key[0] == "2543" and not self._match_2543(txn, request):
            txn = None
        if txn is not None:
            return self._after(txn.receive(request, source))
        if request.method == "ACK":
            # An ACK for a 2xx (or for a transaction long gone): the TU decides.
            return [DeliverRequest(None, request, source)]
        txn = ServerTransaction(key, request, source, self.clock, self.timers, self._scheduler)
        if reply_to is not None:
            txn.reply_to = reply_to
        self.server[key] = txn
        return self._after(txn.start())

    @staticmethod
    def _match_2543(txn: ServerTransaction, request: Request) -> bool:
        to_tag = _tag(request, "to")
        if request.method == "ACK":
            return to_tag == txn.to_tag
        return to_tag == txn.to_tag_of_request()

    def receive_response(self, response: Response, source: Address) -> list[Action]:
        """A response from the transport: to its client transaction, or stray to the TU."""
        branch = _top_via(response).branch or ""
        txn = self.client.get(client_key(branch, _cseq(response).method))
        if txn is None:
            return [DeliverResponse(None, response, source)]
        return self._after(txn.receive(response, source))

    def find_cancel_target(self, cancel: Request, transport: str) -> ServerTransaction | None:
        """The INVITE server transaction a CANCEL is about (RFC 3261 9.2)."""
        key = server_key(cancel, transport)
        target_key = (*key[:-1], "INVITE")
        txn = self.server.get(target_key)
        if txn is not None and key[0] == "2543" and txn.to_tag_of_request() != _tag(cancel, "to"):
            return None
        return txn

    # -- from the TU
    def new_branch(self) -> str:
        """A branch unique to this layer, starting with the magic cookie; unpredictable."""
        return f"{self._branch_prefix}.{next(self._branches):x}{secrets.token_hex(4)}"

    def send_request(
        self, request: Request, address: Address
    ) -> tuple[ClientTransaction, list[Action]]:
        """Start a client transaction for ``request`` (its top Via already has a branch)."""
        branch = _top_via(request).branch or ""
        key = client_key(branch, request.method)
        txn = ClientTransaction(key, request, address, self.clock, self.timers, self._scheduler)
        self.client[key] = txn
        return txn, self._after(txn.start())

    def send_response(self, txn: ServerTransaction, response: Response) -> list[Action]:
        """The TU's response through its server transaction."""
        return self._after(txn.send_response(response))

    def transport_error(self, txn: Transaction) -> list[Action]:
        """The transport failed on ``txn``'s behalf."""
        return self._after(txn.transport_error())

    def __len__(self) -> int:
        return len(self.server) + len(self.client)
