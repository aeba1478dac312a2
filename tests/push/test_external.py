"""The generic external pusher against the recording receiver, over HTTP/1.1 and HTTP/2."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from sipwake.push.providers.external import VARIABLES, ExternalProvider, expand
from sipwake.push.request import Destination, Outcome, Provider, PushKind, PushRequest
from sipwake.simulator.external import ExternalReceiver

TEMPLATE = (
    "/push?type=$type&token=$token&app=$app-id&name=$from-name&from=$from-uri&tag=$from-tag"
    "&to=$to-uri&cid=$call-id&event=$event&sound=$sound&msg=$msgid&uid=$uid&again=$token"
)


@pytest.fixture(params=["http", "http2"])
async def setup(request: pytest.FixtureRequest) -> AsyncIterator[tuple[ExternalReceiver, str]]:
    receiver = await ExternalReceiver().start(http2=request.param == "http2")
    yield receiver, request.param
    await receiver.aclose()


def call(token: str = "tok/with space&amp", *, shown: bool = True) -> PushRequest:
    """A call push; ``shown``: the caller's identity may leave the server
    (``[push] display-from-uri``)."""
    return PushRequest(
        destination=Destination(Provider.FCM, "org.example.app", token),
        kind=PushKind.CALL,
        call_id="abc@host",
        from_uri="sip:alice@example.org;transport=tls",
        display_name="Alice & Bob",
        text="Incoming call",
        uuid="11111111-2222-3333-4444-555555555555",
        display_from_uri=shown,
    )


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_every_variable_is_substituted_and_escaped(
    setup: tuple[ExternalReceiver, str], method: str
) -> None:
    receiver, protocol = setup
    provider = ExternalProvider(receiver.url + TEMPLATE, method=method, protocol=protocol)
    result = await provider.send(call())
    await provider.aclose()
    assert result.outcome is Outcome.SENT and result.status == 200
    [got] = receiver.received
    assert got.method == method
    assert got.http_version == ("2" if protocol == "http2" else "1.1")
    assert "$" not in got.path
    q = {k: v[0] for k, v in got.query.items()}
    assert q == {
        "type": "fcm",
        "token": "tok/with space&amp",
        "app": "org.example.app",
        "name": "Alice & Bob",
        "from": "sip:alice@example.org;transport=tls",
        "tag": "",
        "to": "",
        "cid": "abc@host",
        "event": "call",
        "sound": "default",
        "msg": "IC_MSG",
        "uid": "11111111-2222-3333-4444-555555555555",
        "again": "tok/with space&amp",
    }
    if method == "POST":
        assert got.body == b"Incoming call"
        assert got.headers["content-type"].startswith("text/plain")
    else:
        assert got.body == b""


async def test_caller_identity_stays_on_the_server_unless_display_from_uri(
    setup: tuple[ExternalReceiver, str],
) -> None:
    """As on APNs, FCM and Web Push: $from-name and $from-uri are empty by default, and
    nothing else of the request names the caller."""
    receiver, protocol = setup
    provider = ExternalProvider(receiver.url + TEMPLATE, method="POST", protocol=protocol)
    result = await provider.send(call(shown=False))
    await provider.aclose()
    assert result.ok
    [got] = receiver.received
    q = {k: v[0] for k, v in got.query.items()}
    assert (q["name"], q["from"]) == ("", "")
    assert (q["cid"], q["event"], q["token"]) == ("abc@host", "call", "tok/with space&amp")
    raw = got.path.lower() + got.body.decode().lower()
    assert "alice" not in raw and "bob" not in raw


@pytest.mark.parametrize("status", [202, 204])
async def test_any_2xx_is_success(setup: tuple[ExternalReceiver, str], status: int) -> None:
    receiver, protocol = setup
    receiver.status = status
    provider = ExternalProvider(receiver.url + "/p/$token", protocol=protocol)
    assert (await provider.send(call("t1"))).ok
    await provider.aclose()


async def test_error_status_fails_with_it(setup: tuple[ExternalReceiver, str]) -> None:
    receiver, protocol = setup
    receiver.status = 500
    provider = ExternalProvider(receiver.url + "/p/$token", protocol=protocol)
    result = await provider.send(call("t1"))
    await provider.aclose()
    assert result.outcome is Outcome.FAILED and result.status == 500


async def test_unreachable_pusher_fails(setup: tuple[ExternalReceiver, str]) -> None:
    from tests.conftest import free_port

    _, protocol = setup
    provider = ExternalProvider(f"http://127.0.0.1:{free_port()}/$token", protocol=protocol)
    result = await provider.send(call("t1"))
    await provider.aclose()
    assert result.outcome is Outcome.FAILED and result.reason


def test_message_event_and_longest_names_win() -> None:
    values = dict.fromkeys(VARIABLES, "")
    values |= {"from-uri": "U", "from-name": "N", "type": "T", "token": "K"}
    assert expand("$from-uri|$from-name|$type|$token|$tokens", values) == "U|N|T|K|Ks"
    request = call()
    request.kind = PushKind.MESSAGE
    provider = ExternalProvider("https://push.example.org/?e=$event&m=$msgid")
    url, _, _ = provider.build(request)
    assert url == "https://push.example.org/?e=message&m=IM_MSG"


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="uri"):
        ExternalProvider("ftp://x/$token")
    with pytest.raises(ValueError, match="method"):
        ExternalProvider("http://x/$token", method="PUT")
    assert ExternalProvider("http://x/").accepts(Destination(Provider.APNS, "a", "b"))


async def test_aclose_lets_pushes_under_way_finish(setup: tuple[ExternalReceiver, str]) -> None:
    receiver, protocol = setup
    receiver.hold = asyncio.Event()
    provider = ExternalProvider(receiver.url + "/slow/$token", protocol=protocol)
    sending = asyncio.create_task(provider.send(call("t1")))
    await receiver.arrived.wait()  # the request reached the pusher and waits for its answer
    closing = asyncio.create_task(provider.aclose())
    receiver.hold.set()
    result = await sending
    await closing
    assert result.ok
