"""A REGISTER answered without a task (one Contact to store) gets what the general path gives.

Each scenario is played twice through ``on_register`` and real server transactions, with
``fast_answers`` on and off, on a fresh store: the answers on the wire and the binding
events, in their order with the answers, must be the same.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from sipwake.clock import FakeClock
from sipwake.proxy.registrar import BindingEvent, Registrar
from sipwake.sip.message import Request, Response, parse_message
from sipwake.sip.transaction import Address, DeliverRequest, ServerTransaction
from sipwake.store import Store, open_url
from sipwake.store.model import Binding, UpsertResult

from .router_helpers import DOMAIN, VOIP, FakeEndpoint, make_config

PORT = 6000
SOURCE = Address("UDP", "127.0.0.1", PORT)
#: min-expires 60: a Contact asking 5 s gets 423.
CONFIG = "[registrar]\nmin-expires = 60\n"


def register(
    n: int,
    contacts: list[str],
    *,
    user: str = "alice",
    call_id: str = "reg-1",
    cseq: int = 1,
    extra: str = "",
    domain: str = DOMAIN,
) -> Request:
    lines = [
        f"REGISTER sip:{domain} SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:{PORT};branch=z9hG4bKfast{n};rport",
        "Max-Forwards: 70",
        f"From: <sip:{user}@{domain}>;tag=f{n}",
        f"To: <sip:{user}@{domain}>",
        f"Call-ID: {call_id}",
        f"CSeq: {cseq} REGISTER",
        *[f"Contact: {c}" for c in contacts],
        *([extra] if extra else []),
        "Content-Length: 0",
        "",
        "",
    ]
    msg = parse_message("\r\n".join(lines).encode())
    assert isinstance(msg, Request)
    return msg


def ios(port: int, voip: str = "aa", remote: str = "bb", params: str = "") -> str:
    uri = f"sip:alice@127.0.0.1:{port};" + VOIP.format(voip=voip, remote=remote)
    return f"<{uri}>{params}"


# Each step: the REGISTERs received in one turn of the event loop.
SCENARIO: list[list[Request]] = [
    [register(1, [ios(7001)])],  # a first registration
    [register(2, [ios(7001)], cseq=2)],  # its refresh (the Contact value is known)
    [register(3, [ios(7002)], call_id="other", cseq=1)],  # same tokens: replaces
    [register(4, [ios(7002)], call_id="other", cseq=1)],  # stale CSeq: 500
    [register(5, [ios(7003, "cc", "dd", ";expires=5")], extra="Expires: 3600")],  # 423
    [register(6, ["<sip:alice@127.0.0.1:7004>"], extra="Require: foo")],  # 420
    [register(7, ["<sip:alice@127.0.0.1:7004>"], domain="elsewhere.org")],  # 404
    [register(8, ["<sip:alice@127.0.0.1:7004;pn-provider=nope;pn-prid=x>"])],  # 555
    [register(9, ["<sip:alice@127.0.0.1:7005;pn-provider=fcm>"])],  # capability query
    [register(10, ["<sip:alice@127.0.0.1:7006>", "<sip:alice@127.0.0.1:7007>"], cseq=3)],
    [register(11, ["<sip:alice@127.0.0.1:7006>;expires=0"], cseq=4)],  # removal
    [
        register(
            12,
            ['<sip:alice@127.0.0.1:7008;ob>;+sip.instance="<urn:uuid:1>";reg-id=1'],
            extra="Supported: path, outbound",
        )
    ],
    [register(13, ["<sip:alice@127.0.0.1:7009;pn-prid=x;pn-provider=fcm;pn-param=p>"])],
    [register(14, ["<sip:alice@127.0.0.1:7010>"], extra="Expires: 7200")],
    # In one turn: a removal of everything and a registration right after it.
    [
        register(15, ["*"], cseq=5, extra="Expires: 0"),
        register(16, ["<sip:alice@127.0.0.1:7011>"], call_id="after", cseq=1),
    ],
    [register(17, ["<sip:bob@127.0.0.1:7012>"], user="bob")],
    [register(18, ["sip:bob@127.0.0.1:7012;q=1.5"], user="bob", cseq=2)],  # bad q: 400
]


class _Bindings:
    """A binding store that yields to the loop first and returns no bindings with an upsert
    (as a store without them at hand would): the general end of the answer runs."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def upsert(self, binding: Binding, max_push_devices: int = 5) -> UpsertResult:
        await asyncio.sleep(0)
        result: UpsertResult = await self._inner.upsert(binding, max_push_devices)
        result.bindings = None
        return result


