"""Shared set-up for the FCM, Web Push and external-pusher tests."""

from __future__ import annotations

from sipwake.clock import FakeClock
from sipwake.push.request import Destination, Provider, PushKind, PushRequest


class FakeSleep:
    """Stands in for asyncio.sleep: records the delay and moves the fake clock instead."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        self.clock.advance(delay)


def fcm_request(
    project: str = "sipwake-test", token: str = "fcm-token-0001", **kw: object
) -> PushRequest:
    return PushRequest(
        destination=Destination(Provider.FCM, project, token),
        kind=kw.pop("kind", PushKind.CALL),  # type: ignore[arg-type]
        call_id=str(kw.pop("call_id", "call-1@example.org")),
        from_uri=str(kw.pop("from_uri", "sip:alice@example.org")),
        display_name=str(kw.pop("display_name", "Alice")),
        display_from_uri=bool(kw.pop("display_from_uri", True)),
        **kw,  # type: ignore[arg-type]
    )
