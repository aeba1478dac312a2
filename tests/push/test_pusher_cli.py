"""`sipwake push` as an operator runs it, against the APNs simulator on 127.0.0.1."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sipwake.cli import build_parser
from sipwake.simulator.apns import ApnsSimulator

BUNDLE = "org.example.app"
TOKENS = [f"{i:02x}" * 32 for i in range(1, 4)]


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[ApnsSimulator]:
    simulator = ApnsSimulator(tmp_path / "sim", apps=[BUNDLE])
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.stop()


async def push(*args: str) -> tuple[int, list[str], str]:
    """Run ``sipwake push`` as a process; return status, stdout lines and stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sipwake",
        "push",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode().splitlines(), err.decode()


def token_auth(sim: ApnsSimulator) -> list[str]:
    return [
        "--apns-key-file", str(sim.key_file),
        "--apns-key-id", sim.key_id,
        "--apns-team-id", sim.team_id,
        "--ca-file", str(sim.ca_file),
    ]  # fmt: skip


async def test_pushkit_with_token_auth_reaches_sandbox(sim: ApnsSimulator) -> None:
    status, out, err = await push(
        "--pn-provider", "apns.dev",
        "--pn-param", f"{sim.team_id}.{BUNDLE}.voip",
        "--pn-prid", TOKENS[0],
        "--apple-push-type", "PushKit",
        "--call-id", "call-1@example.org",
        "--from-uri", "sip:alice@example.org",
        "--apns-url", sim.sandbox_url,
        *token_auth(sim),
    )  # fmt: skip
    assert (status, err) == (0, "")
    assert out[-1] == "1 push notification(s) sent, 1 successfully and 0 failed."
    [rec] = sim.received
    assert rec.environment == "development"
    assert (rec.topic, rec.push_type, rec.priority) == (f"{BUNDLE}.voip", "voip", 10)
    assert rec.auth == "token"
    assert rec.payload["call-id"] == "call-1@example.org"
    assert rec.payload["from-uri"] == "sip:alice@example.org"


async def test_rejected_token_fails_the_run_and_shows_only_a_prefix(sim: ApnsSimulator) -> None:
    sim.set_tokens(unregistered=[TOKENS[1]])
    status, out, _ = await push(
        "--pn-provider", "apns",
        "--pn-param", f"{sim.team_id}.{BUNDLE}",
        "--pn-prid", TOKENS[0], TOKENS[1],
        "--pn-prid", TOKENS[2],
        "--apple-push-type", "RemoteBasic",
        "--text", "hello",
        "--apns-url", sim.production_url,
        *token_auth(sim),
    )  # fmt: skip
    assert status == 1
    assert out[-1] == "3 push notification(s) sent, 2 successfully and 1 failed."
    [failure] = out[:-1]
    assert "token rejected" in failure and "Unregistered" in failure
    assert TOKENS[1][:8] in failure and TOKENS[1] not in failure
    assert sorted(r.token for r in sim.received) == sorted([TOKENS[0], TOKENS[2]])
    assert {r.push_type for r in sim.received} == {"alert"}


async def test_certificate_dir_background_push(sim: ApnsSimulator) -> None:
    cert_dir = sim.client_cert_file(BUNDLE, "production").parent
    status, out, err = await push(
        "--pn-provider", "apns",
        "--pn-param", BUNDLE,
        "--pn-prid", TOKENS[0],
        "--apple-push-type", "Background",
        "--apns-cert-dir", str(cert_dir),
        "--apns-url", sim.production_url,
        "--ca-file", str(sim.ca_file),
    )  # fmt: skip
    assert (status, err) == (0, ""), out
    [rec] = sim.received
    assert (rec.auth, rec.push_type, rec.priority) == ("certificate", "background", 5)
    assert rec.payload["aps"] == {"content-available": 1}


async def test_single_certificate_file_and_debug_lines(sim: ApnsSimulator) -> None:
    cert = sim.client_cert_file(BUNDLE, "development", voip=True)
    status, out, _ = await push(
        "--pn-provider", "apns.dev",
        "--pn-param", f"{BUNDLE}.voip",
        "--pn-prid", TOKENS[0],
        "--apns-cert-file", str(cert),
        "--apns-url", sim.sandbox_url,
        "--ca-file", str(sim.ca_file),
        "--debug",
    )  # fmt: skip
    assert status == 0
    assert out[0].startswith(f"apns.dev {TOKENS[0][:8]}…: sent (id ")
    assert sim.received[0].certificate_uid == f"{BUNDLE}.voip"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--apns-key-file", "/nonexistent.p8", "--apns-key-id", "K", "--apns-team-id", "T"],
         "--apns-key-file: "),
        (["--apns-key-id", "K"], "--apns-key-file: "),
        (["--apns-cert-file", "/nonexistent.pem"], "--apns-cert-file: "),
        (["--apns-cert-dir", "/nonexistent"], "--apns-cert-dir: "),
        (["--custom-payload", "{nope"], "--custom-payload: not valid JSON"),
        (["--custom-payload", "[1]"], "--custom-payload: expected a JSON object"),
        (["--ttl", "-1"], "--ttl: must not be negative"),
        ([], "--apns-key-file: no APNs credentials"),
        (["--config", "/nonexistent.toml"], "--config: "),
    ],
)  # fmt: skip
async def test_bad_flags_give_one_line_naming_the_flag(extra: list[str], message: str) -> None:
    status, out, err = await push(
        "--pn-provider", "apns", "--pn-param", BUNDLE, "--pn-prid", TOKENS[0], *extra
    )
    assert status == 2
    assert out == []
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sipwake push: error: " + message), lines[0]
    assert "Traceback" not in err


async def test_bad_choice_and_malformed_prid_name_the_flag() -> None:
    status, _, err = await push("--pn-provider", "gcm", "--pn-prid", "x")
    assert status == 2 and "--pn-provider" in err and len(err.strip().splitlines()) == 1
    status, _, err = await push(
        "--pn-provider", "apns", "--pn-param", BUNDLE, "--pn-prid", "a:voip&b:remote"
    )
    assert status == 2 and err.startswith("sipwake push: error: --pn-")


def test_tens_of_thousands_of_tokens_parse() -> None:
    tokens = [f"{i:064x}" for i in range(30_000)]
    args = build_parser().parse_args(
        ["push", "--pn-provider", "apns", "--pn-prid", *tokens[:20_000], "--pn-prid",
         *tokens[20_000:]]
    )  # fmt: skip
    assert args.pn_prid == tokens
