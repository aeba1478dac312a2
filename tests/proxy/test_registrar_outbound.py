"""The registrar claims SIP Outbound (RFC 5626 §6) only for a REGISTER it gave outbound
processing: a phone that reads "outbound" in Supported starts keep-alives and relies on
its flow, so a claim the path cannot honour would cost it its calls."""

from __future__ import annotations

import pytest

from sipwake.clock import FakeClock
from sipwake.store import Store
from tests.proxy.test_registrar import SOURCE, clock, make_registrar, register

__all__ = ["clock"]  # a fixture, shared (store: tests/proxy/conftest.py)

INSTANCE = '+sip.instance="<urn:uuid:00000000-0000-0000-0000-0000000000aa>"'
PROXY_VIA = "Via: SIP/2.0/UDP edge.example.org;branch=z9hG4bK-edge"


@pytest.mark.parametrize(
    ("contact", "extra", "outbound"),
    [
        # An instance and a reg-id, straight from the phone: outbound processing.
        (f"<sip:alice@10.0.0.1>;{INSTANCE};reg-id=1", "", True),
        # No reg-id (RFC 5627 instance only) or no instance: plain RFC 3261.
        (f"<sip:alice@10.0.0.1>;{INSTANCE}", "", False),
        ("<sip:alice@10.0.0.1>;reg-id=1", "", False),
        ("<sip:alice@10.0.0.1>", "", False),
        # Through an edge proxy that says it does outbound (ob in its Path URI).
        (
            f"<sip:alice@10.0.0.1>;{INSTANCE};reg-id=1",
            f"{PROXY_VIA}\r\nPath: <sip:edge.example.org;lr;ob>\r\nSupported: path, outbound",
            True,
        ),
        # Through an edge proxy without ob, or one that adds no Path: the flow does not
        # end here, so keep-alives to us would not keep it.
        (
            f"<sip:alice@10.0.0.1>;{INSTANCE};reg-id=1",
            f"{PROXY_VIA}\r\nPath: <sip:edge.example.org;lr>\r\nSupported: path, outbound",
            False,
        ),
        (f"<sip:alice@10.0.0.1>;{INSTANCE};reg-id=1", PROXY_VIA, False),
    ],
    ids=["direct", "no-reg-id", "no-instance", "plain", "path-ob", "path-no-ob", "no-path"],
)
async def test_outbound_is_claimed_only_for_outbound_registrations(
    store: Store, clock: FakeClock, contact: str, extra: str, outbound: bool
) -> None:
    reg, _ = make_registrar(store, clock)
    response = await reg.handle_register(register([contact], extra=extra), SOURCE)
    assert response.status == 200
    tags = {t.strip() for t in (response.headers.get("Supported") or "").split(",")}
    assert "path" in tags
    assert ("outbound" in tags) is outbound
