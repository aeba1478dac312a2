"""Every example of docs/http-api.md runs against a real server and answers as shown."""

from __future__ import annotations

import asyncio
import json
import re
import tomllib
from pathlib import Path
from typing import Any

from sipwake.config import parse_config
from sipwake.simulator.apns import ApnsSimulator

from .conftest import TOKEN2, Api, StartApi

DOC = Path(__file__).resolve().parents[2] / "docs" / "http-api.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
WILD = "…"


def blocks() -> list[tuple[str, str]]:
    return [(m[1], m[2]) for m in FENCE.finditer(DOC.read_text())]


def matches(shown: Any, real: Any) -> bool:
    """``real`` has the shape and values ``shown``, where "…" stands for any value."""
    if shown == WILD or (shown == [WILD] and isinstance(real, list)):
        return True
    if isinstance(shown, dict):
        return (
            isinstance(real, dict)
            and shown.keys() == real.keys()
            and all(matches(v, real[k]) for k, v in shown.items())
        )
    if isinstance(shown, list):
        return (
            isinstance(real, list)
            and len(shown) == len(real)
            and all(matches(a, b) for a, b in zip(shown, real, strict=True))
        )
    return bool(shown == real)


async def shell(command: str, cwd: Path) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_shell(
        command, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


def test_the_config_example_is_valid() -> None:
    [toml] = [text for lang, text in blocks() if lang == "toml"]
    config = parse_config(tomllib.loads(toml))
    assert config.http.api_keys == ["change-me"]
    assert config.apps["org.example.app"].app_ids == ["org.example.app.voip"]


async def test_curl_examples_answer_as_shown(
    start_api: StartApi, sim: ApnsSimulator, tmp_path: Path
) -> None:
    api = await start_api(http={"api-keys": ["change-me"]})
    (tmp_path / "ios-token.json").write_text(
        json.dumps(
            {
                "type": "ios-token",
                "alias": "prod",
                "private_key": sim.key_file.read_text(),
                "key_id": sim.key_id,
                "team_id": sim.team_id,
            }
        )
    )
    items = blocks()
    ran = 0
    credential_id = ""
    for i, (lang, text) in enumerate(items):
        if lang != "sh":
            continue
        command = text.replace("http://127.0.0.1:8080", api.base)
        command = command.replace("CREDENTIAL_ID", credential_id)
        status, out = await shell(command, tmp_path)
        assert status == 0, (text, out)
        ran += 1
        if i + 1 < len(items) and items[i + 1][0] == "json":
            shown = json.loads(items[i + 1][1])
            real = json.loads(out)
            assert matches(shown, real), (text, real)
            data = real.get("data") if isinstance(real, dict) else None
            if isinstance(data, dict) and data.get("record_type") == "push_credential":
                credential_id = real["data"]["id"]
        elif "/metrics" in text:
            assert "sipwake_pushes_total{" in out
    assert ran >= 9
    # The app created by the examples works at once for its PushKit AppId.
    status, data, _ = await api.post(
        "/pnm2/send",
        {
            "verb": "NotifyIncomingCall",
            "AppId": "org.example.other.voip",
            "DeviceToken": TOKEN2,
            "Selector": "s",
        },
    )
    assert data["code"] == 200
    assert sim.received[-1].topic == "org.example.other.voip"


async def test_opensips_and_kamailio_bodies_are_accepted(api: Api, sim: ApnsSimulator) -> None:
    samples = {
        "$var(pn_provider)": "apns",
        "$var(pn_param)": f"{sim.team_id}.org.example.app.voip",
        "$var(pn_prid)": TOKEN2,
        "$param(callid)": "c-1",
        "$ci": "c-1",
        "$fu": "sip:alice@example.org",
    }
    bodies = []
    for lang, text in blocks():
        if lang:
            continue
        for line in text.splitlines():
            if "notifications" in line:
                literal = line[line.index('"') + 1 : line.rindex('"')]
                body = literal.replace('\\"', '"')
                for var, value in samples.items():
                    body = body.replace(var, value)
                assert "$" not in body, body
                bodies.append(json.loads(body))
    assert len(bodies) == 2
    for body in bodies:
        headers = {"Authorization": "Bearer change-me"}
        status, data, _ = await api.post("/v1/push", body, headers=headers)
        assert status == 200
        assert data["results"] == [{"status": "sent", "id": data["results"][0]["id"]}]
    assert [p.push_type for p in sim.received] == ["voip", "voip"]
