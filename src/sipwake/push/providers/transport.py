"""The HTTP seam under the FCM, Web Push and external providers.

Providers speak to a :class:`HttpTransport`; which protocol carries the request is a
configuration choice: ``http2`` uses the project's long-lived HTTP/2 client (one connection
per origin, multiplexed), ``http`` uses one kept-alive aiohttp session (HTTP/1.1). Errors at
the network level come back as :class:`TransportError` so providers map them to one
outcome whichever protocol ran. A :class:`TransportError` says whether the server may
have processed the request: only a request that provably was not (no connection, refused
before processing) may be sent again, since a push re-sent after a lost answer can reach
the device twice.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import email.utils
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp

from sipwake.push.http2 import Http2Client, Http2ConnectError, Http2Error, Http2Timeout

PROTOCOLS = ("http2", "http")


@dataclass(frozen=True, slots=True)
class HttpResponse:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


class TransportError(Exception):
    """The request got no HTTP answer (connection, TLS or timeout); the message says which.

    ``maybe_processed`` is False only when the server provably did not act on the request
    (the connection could not be made, or HTTP/2 refused the stream): only then may the
    caller send it again. After a timeout or a connection lost once the request was sent,
    the push may already have been delivered.
    """

    def __init__(self, message: str, *, maybe_processed: bool = True) -> None:
        super().__init__(message)
        self.maybe_processed = maybe_processed


class HttpTransport(Protocol):
    async def request(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: bytes = b"",
    ) -> HttpResponse:
        """Send one request to an absolute ``url`` and return the full answer."""
        ...

    async def aclose(self) -> None: ...


def ssl_context(ca_file: str | None = None) -> ssl.SSLContext:
    """A TLS context for provider connections: ``ca_file`` replaces the system store.

    Each transport needs its own: the HTTP/2 client sets ALPN ``h2`` on the one it gets.
    """
    return ssl.create_default_context(cafile=ca_file or None)


def origin_of(url: str) -> str:
    """``scheme://host:port`` of a URL, the unit a connection is kept for."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return f"{parts.scheme}://{host}:{port}"


