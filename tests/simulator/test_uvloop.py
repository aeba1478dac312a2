"""The simulators run on uvloop, the loop `sipwake serve` uses, not only on asyncio's own."""

from __future__ import annotations

from pathlib import Path

import uvloop

from sipwake.push.providers.apns import ApnsProvider, ApnsSettings
from sipwake.push.request import Destination, Outcome, Provider, PushKind, PushRequest, Service
from sipwake.simulator.apns import ApnsSimulator


def test_apns_simulator_answers_a_push_on_uvloop(tmp_path: Path) -> None:
    async def scenario() -> tuple[Outcome, int]:
        async with ApnsSimulator(tmp_path / "sim", apps=["org.example.app"]) as sim:
            provider = ApnsProvider(
                ApnsSettings(
                    key_file=str(sim.key_file),
                    key_id=sim.key_id,
                    team_id=sim.team_id,
                    server=sim.production_url,
                    ca_file=str(sim.ca_file),
                )
            )
            dest = Destination(Provider.APNS, "org.example.app", "ab" * 32, Service.VOIP)
            try:
                result = await provider.send(PushRequest(dest, PushKind.CALL, call_id="c1"))
            finally:
                await provider.aclose()
            return result.outcome, len(sim.received)

    assert uvloop.run(scenario()) == (Outcome.SENT, 1)
