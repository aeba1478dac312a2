"""Digest authentication: challenges, MD5 and SHA-256, stale nonces, owners only."""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sipwake.clock import FakeClock
from sipwake.config import parse_config
from sipwake.proxy.auth import Authenticator, digest_response, parse_digest
from sipwake.proxy.registrar import Registrar
from sipwake.sip.message import Request, Response
from sipwake.store import Store, open_url
from tests.proxy.test_registrar import SOURCE, register

CONFIG = """
[sip]
domains = ["example.org"]
[auth]
enabled = true
users = { alice = "s3cret", bob = "hunter2" }
"""


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    s = await open_url("", tmp_path)
    yield s
    await s.close()


def setup(store: Store) -> tuple[Registrar, Authenticator, FakeClock]:
    clock = FakeClock()
    config = parse_config(tomllib.loads(CONFIG))
    auth = Authenticator(config, clock=clock)
    return Registrar(config, store, clock=clock, auth=auth), auth, clock


def answer(
    request: Request,
    challenge: Response,
    user: str,
    password: str,
    algorithm: str = "SHA-256",
) -> Request:
    """Add credentials computed like a client would, for the challenge of ``algorithm``."""
    values = [parse_digest(v) for v in challenge.headers.get_all("www-authenticate")]
    (params,) = [p for p in values if p is not None and p["algorithm"] == algorithm]
    uri = "sip:example.org"
    response = digest_response(
        algorithm, user, params["realm"], password, "REGISTER", uri, params["nonce"],
        "00000001", "abc", "auth",
    )  # fmt: skip
    request.headers.set(
        "Authorization",
        f'Digest username="{user}", realm="{params["realm"]}", nonce="{params["nonce"]}", '
        f'uri="{uri}", response="{response}", algorithm={algorithm}, qop=auth, '
        'nc=00000001, cnonce="abc"',
    )
    return request


async def test_unauthenticated_register_is_challenged_sha256_first(store: Store) -> None:
    reg, _, _ = setup(store)
    r = await reg.handle_register(register(["<sip:alice@10.0.0.1>"]), SOURCE)
    assert r.status == 401
    algs = [parse_digest(v) for v in r.headers.get_all("www-authenticate")]
    assert [a["algorithm"] for a in algs if a] == ["SHA-256", "MD5"]
    assert all(a and a["realm"] == "example.org" and a["qop"] == "auth" for a in algs)
    assert await reg.lookup("sip:alice@example.org") == []


@pytest.mark.parametrize("algorithm", ["SHA-256", "MD5"])
async def test_right_password_registers(store: Store, algorithm: str) -> None:
    reg, _, _ = setup(store)
    challenge = await reg.handle_register(register(["<sip:alice@10.0.0.1>"]), SOURCE)
    req = answer(register(["<sip:alice@10.0.0.1>"]), challenge, "alice", "s3cret", algorithm)
    r = await reg.handle_register(req, SOURCE)
    assert r.status == 200
    assert len(await reg.lookup("sip:alice@example.org")) == 1


async def test_wrong_password_is_refused(store: Store) -> None:
    reg, _, _ = setup(store)
    challenge = await reg.handle_register(register(["<sip:alice@10.0.0.1>"]), SOURCE)
    req = answer(register(["<sip:alice@10.0.0.1>"]), challenge, "alice", "guess")
    r = await reg.handle_register(req, SOURCE)
    assert r.status == 403
    assert await reg.lookup("sip:alice@example.org") == []


async def test_another_users_credentials_cannot_register_alice(store: Store) -> None:
    reg, _, _ = setup(store)
    challenge = await reg.handle_register(register(["<sip:alice@10.0.0.1>"]), SOURCE)
    req = answer(register(["<sip:evil@10.6.6.6>"]), challenge, "bob", "hunter2")
    r = await reg.handle_register(req, SOURCE)
    assert r.status == 403
    assert await reg.lookup("sip:alice@example.org") == []


async def test_expired_nonce_is_stale_and_forged_nonce_rechallenged(store: Store) -> None:
    reg, auth, clock = setup(store)
    challenge = await reg.handle_register(register(["<sip:alice@10.0.0.1>"]), SOURCE)
    clock.advance(auth.nonce_lifetime + 1)
    req = answer(register(["<sip:alice@10.0.0.1>"]), challenge, "alice", "s3cret")
    r = await reg.handle_register(req, SOURCE)
    assert r.status == 401 and "stale=true" in (r.headers.get("www-authenticate") or "")

    other = Authenticator(parse_config(tomllib.loads(CONFIG)), clock=clock)  # another key
    forged = answer(
        register(["<sip:alice@10.0.0.1>"]), other.challenge(req, "www"), "alice", "s3cret"
    )
    r = await reg.handle_register(forged, SOURCE)
    assert r.status == 401 and "stale" not in (r.headers.get("www-authenticate") or "")


async def test_replayed_credentials_for_another_method_fail(store: Store) -> None:
    reg, auth, _ = setup(store)
    challenge = await reg.handle_register(register(["<sip:alice@10.0.0.1>"]), SOURCE)
    req = answer(register(["<sip:alice@10.0.0.1>"]), challenge, "alice", "s3cret")
    req.method = "INVITE"
    assert auth.check(req, "www") != "alice"


async def test_captured_credentials_cannot_be_replayed(store: Store) -> None:
    reg, _, _ = setup(store)
    challenge = await reg.handle_register(register(["<sip:alice@10.0.0.1>"]), SOURCE)
    first = answer(register(["<sip:alice@10.0.0.1>"]), challenge, "alice", "s3cret")
    stolen = first.headers.get("authorization") or ""
    assert (await reg.handle_register(first, SOURCE)).status == 200
    # The same Authorization on a REGISTER pointing alice's calls elsewhere.
    attack = register(["<sip:alice@203.0.113.66>"])
    attack.headers.set("Authorization", stolen)
    r = await reg.handle_register(attack, SOURCE)
    assert r.status == 401
    contacts = [b.contact for b in await reg.lookup("sip:alice@example.org")]
    assert contacts == ["sip:alice@10.0.0.1"]
    # The owner goes on with the next nonce-count on the same nonce.
    again = answer(register(["<sip:alice@10.0.0.1>"]), challenge, "alice", "s3cret")
    nc2 = (again.headers.get("authorization") or "").replace("00000001", "00000002")
    params = parse_digest(nc2)
    assert params is not None
    uri, nonce, realm = params["uri"], params["nonce"], params["realm"]
    digest = digest_response(
        "SHA-256", "alice", realm, "s3cret", "REGISTER", uri, nonce, "00000002", "abc", "auth"
    )
    again.headers.set("Authorization", nc2.replace(params["response"], digest))
    assert (await reg.handle_register(again, SOURCE)).status == 200
