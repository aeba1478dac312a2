"""``sipwake push`` for FCM (v1 and legacy), Web Push and the external pusher, against
``sipwake simulate`` running as a process."""

from __future__ import annotations

import json
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sipwake.cli import main
from tests.simulator.test_simulate_cli import simulate, wait_state


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    state_dir = tmp_path_factory.mktemp("sim")
    proc = simulate("--state-dir", str(state_dir), "--quiet")
    try:
        yield wait_state(state_dir, proc)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def admin(state: dict[str, Any], path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        state["admin_url"] + path, data=data, method="POST" if data else "GET"
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def push(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["push", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def fcm_args(sim: dict[str, Any], *tokens: str, flag: str = "--key") -> list[str]:
    fcm = sim["fcm"]
    return ["--pn-provider", "fcm", "--pn-param", fcm["project"], "--pn-prid", *tokens,
            flag, fcm["service_account"], "--fcm-url", fcm["url"], "--ca-file", sim["ca_file"],
            "--call-id", "cli-call", "--from-uri", "sip:carol@example.org"]  # fmt: skip


def test_fcm_v1_push_with_key_alias(
    sim: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    admin(sim, "/fcm/tokens", {"unregistered": ["cli-gone"]})
    code, out, _ = push(capsys, *fcm_args(sim, "cli-a", "cli-b", "cli-gone"))
    assert code == 1
    assert out.splitlines()[-1] == "3 push notification(s) sent, 2 successfully and 1 failed."
    assert "token rejected: UNREGISTERED" in out
    assert "cli-gone" not in out  # tokens are secrets: only a prefix is printed
    sent = [m for m in admin(sim, "/fcm/messages")["v1"] if m["token"] in ("cli-a", "cli-b")]
    assert len(sent) == 2
    assert sent[0]["android"]["data"]["call-id"] == "cli-call"
    assert sent[0]["android"]["priority"] == "high"
    code, out, _ = push(capsys, *fcm_args(sim, "cli-c", flag="--fcm-service-account"))
    assert code == 0
    assert out.splitlines()[-1] == "1 push notification(s) sent, 1 successfully and 0 failed."


def test_tokens_and_values_that_begin_with_a_dash(
    sim: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """FCM tokens are base64url and now and then begin with "-": argparse alone would
    read one as a flag and refuse the command."""
    tokens = ["-dash-a:APA91b", "plain-b", "-dash-c"]
    argv = [*fcm_args(sim, *tokens), "--call-id", "-call"]
    code, out, err = push(capsys, *argv)
    assert code == 0, out + err
    assert out.splitlines()[-1] == "3 push notification(s) sent, 3 successfully and 0 failed."
    sent = [m for m in admin(sim, "/fcm/messages")["v1"] if m["token"] in tokens]
    assert sorted(m["token"] for m in sent) == sorted(tokens)
    assert {m["android"]["data"]["call-id"] for m in sent} == {"-call"}
    # A flag still needs its value: a real flag after it is not taken for one.
    with pytest.raises(SystemExit) as exit_:
        push(capsys, "--pn-provider", "fcm", "--pn-prid", "--debug")
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "argument --pn-prid: expected" in err, err


def test_fcm_legacy_api_key(sim: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    key = admin(sim, "/fcm/legacy-keys", {"project": "424242"})["key"]
    argv = ["--pn-provider", "fcm", "--pn-param", "424242", "--pn-prid", "leg-1",
            "--fcm-api-key", key, "--fcm-url", sim["fcm"]["url"],
            "--ca-file", sim["ca_file"]]  # fmt: skip
    code, out, _ = push(capsys, *argv)
    assert code == 0, out
    legacy = admin(sim, "/fcm/messages")["legacy"]
    assert [m["to"] for m in legacy] == ["leg-1"] and legacy[0]["project"] == "424242"
    argv[argv.index(key)] = "AAAAwrong"
    code, out, _ = push(capsys, *argv)
    assert code == 1 and "401" in out


def test_webpush_with_and_without_encryption(
    sim: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    wp = sim["webpush"]
    sub = admin(sim, "/webpush/subscriptions", {"application_server_key": wp["vapid_public_key"]})
    base = ["--pn-provider", "webpush", "--pn-prid", sub["endpoint"], "--vapid-key",
            wp["vapid_private_key"], "--vapid-subject", "mailto:ops@example.org",
            "--ca-file", sim["ca_file"], "--call-id", "wp-call"]  # fmt: skip
    code, out, _ = push(capsys, *base)
    assert code == 0, out
    code, out, _ = push(
        capsys,
        *base,
        "--webpush-p256dh",
        sub["keys"]["p256dh"],
        # base64url may start with "-": the "=" form keeps argparse from reading a flag
        f"--webpush-auth={sub['keys']['auth']}",
    )
    assert code == 0, out
    pushes = admin(sim, "/webpush/pushes")
    assert pushes[0]["payload"] is None
    assert json.loads(pushes[1]["payload"])["call-id"] == "wp-call"
    assert pushes[1]["urgency"] == "high"  # PushKit (call) is the default push type


def test_external_pusher_from_config_takes_precedence(
    sim: dict[str, Any], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = tmp_path / "ext.toml"
    config.write_text(
        f'[push.external]\nuri = "{sim["external"]["h2c_url"]}/ext?tok=$token&cid=$call-id"\n'
        'method = "POST"\nprotocol = "http2"\n'
    )
    code, out, _ = push(capsys, "--pn-provider", "fcm", "--pn-param", "any-project",
                        "--pn-prid", "ext-1", "--call-id", "c/1", "--text", "hello there",
                        "--config", str(config))  # fmt: skip
    assert code == 0, out
    got = [r for r in admin(sim, "/external/requests") if r["path"].startswith("/ext")]
    assert got[-1]["query"] == {"tok": ["ext-1"], "cid": ["c/1"]}
    assert got[-1]["body"] == "hello there" and got[-1]["http_version"] == "2"


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--pn-provider", "fcm", "--pn-param", "p", "--pn-prid", "t",
          "--key", "/nonexistent.json"], "--fcm-service-account"),
        (["--pn-provider", "fcm", "--pn-param", "p", "--pn-prid", "t"], "--fcm-service-account"),
        (["--pn-provider", "webpush", "--pn-prid", "https://127.0.0.1:1/push/x"], "--vapid-key"),
        (["--pn-provider", "webpush", "--pn-prid", "https://127.0.0.1:1/push/x",
          "--vapid-key", "/nonexistent.pem", "--vapid-subject", "mailto:a@b"], "--vapid-key"),
        (["--pn-provider", "webpush", "--pn-prid", "https://127.0.0.1:1/push/x",
          "--webpush-p256dh", "AAAA"], "--webpush-auth"),
    ],
)  # fmt: skip
def test_bad_flags_name_the_flag(
    argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = push(capsys, *argv)
    assert code == 2
    assert err.startswith(f"sipwake push: error: {flag}:"), err
    assert "Traceback" not in err + out
