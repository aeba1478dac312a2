"""``sipwake simulate`` as a process, and the admin endpoint users' staging drives."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sipwake.simulator.admin import AdminServer, add_apns_routes
from sipwake.simulator.apns import ApnsSimulator, sign_provider_token
from sipwake.simulator.tls import Pki, load_private_key
from tests.conftest import free_port, wait_http_ok

from .h2client import H2Client

TOKEN = "c3" * 32
GONE = "d4" * 32
APP = "org.example.app"
BODY = json.dumps({"aps": {"alert": "hello"}}).encode()


def simulate(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "sipwake", "simulate", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def wait_state(state_dir: Path, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Poll for state.json (the readiness signal), then for the admin /health."""
    path = state_dir / "state.json"
    end = time.monotonic() + 20
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > end:
            out = proc.stdout.read().decode() if proc.stdout else ""
            raise AssertionError(f"no state.json; exit {proc.poll()}: {out}")
        time.sleep(0.05)  # polling a readiness file, not synchronising on time
    state: dict[str, Any] = json.loads(path.read_text())
    wait_http_ok(state["admin_url"] + "/health", proc)
    return state


def check_files(state: dict[str, Any]) -> None:
    apns = state["apns"]
    assert Path(state["ca_file"]).is_file()
    assert Path(apns["key_file"]).name == f"AuthKey_{apns['key_id']}.p8"
    assert Path(apns["key_file"]).is_file()
    assert (Path(apns["cert_dir"]) / f"{APP}.voip.dev.pem").is_file()


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "sim"


async def test_cli_serves_records_and_stops_on_sigterm(state_dir: Path) -> None:
    proc = simulate("--state-dir", str(state_dir), "--app", APP, "--reject-token", GONE)
    try:
        state = wait_state(state_dir, proc)
        apns = state["apns"]
        assert state["pid"] == proc.pid
        check_files(state)
        assert apns["apps"] == [APP]
        assert apns["production_url"] != apns["sandbox_url"]

        key = load_private_key(Path(apns["key_file"]))
        jwt = sign_provider_token(key, apns["key_id"], apns["team_id"], time.time())
        ctx = Pki(state_dir).client_context()
        client = await H2Client.connect(apns["production_url"], ctx)
        hdrs = [("authorization", f"bearer {jwt}"), ("apns-topic", APP)]
        hdrs.append(("apns-push-type", "alert"))
        try:
            ok = await client.request("POST", f"/3/device/{TOKEN}", hdrs, BODY)
            gone = await client.request("POST", f"/3/device/{GONE}", hdrs, BODY)
        finally:
            await client.close()
        assert ok.status == 200
        assert (gone.status, gone.json()["reason"]) == (410, "Unregistered")

        async with aiohttp.ClientSession() as http:
            r = await http.get(state["admin_url"] + "/apns/pushes")
            pushes = await r.json()
        assert [(p["token"], p["environment"], p["topic"]) for p in pushes] == [
            (TOKEN, "production", APP)
        ]
        assert pushes[0]["apns_id"] == ok.headers["apns-id"]
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=20)[0].decode()
    assert proc.returncode == 0, out
    assert not (state_dir / "state.json").exists()
    lines = [line for line in out.splitlines() if " apns production " in line]
    assert len(lines) == 2
    assert " 200 c3c3c3c3" in lines[0] and f"topic={APP}" in lines[0]
    assert " 410 Unregistered d4d4d4d4" in lines[1]
    assert TOKEN not in out and GONE not in out  # tokens are secrets: prefixes only


def test_cli_bad_token_flag_is_named(state_dir: Path) -> None:
    proc = simulate("--state-dir", str(state_dir), "--bad-token", "xyz")
    out = proc.communicate(timeout=20)[0].decode()
    assert proc.returncode == 2
    assert "--bad-token" in out and "Traceback" not in out


def test_cli_unusable_state_dir_is_named(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    proc = simulate("--state-dir", str(not_a_dir))
    out = proc.communicate(timeout=20)[0].decode()
    assert proc.returncode == 2
    assert "--state-dir" in out and "Traceback" not in out


def test_cli_busy_port_is_named(state_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = simulate("--state-dir", str(state_dir), "--apns-dev-port", str(port))
        out = proc.communicate(timeout=20)[0].decode()
    assert proc.returncode == 2
    assert "--apns-dev-port" in out and "Traceback" not in out
    assert not (state_dir / "state.json").exists()


# -- admin endpoint, in process ----------------------------------------------------------------


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[tuple[ApnsSimulator, str]]:
    sim = ApnsSimulator(tmp_path)
    server = AdminServer(port=free_port())
    add_apns_routes(server.app, sim)
    await sim.start()
    await server.start()
    yield sim, server.url
    await server.stop()
    await sim.stop()


async def test_admin_tokens_and_faults_change_answers(
    admin: tuple[ApnsSimulator, str],
) -> None:
    sim, url = admin
    async with aiohttp.ClientSession() as http:
        r = await http.post(url + "/apns/tokens", json={"bad": [TOKEN], "dev": [GONE]})
        assert r.status == 200
        assert (await r.json())["development"] == [GONE]
        r = await http.post(url + "/apns/faults", json={"fail_first": 1, "retry_after": 2})
        assert (await r.json())["fail_first"] == 1

        client = await H2Client.connect(sim.production_url, sim.pki.client_context())
        hdrs = [("authorization", f"bearer {sim.provider_token()}"), ("apns-topic", APP)]
        try:
            first = await client.request("POST", f"/3/device/{'e5' * 32}", hdrs, BODY)
            bad = await client.request("POST", f"/3/device/{TOKEN}", hdrs, BODY)
            wrong_env = await client.request("POST", f"/3/device/{GONE}", hdrs, BODY)
            ok = await client.request("POST", f"/3/device/{'e5' * 32}", hdrs, BODY)
        finally:
            await client.close()
        assert (first.status, first.headers["retry-after"]) == (503, "2")
        assert (bad.status, bad.json()["reason"]) == (400, "BadDeviceToken")
        assert (wrong_env.status, wrong_env.json()["reason"]) == (400, "BadDeviceToken")
        assert ok.status == 200

        r = await http.get(url + "/apns/pushes", params={"token": "e5" * 32})
        assert len(await r.json()) == 1
        r = await http.get(url + "/apns/pushes", params={"limit": "x"})
        assert r.status == 400 and "limit" in (await r.json())["error"]
        r = await http.delete(url + "/apns/pushes")
        assert await r.json() == {"deleted": 1}
        assert sim.received == []


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("/apns/faults", {"fail_frist": 1}, "fail_frist"),
        ("/apns/faults", {"fail_status": 500}, "fail_status"),
        ("/apns/faults", {"goaway_after": -1}, "goaway_after"),
        ("/apns/faults", {"delay": "slow"}, "delay"),
        ("/apns/tokens", {"bad": "not-a-list-item", "oops": 1}, "oops"),
        ("/apns/tokens", {"bad": [1]}, "bad"),
        ("/apns/tokens", [1], "JSON object"),
        ("/apns/faults", "[" * 5000, "not JSON"),
    ],
)
async def test_admin_rejects_bad_input_naming_the_field(
    admin: tuple[ApnsSimulator, str], path: str, body: Any, needle: str
) -> None:
    _, url = admin
    async with aiohttp.ClientSession() as http:
        if isinstance(body, str):
            r = await http.post(url + path, data=body)
        else:
            r = await http.post(url + path, json=body)
        assert r.status == 400
        assert needle in (await r.json())["error"]
