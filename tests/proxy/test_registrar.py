"""Registrar: RFC 3261 §10.3, RFC 5626 instances, RFC 3327 Path, RFC 8599 push, on SQLite."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from sipwake.clock import FakeClock
from sipwake.config import Config, parse_config
from sipwake.proxy.registrar import BindingEvent, Registrar, normalize_aor
from sipwake.push.request import (
    Destination,
    Outcome,
    Provider,
    PushKind,
    PushRequest,
    PushResult,
)
from sipwake.push.service import PushService
from sipwake.sip.message import Request, Response, parse_message
from sipwake.sip.transaction import Address
from sipwake.store import Store

SOURCE = Address("UDP", "127.0.0.1", 5062)
IOS = (
    "pn-provider=apns.dev;pn-param=TEAM123456.org.example.app.voip%26remote;"
    "pn-prid=AAA:voip%26BBB:remote"
)
ANDROID = "pn-provider=fcm;pn-param=my-project;pn-prid=tok-{n}"

_cseq = itertools.count(1)


def register(
    contacts: list[str],
    user: str = "alice",
    expires: int | None = None,
    call_id: str = "reg-1",
    extra: str = "",
) -> Request:
    lines = [
        "REGISTER sip:example.org SIP/2.0",
        f"Via: SIP/2.0/UDP 127.0.0.1:5062;branch=z9hG4bK{next(_cseq)}x;rport",
        "Max-Forwards: 70",
        f"From: <sip:{user}@example.org>;tag=1",
        f"To: <sip:{user}@example.org>",
        f"Call-ID: {call_id}",
        f"CSeq: {next(_cseq)} REGISTER",
        *[f"Contact: {c}" for c in contacts],
    ]
    if expires is not None:
        lines.append(f"Expires: {expires}")
    if extra:
        lines.append(extra)
    lines += ["Content-Length: 0", "", ""]
    msg = parse_message("\r\n".join(lines).encode())
    assert isinstance(msg, Request)
    return msg


class Recorder:
    def __init__(self) -> None:
        self.pushes: list[PushRequest] = []
        self.reject: set[str] = set()
        self.name = "rec"

    def accepts(self, destination: Destination) -> bool:
        return True

    async def send(self, request: PushRequest) -> PushResult:
        self.pushes.append(request)
        if request.destination.token in self.reject:
            return PushResult(Outcome.TOKEN_REJECTED, "Unregistered", status=410)
        return PushResult(Outcome.SENT)

    async def aclose(self) -> None:
        pass


def make_config(extra: str = "") -> Config:
    import tomllib

    text = '[sip]\ndomains = ["example.org"]\n[registrar]\nmin-expires = 60\n' + extra
    return parse_config(tomllib.loads(text))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_registrar(
    store: Store, clock: FakeClock, extra: str = "", push: PushService | None = None
) -> tuple[Registrar, list[BindingEvent]]:
    reg = Registrar(make_config(extra), store, clock=clock, push=push)
    events: list[BindingEvent] = []
    reg.add_listener(events.append)
    return reg, events


def contact_expires(response: Response) -> dict[str, int]:
    out = {}
    for c in response.contacts:
        out[c.uri.to_string()] = int(c.params["expires"] or "-1")
    return out


async def test_add_refresh_and_remove_a_binding(store: Store, clock: FakeClock) -> None:
    reg, events = make_registrar(store, clock)
    r = await reg.handle_register(register(["<sip:alice@10.0.0.1:5062>"], expires=600), SOURCE)
    assert r.status == 200
    assert contact_expires(r) == {"sip:alice@10.0.0.1:5062": 600}
    assert [e.kind for e in events] == ["added"]
    assert events[0].aor == "sip:alice@example.org"

    clock.advance(100)
    r = await reg.handle_register(register(["<sip:alice@10.0.0.1:5062>"], expires=300), SOURCE)
    assert contact_expires(r) == {"sip:alice@10.0.0.1:5062": 300}
    assert [e.kind for e in events] == ["added", "refreshed"]

    r = await reg.handle_register(
        register(["<sip:alice@10.0.0.1:5062>;expires=0"], expires=300), SOURCE
    )
    assert r.status == 200 and r.contacts == []
    assert events[-1].kind == "removed"
    assert await reg.lookup("sip:alice@example.org") == []


async def test_query_lists_bindings_and_default_and_max_expires(
    store: Store, clock: FakeClock
) -> None:
    reg, _ = make_registrar(store, clock, "max-expires = 7200\ndefault-expires = 3600\n")
    await reg.handle_register(register(["<sip:alice@10.0.0.1:1>"]), SOURCE)
    r = await reg.handle_register(register(["<sip:alice@10.0.0.2:2>;expires=99999"]), SOURCE)
    assert contact_expires(r) == {"sip:alice@10.0.0.1:1": 3600, "sip:alice@10.0.0.2:2": 7200}
    r = await reg.handle_register(register([]), SOURCE)  # a query changes nothing
    assert r.status == 200 and len(r.contacts) == 2


async def test_too_brief_gets_423_with_min_expires(store: Store, clock: FakeClock) -> None:
    reg, events = make_registrar(store, clock)
    r = await reg.handle_register(register(["<sip:alice@10.0.0.1>"], expires=10), SOURCE)
    assert r.status == 423
    assert r.headers.get("min-expires") == "60"
    assert events == []


async def test_wildcard_removes_all_and_needs_expires_zero(store: Store, clock: FakeClock) -> None:
    reg, events = make_registrar(store, clock)
    for n in (1, 2):
        await reg.handle_register(register([f"<sip:alice@10.0.0.{n}>"]), SOURCE)
    r = await reg.handle_register(register(["*"], expires=60), SOURCE)
    assert r.status == 400
    r = await reg.handle_register(register(["*"], expires=0), SOURCE)
    assert r.status == 200
    assert [e.kind for e in events].count("removed") == 2
    assert await reg.lookup("sip:alice@example.org") == []


async def test_foreign_domain_is_404_and_stale_cseq_500(store: Store, clock: FakeClock) -> None:
    reg, _ = make_registrar(store, clock)
    req = register(["<sip:alice@10.0.0.1>"])
    req.headers.set("To", "<sip:alice@elsewhere.net>")
    assert (await reg.handle_register(req, SOURCE)).status == 404
    first = register(["<sip:alice@10.0.0.1>"], call_id="same")
    assert (await reg.handle_register(first, SOURCE)).status == 200
    again = register(["<sip:alice@10.0.0.1>"], call_id="same")
    again.headers.set("CSeq", "1 REGISTER")
    r = await reg.handle_register(again, SOURCE)
    assert r.status == 500 and r.headers.get("retry-after")


async def test_require_unknown_option_is_420(store: Store, clock: FakeClock) -> None:
    reg, _ = make_registrar(store, clock)
    r = await reg.handle_register(register(["<sip:a@10.0.0.1>"], extra="Require: foo"), SOURCE)
    assert r.status == 420 and r.headers.get("unsupported") == "foo"


async def test_push_binding_keeps_params_and_feature_caps(store: Store, clock: FakeClock) -> None:
    reg, events = make_registrar(store, clock, "[push]\nregister-wakeup-interval = 10\n")
    r = await reg.handle_register(register([f"<sip:alice@10.0.0.1:5062;{IOS}>"]), SOURCE)
    assert r.status == 200
    # Pushed past 50 % of 3600 s, checked every 600 s: at least 1200 s before expiry.
    assert r.headers.get_all("feature-caps") == ['*;+sip.pns="apns.dev";+sip.pnsreg="1200"']
    (b,) = await reg.lookup("sip:alice@example.org")
    assert b.push is not None and b.push["pn-provider"] == "apns.dev"
    assert b.push_tokens == ("apns.dev", ("AAA", "BBB"))
    assert events[0].binding.push_key == b.push_key


async def test_capability_query_and_unsupported_provider(store: Store, clock: FakeClock) -> None:
    reg, _ = make_registrar(store, clock)
    r = await reg.handle_register(register(["<sip:alice@10.0.0.1;pn-provider=fcm>"]), SOURCE)
    assert r.status == 200
    assert r.headers.get_all("feature-caps") == ['*;+sip.pns="fcm"']
    (b,) = await reg.lookup("sip:alice@example.org")
    assert b.push is None  # a query: the device cannot be woken yet
    for provider in ("acme", "webpush"):  # webpush: no VAPID key configured
        r = await reg.handle_register(
            register([f"<sip:alice@10.0.0.1;pn-provider={provider};pn-prid=x>"]), SOURCE
        )
        assert (r.status, r.reason) == (555, "Push Notification Service Not Supported")


async def test_bad_push_params_are_400_naming_the_param(store: Store, clock: FakeClock) -> None:
    reg, _ = make_registrar(store, clock)
    r = await reg.handle_register(
        register(["<sip:alice@10.0.0.1;pn-provider=apns;pn-prid=A:voip>"]), SOURCE
    )
    assert r.status == 400 and "pn-param" in r.reason


async def test_same_token_from_another_contact_replaces(store: Store, clock: FakeClock) -> None:
    reg, events = make_registrar(store, clock)
    await reg.handle_register(register([f"<sip:alice@10.0.0.1:5062;{IOS}>"]), SOURCE)
    clock.advance(1)
    r = await reg.handle_register(
        register([f"<sip:alice@10.0.0.1:6000;{IOS}>"]), Address("UDP", "127.0.0.1", 6000)
    )
    assert list(contact_expires(r)) == [f"sip:alice@10.0.0.1:6000;{IOS}"]
    assert [e.kind for e in events] == ["added", "replaced", "added"]
    (b,) = await reg.lookup("sip:alice@example.org")
    assert reg.target(b).address == Address("UDP", "127.0.0.1", 6000)


async def test_sixth_push_device_evicts_least_recently_registered(
    store: Store, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO")
    reg, events = make_registrar(store, clock)
    for n in range(6):
        contact = f"<sip:alice@10.0.0.{n}:5062;{ANDROID.format(n=n)}>"
        await reg.handle_register(register([contact]), SOURCE)
        clock.advance(1)
        if n == 2:  # device 0 registers again: device 1 becomes the oldest
            c0 = f"<sip:alice@10.0.0.0:5062;{ANDROID.format(n=0)}>"
            await reg.handle_register(register([c0]), SOURCE)
    evicted = [e for e in events if e.kind == "evicted"]
    assert [e.binding.contact.split(";")[0] for e in evicted] == ["sip:alice@10.0.0.1:5062"]
    assert len(await reg.lookup("sip:alice@example.org")) == 5
    assert "evicted" in caplog.text and "tok-1" not in caplog.text  # tokens are secrets


async def test_instance_reg_id_from_new_contact_is_a_refresh(
    store: Store, clock: FakeClock
) -> None:
    reg, events = make_registrar(store, clock)
    inst = '+sip.instance="<urn:uuid:00000000-0000-0000-0000-000000000001>";reg-id=1'
    await reg.handle_register(register([f"<sip:alice@10.0.0.1:1000>;{inst}"]), SOURCE)
    await reg.handle_register(register([f"<sip:alice@10.0.0.1:2000>;{inst}"]), SOURCE)
    assert [e.kind for e in events] == ["added", "refreshed"]
    (b,) = await reg.lookup("sip:alice@example.org")
    assert b.contact == "sip:alice@10.0.0.1:2000"
    assert b.instance_id == "<urn:uuid:00000000-0000-0000-0000-000000000001>"


async def test_path_is_stored_echoed_and_routed(store: Store, clock: FakeClock) -> None:
    reg, _ = make_registrar(store, clock)
    req = register(
        ["<sip:alice@192.168.1.5:5062;transport=tcp>"],
        extra="Path: <sip:edge.example.org;lr>\r\nSupported: path",
    )
    edge = Address("TCP", "127.0.0.1", 40000)
    r = await reg.handle_register(req, edge)
    assert r.headers.get_all("path") == ["<sip:edge.example.org;lr>"]
    (b,) = await reg.lookup("sip:alice@example.org")
    target = reg.target(b)
    assert target.route == ["<sip:edge.example.org;lr>"]
    assert target.request_uri == "sip:alice@192.168.1.5:5062;transport=tcp"
    assert target.address == edge  # the flow the REGISTER came on


async def test_bindings_expire_on_the_clock(store: Store, clock: FakeClock) -> None:
    reg, events = make_registrar(store, clock)
    await reg.handle_register(register(["<sip:alice@10.0.0.1>"], expires=60), SOURCE)
    clock.advance(59)
    assert await reg.expire_due() == []
    clock.advance(2)
    expired = await reg.expire_due()
    assert [b.contact for b in expired] == ["sip:alice@10.0.0.1"]
    assert events[-1].kind == "expired"
    assert await reg.lookup("sip:alice@example.org") == []


async def test_wakeup_push_past_threshold_once(store: Store, clock: FakeClock) -> None:
    rec = Recorder()
    push = PushService([rec])
    reg, _ = make_registrar(
        store,
        clock,
        "[push]\nregister-wakeup-interval = 10\nregister-wakeup-threshold = 50\n",
        push,
    )
    await reg.handle_register(register([f"<sip:alice@10.0.0.1;{IOS}>"], expires=1000), SOURCE)
    await reg.handle_register(register(["<sip:bob@10.0.0.2>"], user="bob"), SOURCE)
    clock.advance(400)
    assert await reg.send_wakeups() == []
    clock.advance(200)
    results = await reg.send_wakeups()
    assert [r.outcome for r in results] == [Outcome.SENT]
    (p,) = rec.pushes
    assert p.kind is PushKind.BACKGROUND and p.destination.token == "BBB"  # remote token
    assert await reg.send_wakeups() == []  # once per registration


async def test_rejected_token_removes_the_binding(
    store: Store, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder()
    rec.reject.add("BBB")
    push = PushService([rec])
    reg, events = make_registrar(store, clock, "[push]\nregister-wakeup-interval = 1\n", push)
    await reg.handle_register(register([f"<sip:alice@10.0.0.1;{IOS}>"], expires=100), SOURCE)
    clock.advance(60)
    await reg.send_wakeups()
    await reg.aclose()  # waits for the removal the rejection started
    assert await reg.lookup("sip:alice@example.org") == []
    assert events[-1].kind == "removed"
    assert reg.stats["dead_tokens"] == 1
    assert "rejected token B…" in caplog.text and "BBB" not in caplog.text
    rejected = await store.rejected_tokens.get(Provider.APNS_DEV.value, "BBB")
    assert rejected is not None and rejected.token_prefix.startswith("B")


def test_normalize_aor() -> None:
    assert normalize_aor("sips:Alice@Example.ORG:5061;transport=tls") == "sip:Alice@example.org"
    assert normalize_aor("sip:example.org") == "sip:example.org"
    with pytest.raises(ValueError):
        normalize_aor("tel:+123")


async def test_webpush_feature_caps_carry_the_vapid_public_key(
    store: Store, clock: FakeClock, tmp_path: Path
) -> None:
    import base64

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    pem = tmp_path / "vapid.pem"
    pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    reg, _ = make_registrar(
        store,
        clock,
        f'[push.webpush]\nvapid-private-key = "{pem}"\nvapid-subject = "mailto:a@b.c"\n',
    )
    r = await reg.handle_register(register(["<sip:alice@10.0.0.1;pn-provider=webpush>"]), SOURCE)
    public = key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    expected = base64.urlsafe_b64encode(public).rstrip(b"=").decode()
    assert r.headers.get_all("feature-caps") == [f'*;+sip.pns="webpush";+sip.vapid="{expected}"']


async def test_path_list_on_one_line_keeps_every_hop(store: Store, clock: FakeClock) -> None:
    reg, _ = make_registrar(store, clock)
    req = register(
        ["<sip:alice@192.168.1.5:5062>"],
        extra="Path: <sip:edge1.example.org;lr>, <sip:edge2.example.org;lr>",
    )
    await reg.handle_register(req, SOURCE)
    (b,) = await reg.lookup("sip:alice@example.org")
    assert reg.target(b).route == ["<sip:edge1.example.org;lr>", "<sip:edge2.example.org;lr>"]


async def test_too_many_contacts_in_one_register_is_refused(store: Store, clock: FakeClock) -> None:
    reg, events = make_registrar(store, clock)
    contacts = [f"<sip:alice@10.0.0.{n}>" for n in range(21)]
    r = await reg.handle_register(register(contacts), SOURCE)
    assert r.status == 403 and events == []


@pytest.mark.parametrize(
    ("contact", "status"),
    [
        ("<sip:alice@10.0.0.1>;expires=abc", 400),
        ("<sip:alice@10.0.0.1>;q=high", 400),
        ("<sip:alice@10.0.0.1>;q=nan", 400),  # would be stored as a number that is none
        ("<sip:alice@10.0.0.1>;q=1.5", 400),
        ("<sip:alice@10.0.0.1>;q=0.7", 200),
        ("<sip:alice@10.0.0.1;pn-provider=apns;pn-param=T.a;pn-prid=%C3>", 400),  # not UTF-8
        ('<sip:alice@10.0.0.1>;+sip.instance="<urn:uuid:1>";reg-id=x', 400),
        ("<sip:alice@10.0.0.1>;reg-id=1", 200),  # reg-id without an instance is ignored
        ("<sip:alice@10.0.0.1>;expires=99999999999", 200),  # clamped to max-expires
        ("<tel:+15551234>", 400),
        ("<sip:alice@10.0.0.1;pn-provider=apns;pn-param=T.a;pn-prid=%zz>", 400),
        ("<sip:alice@10.0.0.1;pn-provider=fcm;pn-prid=tok>", 400),  # no project
        ("<sip:alice@10.0.0.1;pn-type=firebase;app-id=p;pn-tok=t>", 200),  # legacy params
    ],
)
async def test_odd_contacts_get_a_precise_answer(
    store: Store, clock: FakeClock, contact: str, status: int
) -> None:
    reg, _ = make_registrar(store, clock)
    r = await reg.handle_register(register([contact]), SOURCE)
    assert r.status == status, r.reason
    if status == 400:
        assert "(" in r.reason  # the reason names what is wrong


async def test_no_pnsreg_when_the_wakeup_cannot_come_before_expiry(
    store: Store, clock: FakeClock
) -> None:
    reg, _ = make_registrar(store, clock, "[push]\nregister-wakeup-interval = 60\n")
    r = await reg.handle_register(register([f"<sip:alice@10.0.0.1:5062;{IOS}>"]), SOURCE)
    assert r.headers.get_all("feature-caps") == ['*;+sip.pns="apns.dev"']