class Http1Transport:
    """HTTP/1.1 over one aiohttp session whose connections are kept alive between pushes."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 8,
        request_timeout: float = 10.0,
    ) -> None:
        self._ssl = ssl_context
        self._limit = max_connections
        self._timeout = request_timeout
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._limit, ssl=self._ssl if self._ssl is not None else True
            )
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        return self._session

    async def request(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: bytes = b"",
    ) -> HttpResponse:
        session = self._get_session()
        limit = aiohttp.ClientTimeout(total=self._timeout)
        try:
            async with session.request(
                method, url, headers=list(headers), data=body or None, timeout=limit
            ) as resp:
                data = await resp.read()
                return HttpResponse(
                    resp.status, {k.lower(): v for k, v in resp.headers.items()}, data
                )
        except aiohttp.ConnectionTimeoutError:
            raise TransportError(
                f"no connection to {origin_of(url)} in time", maybe_processed=False
            ) from None
        except aiohttp.ClientSSLError as exc:
            raise TransportError(
                f"TLS failure with {origin_of(url)}: {exc}", maybe_processed=False
            ) from None
        except aiohttp.ClientConnectorError as exc:
            raise TransportError(
                f"connection to {origin_of(url)} failed: {exc}", maybe_processed=False
            ) from None
        except TimeoutError:  # the request may be on the wire: it may have been processed
            raise TransportError(f"timeout: no answer from {origin_of(url)} in time") from None
        except aiohttp.ClientConnectionError as exc:
            raise TransportError(
                f"connection lost after sending to {origin_of(url)}: {exc}"
            ) from None
        except aiohttp.ClientError as exc:
            raise TransportError(f"HTTP error with {origin_of(url)}: {exc}") from None

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class Http2Transport:
    """HTTP/2 with one long-lived :class:`Http2Client` per origin."""

    def __init__(
        self, *, ssl_context: ssl.SSLContext | None = None, request_timeout: float = 10.0
    ) -> None:
        self._ssl = ssl_context
        self._timeout = request_timeout
        self._clients: dict[str, Http2Client] = {}
        self._split_cache: dict[str, tuple[str, str]] = {}  # url -> (origin, path)

    def _client(self, origin: str) -> Http2Client:
        client = self._clients.get(origin)
        if client is None:
            client = Http2Client(origin, ssl_context=self._ssl, request_timeout=self._timeout)
            self._clients[origin] = client
        return client

    async def request(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: bytes = b"",
    ) -> HttpResponse:
        split = self._split_cache.get(url)
        if split is None:
            parts = urlsplit(url)
            path = parts.path or "/"
            if parts.query:
                path += "?" + parts.query
            split = origin_of(url), path
            if len(self._split_cache) >= 256:  # per-token URLs (Web Push) would grow it
                self._split_cache.clear()
            self._split_cache[url] = split
        origin, path = split
        client = self._client(origin)
        try:
            resp = await client.request(method, path, list(headers), body, timeout=self._timeout)
        except Http2Timeout:
            raise TransportError(f"timeout: no answer from {origin} in time") from None
        except Http2Error as exc:
            raise _classify_http2(origin, exc) from None
        return HttpResponse(resp.status, dict(resp.headers), resp.body)

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


def _classify_http2(origin: str, exc: Http2Error) -> TransportError:
    """The TransportError for an HTTP/2 failure, saying whether the request may have run.

    :class:`Http2Client` re-sends by itself what the server provably did not process and
    says, in ``maybe_processed``, whether a failed request may still have been acted on.
    """
    text = str(exc)
    if isinstance(exc, Http2ConnectError):
        return TransportError(
            f"HTTP/2 connection to {origin} failed: {text}", maybe_processed=False
        )
    if not exc.maybe_processed:
        return TransportError(
            f"HTTP/2 request to {origin} not processed: {text}", maybe_processed=False
        )
    return TransportError(f"connection lost after sending to {origin}: {text}")


def make_transport(
    protocol: str, *, ssl_context: ssl.SSLContext | None = None, request_timeout: float = 10.0
) -> HttpTransport:
    """The transport for a ``protocol`` setting (``http2`` or ``http``)."""
    if protocol == "http2":
        return Http2Transport(ssl_context=ssl_context, request_timeout=request_timeout)
    if protocol == "http":
        return Http1Transport(ssl_context=ssl_context, request_timeout=request_timeout)
    raise ValueError(f"protocol must be http2 or http, got {protocol!r}")


def retry_after(headers: dict[str, str], now_wall: float) -> float | None:
    """Seconds a ``Retry-After`` header asks to wait (delta-seconds or HTTP-date)."""
    value = headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 §5.6.7: HTTP dates are GMT ("-0000" parses naive)
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, when.timestamp() - now_wall)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Bounded exponential backoff with full jitter, for 429 and 5xx answers.

    ``attempts`` counts every try including the first; a ``Retry-After`` longer than
    ``cap`` ends the retries, since waiting that long would outlive a call push.
    """

    attempts: int = 4
    base: float = 0.5
    cap: float = 30.0

    def delay(self, retry: int, jitter: float, asked: float | None) -> float | None:
        """Seconds to wait before retry number ``retry`` (1-based), or None to give up."""
        if retry >= self.attempts:
            return None
        if asked is not None:
            return asked if asked <= self.cap else None
        ceiling = min(self.cap, self.base * float(1 << min(retry - 1, 30)))
        return ceiling * (0.5 + 0.5 * jitter)


class InFlight:
    """Counts pushes under way so ``aclose`` can let them finish before closing."""

    def __init__(self) -> None:
        self.count = 0
        self._idle: asyncio.Event | None = None

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:
        if self.count:
            if self._idle is None or self._idle.is_set():
                self._idle = asyncio.Event()
            await self._idle.wait()
