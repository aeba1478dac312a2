"""The TOML configuration: defaults, types and precise errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from sipwake.config import ConfigError, load_config, parse_config


def test_defaults_serve_loopback() -> None:
    cfg = load_config(None)
    assert cfg.sip.listen == ["udp://127.0.0.1:5060", "tcp://127.0.0.1:5060"]
    assert cfg.http.listen == "127.0.0.1:8080"
    assert cfg.registrar.max_push_devices == 5
    assert cfg.router.fork_late is True


def test_sections_and_nested_push_sections(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        '[push]\ntimeout = 0\n[push.apple]\nkey-id = "ABC"\n'
        '[push.firebase.service-accounts]\n"1234" = "sa.json"\n'
        '[apps."org.example"]\nprovider = "apns"\nbundle-id = "org.example"\n'
    )
    cfg = load_config(path)
    assert cfg.push.timeout == 0
    assert cfg.apple.key_id == "ABC"
    assert cfg.firebase.service_accounts == {"1234": "sa.json"}
    assert cfg.apps["org.example"].provider == "apns"
    assert cfg.resolve_path("sa.json") == tmp_path.resolve() / "sa.json"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"registrar": {"max-expire": 3}}, "[registrar] max-expire: unknown key"),
        ({"nope": {}}, "[nope]: unknown section"),
        ({"push": {"nope": {}}}, "[push.nope]: unknown section"),
        ({"push": {"timeout": "5"}}, "[push] timeout: expected an integer"),
        ({"router": {"fork-late": 1}}, "[router] fork-late: expected true or false"),
        ({"sip": {"listen": "udp://x:1"}}, "[sip] listen: expected a list of strings"),
        ({"registrar": {"min-expires": 10, "max-expires": 5}}, "min-expires"),
        ({"apps": {"x": {"provider": "gcm"}}}, '[apps."x"] provider'),
        ({"push": {"retransmission-count": -1}}, "must not be negative"),
    ],
)
def test_errors_name_the_key(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(data)
    assert message in str(exc.value)


def test_unreadable_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[push\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_per_address_connection_limit_reaches_the_transport() -> None:
    from sipwake.server import make_sip_endpoint

    endpoint = make_sip_endpoint(parse_config({"sip": {"max-connections-per-ip": 3}}))
    assert endpoint.transports.config.max_connections_per_ip == 3
    with pytest.raises(ConfigError, match=r"\[sip\] max-connections-per-ip: must be at least 1"):
        parse_config({"sip": {"max-connections-per-ip": 0}})
