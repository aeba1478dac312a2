"""``/openapi.json`` matches the handlers: real responses validate against it, and a
schema-driven fuzzer (schemathesis) finds no 5xx and no undocumented response."""

from __future__ import annotations

import asyncio
import copy
import shutil
import sys
from typing import Any

import jsonschema
import pytest

from .conftest import APP, DEAD, TOKEN, Api, StartApi


def _nullable(schema: Any) -> Any:
    """OpenAPI 3.0 ``nullable`` as JSON Schema's type list."""
    if isinstance(schema, dict):
        out = {k: _nullable(v) for k, v in schema.items() if k != "nullable"}
        if schema.get("nullable") and "type" in schema:
            out["type"] = [schema["type"], "null"]
        return out
    if isinstance(schema, list):
        return [_nullable(v) for v in schema]
    return schema


def check(doc: dict[str, Any], path: str, method: str, status: int, body: Any) -> None:
    """Validate one real response against the document (fails on undocumented statuses)."""
    responses = doc["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path} {status} is not documented"
    schema = responses[str(status)]["content"]["application/json"]["schema"]
    full = _nullable({**copy.deepcopy(schema), "components": doc["components"]})
    jsonschema.validate(body, full)


async def test_responses_match_the_document(api: Api) -> None:
    status, doc, _ = await api.request("GET", "/openapi.json")
    assert status == 200 and doc["openapi"].startswith("3.")
    text = {"verb": "NotifyTextMessage", "AppId": APP, "DeviceToken": TOKEN, "Selector": "s"}
    calls: list[tuple[str, str, dict[str, Any]]] = [
        ("/pnm2/send", "post", {"json": text}),
        ("/pnm2/send", "post", {"json": {**text, "DeviceToken": DEAD}}),
        ("/pnm2/send", "post", {"data": b"[", "headers": {"Content-Type": "application/json"}}),
        ("/pnm2/multisend", "post", {"json": [text, None]}),
        ("/pnm2", "post", {"data": text}),
        ("/pnm2", "post", {"data": {**text, "DeviceToken": DEAD}}),
        ("/v1/push", "post", {"json": {"notifications": [{"app_id": APP, "token": TOKEN,
                                                          "type": "call"}]}}),
        ("/v1/push", "post", {"json": {"notifications": 1}}),
        ("/v1/push-credentials", "post", {"json": {"type": "ios-token"}}),
        ("/v1/push-credentials", "get", {}),
        ("/v1/push-credentials/{id}", "get", {}),
        ("/v1/push-credentials/{id}", "delete", {}),
        ("/v1/apps", "post", {"json": {"name": "n", "provider": "fcm", "app_ids": ["x"]}}),
        ("/v1/apps", "get", {}),
        ("/v1/apps/{id}", "get", {}),
        ("/health", "get", {}),
        ("/openapi.json", "get", {}),
    ]  # fmt: skip
    for path, method, kw in calls:
        status, body, _ = await api.request(method, path.replace("{id}", "nope"), **kw)
        check(doc, path, method, status, body)
    status, body, _ = await api.request("GET", "/v1/apps")
    app_id = body["data"][0]["id"]
    status, body, _ = await api.request("PATCH", f"/v1/apps/{app_id}", json={"name": "m"})
    check(doc, "/v1/apps/{id}", "patch", status, body)
    status, body, _ = await api.request("DELETE", f"/v1/apps/{app_id}")
    check(doc, "/v1/apps/{id}", "delete", status, body)


@pytest.mark.skipif(shutil.which("schemathesis") is None, reason="schemathesis not installed")
async def test_schemathesis_finds_no_server_error(start_api: StartApi) -> None:
    api = await start_api(http={"api-keys": ["fuzz-key"]})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "schemathesis.cli", "run", f"{api.base}/openapi.json",
        "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_schema_conformance",
        "--max-examples", "10", "--seed", "1", "--workers", "1", "--no-color",
        "--phases", "examples,coverage,fuzzing",
        "-H", "Authorization: Bearer fuzz-key",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    async with asyncio.timeout(240):
        out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()[-6000:]
