"""Fixtures: the APNs simulator as upstream and a real sipwake HTTP server in-process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sipwake.config import Config, parse_config
from sipwake.server import Server
from sipwake.simulator.apns import ApnsSimulator

APP = "org.example.app"
OTHER = "org.example.other"
TOKEN = "a1" * 32
TOKEN2 = "b2" * 32
DEAD = "dead" * 16


def toml_value(value: Any) -> str:
    return json.dumps(value)


@dataclass
class Api:
    """A running server and a client session bound to it."""

    server: Server
    session: aiohttp.ClientSession
    base: str
    config: Config

    async def post(self, path: str, body: Any = None, **kw: Any) -> tuple[int, Any, Any]:
        async with self.session.post(self.base + path, json=body, **kw) as resp:
            text = await resp.text()
            data = json.loads(text) if resp.content_type == "application/json" else text
            return resp.status, data, resp.headers

    async def request(self, method: str, path: str, **kw: Any) -> tuple[int, Any, Any]:
        async with self.session.request(method, self.base + path, **kw) as resp:
            text = await resp.text()
            data = json.loads(text) if resp.content_type == "application/json" else text
            return resp.status, data, resp.headers


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[ApnsSimulator]:
    simulator = ApnsSimulator(tmp_path / "sim", apps=(APP, OTHER))
    await simulator.start()
    simulator.set_tokens(unregistered=[DEAD])
    yield simulator
    await simulator.stop()


def base_config(sim: ApnsSimulator, tmp_path: Path) -> dict[str, Any]:
    """Server on a free port, no SIP, the simulator as APNs, one configured iOS 13 app."""
    return {
        "server": {"data-dir": str(tmp_path / "data")},
        "sip": {"listen": []},
        "http": {"listen": "127.0.0.1:0"},
        "push": {
            "ca-file": str(sim.ca_file),
            "apple": {"server": sim.production_url, "dev-server": sim.sandbox_url},
        },
        "apps": {
            APP: {
                "provider": "apns",
                "key-file": str(sim.key_file),
                "key-id": sim.key_id,
                "team-id": sim.team_id,
                "app-ids": [APP + ".voip"],
            }
        },
    }


StartApi = Callable[..., Awaitable[Api]]


@pytest.fixture
async def start_api(sim: ApnsSimulator, tmp_path: Path) -> AsyncIterator[StartApi]:
    """Start servers with the base config updated by ``http=…``/``apps=…`` overrides."""
    running: list[Api] = []

    async def start(**sections: Any) -> Api:
        data = base_config(sim, tmp_path)
        for name, value in sections.items():
            if isinstance(value, dict) and isinstance(data.get(name), dict):
                data[name] = {**data[name], **value}
            else:
                data[name] = value
        config = parse_config(data)
        config.source = tmp_path / "sipwake.toml"
        server = Server(config)
        await server.start()
        session = aiohttp.ClientSession()
        api = Api(server, session, f"http://127.0.0.1:{server.http_port}", config)
        running.append(api)
        return api

    yield start
    for api in running:
        await api.session.close()
        await api.server.stop()


@pytest.fixture
async def api(start_api: StartApi) -> Api:
    return await start_api()