class _Store:
    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self.bindings = _Bindings(inner.bindings)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class _Endpoint(FakeEndpoint):
    def __init__(self, clock: FakeClock, log: list[tuple[object, ...]]) -> None:
        super().__init__(clock)
        self.log = log

    def send_response(self, txn: ServerTransaction, response: Response) -> None:
        self.log.append(("answer", response.to_bytes()))
        super().send_response(txn, response)


async def play(store: Store, fast: bool, plain_store: bool) -> list[tuple[object, ...]]:
    clock = FakeClock()
    log: list[tuple[object, ...]] = []
    endpoint = _Endpoint(clock, log)
    used: Any = store if plain_store else _Store(store)
    reg = Registrar(make_config(CONFIG), used, clock=clock)
    reg.fast_answers = fast

    def listener(event: BindingEvent) -> None:
        b = event.binding
        log.append(("event", event.kind, event.aor, b.key, b.contact_header, b.expires_at))

    reg.add_listener(listener)
    for turn in SCENARIO:
        for req in turn:
            actions = endpoint.layer.receive_request(req, SOURCE)
            (txn,) = [a.transaction for a in actions if isinstance(a, DeliverRequest)]
            assert txn is not None
            reg.on_register(endpoint, txn, req, SOURCE)  # type: ignore[arg-type]
        await reg.aclose()
        clock.advance(1.0)
    return log


async def fresh(tmp_path: Path, name: str) -> Store:
    folder = tmp_path / name
    folder.mkdir()
    return await open_url("", folder)


@pytest.mark.parametrize("plain_store", [True, False], ids=["sqlite", "yielding-no-bindings"])
async def test_fast_answers_match_the_general_path(tmp_path: Path, plain_store: bool) -> None:
    results: list[list[tuple[object, ...]]] = []
    for fast in (True, False):
        store = await fresh(tmp_path, f"{fast}")
        try:
            results.append(await play(store, fast, plain_store))
        finally:
            await store.close()
    fast_log, general_log = results
    assert fast_log == general_log
    answers = [parse_message(e[1]) for e in fast_log if e[0] == "answer"]  # type: ignore[arg-type]
    statuses = [a.status for a in answers if isinstance(a, Response)]
    assert statuses.count(200) >= 10 and {420, 404, 423, 555, 400, 500} <= set(statuses)
    # Every REGISTER's events come after its answer: the log never starts with one.
    assert fast_log[0][0] == "answer"


async def test_a_one_contact_register_is_answered_without_a_task(tmp_path: Path) -> None:
    store = await fresh(tmp_path, "s")
    try:
        clock = FakeClock()
        log: list[tuple[object, ...]] = []
        endpoint = _Endpoint(clock, log)
        reg = Registrar(make_config(CONFIG), store, clock=clock)
        seen: list[str] = []
        reg.add_listener(lambda e: seen.append(e.kind))
        req = register(1, [ios(7001)])
        actions = endpoint.layer.receive_request(req, SOURCE)
        (txn,) = [a.transaction for a in actions if isinstance(a, DeliverRequest)]
        before = len(asyncio.all_tasks())
        reg.on_register(endpoint, txn, req, SOURCE)  # type: ignore[arg-type]
        assert len(asyncio.all_tasks()) == before  # no task: a callback on the store call
        await reg.aclose()
        assert [e[0] for e in log] == ["answer"] and seen == ["added"]
    finally:
        await store.close()
