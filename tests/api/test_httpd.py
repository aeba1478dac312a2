"""The API's HTTP/1.1 server on real sockets: framing, keep-alive, pipelining, limits."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator

import pytest

from sipwake.api.app import error_for
from sipwake.api.httpd import HttpServer, Request, Response


async def echo(request: Request) -> Response:
    body = {
        "method": request.method,
        "path": request.path,
        "query": request.query,
        "body": request.body.decode(),
        "ctype": request.content_type,
        "x": request.headers.get("X-Test"),
    }
    return Response(json.dumps(body).encode(), 200, {"Content-Type": "application/json"})


@pytest.fixture
async def port() -> AsyncIterator[int]:
    server = HttpServer(echo, error_for, max_body_size=100)
    bound = await server.start("127.0.0.1", 0)
    yield bound
    await server.close()


async def exchange(port: int, data: bytes) -> bytes:
    """Send raw bytes and read until the server closes the connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    async with asyncio.timeout(10):
        out = await reader.read()
    writer.close()
    return out


def bodies(raw: bytes) -> list[tuple[int, bytes]]:
    """(status, body) of each response in a stream of Content-Length framed answers."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        length = next(int(v) for k, _, v in (ln.partition(b": ") for ln in lines[1:])
                      if k.lower() == b"content-length")  # fmt: skip
        out.append((status, rest[:length]))
        raw = rest[length:]
    return out


async def test_pipelined_requests_are_answered_in_order(port: int) -> None:
    data = (
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\none"
        b"GET /b?q=1&q=2&r=%20s HTTP/1.1\r\nHost: x\r\nX-Test: yes\r\n\r\n"
        b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Type: application/json; charset=utf-8\r\n"
        b"Connection: close\r\nContent-Length: 2\r\n\r\n{}"
    )
    answers = bodies(await exchange(port, data))
    assert [s for s, _ in answers] == [200, 200, 200]
    got = [json.loads(b) for _, b in answers]
    assert [g["path"] for g in got] == ["/a", "/b", "/c"]
    assert got[0]["body"] == "one"
    assert got[1]["query"] == {"q": "1", "r": " s"} and got[1]["x"] == "yes"
    assert got[2]["ctype"] == "application/json"


async def test_chunked_bodies_are_joined(port: int) -> None:
    data = (
        b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    [(status, body)] = bodies(await exchange(port, data))
    assert status == 200 and json.loads(body)["body"] == "abcde"


async def test_expect_100_continue_is_honoured(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /a HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    async with asyncio.timeout(10):
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hi")
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    writer.close()


async def test_bodies_over_the_limit_are_413_and_closed(port: int) -> None:
    data = b"POST /v1/x HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n" + b"x" * 101
    [(status, body)] = bodies(await exchange(port, data))
    assert status == 413
    assert json.loads(body)["errors"][0]["detail"] == "request body larger than 100 bytes"
    chunked = (
        b"POST /pnm2/send HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"64\r\n" + b"x" * 100 + b"\r\n1\r\nx\r\n0\r\n\r\n"
    )
    [(status, body)] = bodies(await exchange(port, chunked))
    assert status == 413 and json.loads(body)["code"] == 413


async def test_malformed_requests_get_400_json_then_close(port: int) -> None:
    out = await exchange(port, b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nNOT HTTP AT ALL\r\n\r\n")
    answers = bodies(out)
    assert [s for s, _ in answers] == [200, 400]
    assert "malformed HTTP request" in json.loads(answers[1][1])["errors"][0]["detail"]


async def test_oversized_headers_are_431(port: int) -> None:
    data = b"GET /a HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n"
    [(status, _)] = bodies(await exchange(port, data))
    assert status == 431


async def test_http10_closes_and_head_has_no_body(port: int) -> None:
    out = await exchange(port, b"GET /a HTTP/1.0\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in out
    out = await exchange(port, b"HEAD /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, rest = out.partition(b"\r\n\r\n")
    assert b"Content-Length: " in head and rest == b""


async def test_close_drops_idle_keep_alive_connections() -> None:
    server = HttpServer(echo, error_for)
    port = await server.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(10):
        await reader.readuntil(b"\r\n\r\n")
        await server.close()
        assert len(await reader.read()) >= 0  # returns at EOF instead of hanging
    writer.close()


def test_sipwake_serve_answers_with_uvloop(serve) -> None:  # type: ignore[no-untyped-def]
    """The real process (uvloop's transports are not asyncio's classes)."""
    import urllib.request

    sp = serve()
    base = f"http://127.0.0.1:{sp.http_port}"
    with urllib.request.urlopen(base + "/health", timeout=5) as resp:
        assert json.loads(resp.read()) == {"status": "ok"}
    body = json.dumps({"verb": "NotifyReprovision", "AppId": "x", "DeviceToken": "t"}).encode()
    req = urllib.request.Request(
        base + "/pnm2/send", body, {"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        reply = json.loads(resp.read())
    assert reply["code"] == 400 and "Selector" in reply["response"]


async def test_idle_connections_are_closed_after_the_timeout() -> None:
    server = HttpServer(echo, error_for, idle_timeout=0.2)
    port = await server.start("127.0.0.1", 0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(10):
        await reader.readuntil(b"\r\n\r\n")
        await reader.read()  # EOF: the server closed the idle keep-alive connection
    writer.close()
    await server.close()


async def test_100_continue_comes_after_earlier_pipelined_answers(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # One write: the server parses the second request's headers before it answers the first.
    writer.write(
        b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n"
        b"POST /second HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n"
    )
    async with asyncio.timeout(10):
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")  # the answer to /first, not 100 Continue
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        assert json.loads(await reader.readexactly(length))["path"] == "/first"
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"ok")
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ")
    writer.close()


async def test_a_client_that_does_not_read_gets_no_more_answers() -> None:
    """Answers stop above the write high-water mark and resume once the client reads."""
    from sipwake.api.httpd import WRITE_HIGH_WATER

    big = b"x" * 65536
    seen_buffered: list[int] = []
    paused = asyncio.Event()

    async def handler(request: Request) -> Response:
        conn = next(iter(server.connections))
        assert conn.transport is not None
        buffered = conn.transport.get_write_buffer_size()
        seen_buffered.append(buffered)
        if buffered + len(big) > WRITE_HIGH_WATER:
            paused.set()  # this answer takes the buffer over the mark
        return Response(big, 200)

    server = HttpServer(handler, error_for)
    bound = await server.start("127.0.0.1", 0)
    loop = asyncio.get_running_loop()
    count = 400  # 26 MB of answers, far more than the kernel's socket buffers hold
    sock = socket.create_connection(("127.0.0.1", bound))
    sock.setblocking(False)
    await loop.sock_sendall(sock, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n" * count)
    # Not reading: the server's buffer fills (wait_for only guards against a hang).
    await asyncio.wait_for(paused.wait(), 10)
    # Now read everything: every answer arrives.
    expected = count * (len(big) + len(b"HTTP/1.1 200 OK\r\n"))
    received = bytearray()
    async with asyncio.timeout(30):
        while received.count(b"HTTP/1.1 200 OK\r\n") < count or len(received) < expected:
            chunk = await loop.sock_recv(sock, 1 << 20)
            assert chunk
            received += chunk
    sock.close()
    await server.close()
    assert len(seen_buffered) == count
    # No answer was started while more than the high-water mark waited to be sent.
    assert max(seen_buffered) <= WRITE_HIGH_WATER
