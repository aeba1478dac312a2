"""The OpenAPI 3.0 document served at ``/openapi.json``, written by hand next to the handlers.

Tests validate real responses against it and run a schema-driven fuzzer over it, so a
handler that drifts from this description fails the build.
"""

from __future__ import annotations

from typing import Any

from sipwake import __version__
from sipwake.api.app import json_response
from sipwake.api.httpd import Request, Response


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERRORS = {
    "400": _json(_ref("Errors"), "Malformed request; the detail says what is wrong."),
    "401": _json(_ref("Errors"), "Missing or invalid API key."),
    "413": _json(_ref("Errors"), "Request body too large."),
    "429": _json(_ref("Errors"), "Rate limit exceeded; see Retry-After."),
}
PNM2_ERRORS = {
    "400": _json(_ref("Pnm2Reply"), "Not a JSON POST, or invalid JSON."),
    "401": _json(_ref("Pnm2Reply"), "Missing or invalid API key (when [http] pnm2-auth)."),
    "413": _json(_ref("Pnm2Reply"), "Request body too large."),
    "429": _json(_ref("Pnm2Reply"), "Rate limit exceeded; see Retry-After."),
}

PAGING = [
    {"name": "page[number]", "in": "query", "schema": {"type": "integer", "minimum": 1}},
    {
        "name": "page[size]",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": 250},
    },
]
ID = [{"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}]

ACROBITS_PUSH = {
    "type": "object",
    "required": ["verb", "AppId", "DeviceToken"],
    "properties": {
        "verb": {
            "type": "string",
            "enum": [
                "NotifyTextMessage",
                "NotifyGenericTextMessage",
                "NotifyReprovision",
                "NotifyIncomingCall",
            ],
        },
        "AppId": {"type": "string"},
        "DeviceToken": {"type": "string"},
        "Selector": {"type": "string"},
        "Message": {"type": "string"},
        "Badge": {"type": "integer", "minimum": 0},
        "Sound": {"type": "string"},
        "UserName": {"type": "string"},
        "UserDisplayName": {"type": "string"},
        "ContentType": {"type": "string"},
        "Id": {"type": "string"},
        "ThreadId": {"type": "string"},
        "CallId": {"type": "string"},
    },
}

SCHEMAS: dict[str, Any] = {
    "Errors": {
        "type": "object",
        "required": ["errors"],
        "properties": {
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["code", "title", "detail"],
                    "properties": {
                        "code": {"type": "string"},
                        "title": {"type": "string"},
                        "detail": {"type": "string"},
                    },
                },
            }
        },
    },
    "Pnm2Reply": {
        "type": "object",
        "required": ["code", "response"],
        "properties": {
            "code": {"type": "integer", "enum": [200, 400, 401, 404, 413, 429, 500]},
            "response": {"type": "string"},
        },
    },
    "AcrobitsPush": ACROBITS_PUSH,
    "Notification": {
        "type": "object",
        "required": ["type"],
        "properties": {
            "provider": {"type": "string", "enum": ["apns", "apns.dev", "fcm", "webpush"]},
            "param": {"type": "string", "description": "RFC 8599 pn-param"},
            "prid": {"type": "string", "description": "RFC 8599 pn-prid (device token)"},
            "app_id": {"type": "string", "description": "An AppId known to sipwake"},
            "token": {"type": "string", "description": "Device token (with app_id)"},
            "type": {
                "type": "string",
                "enum": ["call", "message", "background", "cancel"],
                "description": "Only call may go to an iOS PushKit (VoIP) token",
            },
            "caller": {"type": "string"},
            "caller_name": {"type": "string"},
            "call_id": {"type": "string"},
            "text": {"type": "string"},
            "cancel_reason": {
                "type": "string",
                "enum": ["missed", "answered-elsewhere", "declined-elsewhere"],
            },
            "ttl": {"type": "integer", "minimum": 0, "maximum": 2419200},
            "custom_payload": {"type": "object"},
            "p256dh": {
                "type": "string",
                "description": "Web Push only, with auth: the subscription's public key "
                "(base64url, as PushSubscription.toJSON() gives it); the push then carries "
                "its data encrypted (RFC 8291), and later pushes to the subscription too",
            },
            "auth": {
                "type": "string",
                "description": "Web Push only, with p256dh: the subscription's auth secret",
            },
        },
    },
    "PushResult": {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {"type": "string", "enum": ["sent", "failed", "token-rejected"]},
            "id": {"type": "string"},
            "reason": {"type": "string"},
        },
    },
    "Credential": {
        "type": "object",
        "required": ["id", "alias", "type", "record_type"],
        "properties": {
            "id": {"type": "string"},
            "alias": {"type": "string"},
            "type": {"type": "string", "enum": ["ios", "ios-token", "android", "webpush"]},
            "key_id": {"type": "string"},
            "team_id": {"type": "string"},
            "bundle_id": {"type": "string"},
            "project_id": {"type": "string"},
            "cert_subject": {"type": "string"},
            "cert_expires_at": {"type": "number", "nullable": True},
            "created_at": {"type": "number"},
            "updated_at": {"type": "number"},
            "record_type": {"type": "string", "enum": ["push_credential"]},
        },
    },
    "NewCredential": {
        "type": "object",
        "required": ["type"],
        "description": (
            "ios: certificate + private_key (PEM); ios-token: private_key (.p8), key_id, "
            "team_id; android: project_account_json_file (service-account JSON); "
            "webpush: private_key (VAPID P-256 PEM) + subject"
        ),
        "properties": {
            "type": {"type": "string", "enum": ["ios", "ios-token", "android", "webpush"]},
            "alias": {"type": "string"},
            "bundle_id": {"type": "string"},
            "certificate": {"type": "string"},
            "private_key": {"type": "string"},
            "key_id": {"type": "string"},
            "team_id": {"type": "string"},
            "project_account_json_file": {"oneOf": [{"type": "object"}, {"type": "string"}]},
            "subject": {"type": "string"},
        },
    },
    "App": {
        "type": "object",
        "required": ["id", "name", "provider", "app_ids", "credential_ids", "record_type"],
        "properties": {
            "id": {"type": "string"},
            "name": {"type": "string"},
            "provider": {"type": "string"},
            "app_ids": {"type": "array", "items": {"type": "string"}},
            "credential_ids": {"type": "array", "items": {"type": "string"}},
            "created_at": {"type": "number"},
            "updated_at": {"type": "number"},
            "record_type": {"type": "string", "enum": ["push_app"]},
        },
    },
    "NewApp": {
        "type": "object",
        "required": ["name", "provider", "app_ids"],
        "properties": {
            "name": {"type": "string"},
            "provider": {"type": "string", "enum": ["apns", "apns.dev", "fcm", "webpush"]},
            "app_ids": {"type": "array", "items": {"type": "string"}},
            "credential_ids": {"type": "array", "items": {"type": "string"}},
        },
    },
    "AppUpdate": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "app_ids": {"type": "array", "items": {"type": "string"}},
            "credential_ids": {"type": "array", "items": {"type": "string"}},
        },
    },
    "Meta": {
        "type": "object",
        "required": ["page_number", "page_size", "total_pages", "total_results"],
        "properties": {
            "page_number": {"type": "integer"},
            "page_size": {"type": "integer"},
            "total_pages": {"type": "integer"},
            "total_results": {"type": "integer"},
        },
    },
}


def _data(name: str, description: str) -> dict[str, Any]:
    schema = {"type": "object", "required": ["data"], "properties": {"data": _ref(name)}}
    return _json(schema, description)


def _list(name: str, description: str) -> dict[str, Any]:
    schema = {
        "type": "object",
        "required": ["data", "meta"],
        "properties": {"data": {"type": "array", "items": _ref(name)}, "meta": _ref("Meta")},
    }
    return _json(schema, description)


def _body(name: str) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(name)}}}


NOT_FOUND = {"404": _json(_ref("Errors"), "No such record.")}
NO_STORE = {"503": _json(_ref("Errors"), "No store configured.")}
BEARER: list[dict[str, list[str]]] = [{"bearer": []}]


def _pnm2_op(summary: str, body: dict[str, Any], ok: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": {"200": ok, **PNM2_ERRORS},
    }


def document() -> dict[str, Any]:
    """The OpenAPI document describing every endpoint of the HTTP API."""
    pnm2_reply = _json(_ref("Pnm2Reply"), "Outcome: code 200 sent, 400, 404 token rejected, 500")
    multi_body = {"oneOf": [{"type": "array", "items": _ref("AcrobitsPush")}, _ref("AcrobitsPush")]}
    multi_ok = _json({"type": "array", "items": _ref("Pnm2Reply")}, "One reply per element")
    form_schema = {k: v for k, v in ACROBITS_PUSH.items() if k != "properties"}
    form_schema["properties"] = {
        k: ({"type": "string"} if k != "Badge" else {"type": "integer", "minimum": 0})
        for k in ACROBITS_PUSH["properties"]
    }
    form_responses = {
        "200": _json(_ref("Pnm2Reply"), "Sent"),
        "404": _json(_ref("Pnm2Reply"), "Token rejected"),
        "500": _json(_ref("Pnm2Reply"), "Provider failure"),
        **PNM2_ERRORS,
    }
    batch = {
        "type": "object",
        "required": ["notifications"],
        "properties": {"notifications": {"type": "array", "items": _ref("Notification")}},
    }
    batch_ok = {
        "type": "object",
        "required": ["results", "summary"],
        "properties": {
            "results": {"type": "array", "items": _ref("PushResult")},
            "summary": {
                "type": "object",
                "properties": {
                    "sent": {"type": "integer"},
                    "failed": {"type": "integer"},
                    "token-rejected": {"type": "integer"},
                },
            },
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "sipwake HTTP API",
            "version": __version__,
            "description": "Acrobits-compatible /pnm2 gateway, native /v1 push API, push "
            "credentials and apps, and operational endpoints.",
        },
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/pnm2/send": {
                "post": _pnm2_op("Send one Acrobits push", _ref("AcrobitsPush"), pnm2_reply)
            },
            "/pnm2/multisend": {
                "post": _pnm2_op("Send a list of Acrobits pushes", multi_body, multi_ok)
            },
            "/pnm2": {
                "post": {
                    "summary": "Legacy form API (the reply's code is the HTTP status)",
                    "requestBody": {
                        "required": True,
                        "content": {"application/x-www-form-urlencoded": {"schema": form_schema}},
                    },
                    "responses": form_responses,
                }
            },
            "/v1/push": {
                "post": {
                    "summary": "Send a batch of pushes (RFC 8599 vocabulary)",
                    "security": BEARER,
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": batch}},
                    },
                    "responses": {"200": _json(batch_ok, "One result per item"), **ERRORS},
                }
            },
            "/v1/push-credentials": {
                "post": {
                    "summary": "Upload push credentials (validated; secrets never returned)",
                    "security": BEARER,
                    "requestBody": _body("NewCredential"),
                    "responses": {"201": _data("Credential", "Stored"), **ERRORS, **NO_STORE},
                },
                "get": {
                    "summary": "List push credentials",
                    "security": BEARER,
                    "parameters": [
                        {"name": "filter[type]", "in": "query", "schema": {"type": "string"}},
                        {"name": "filter[alias]", "in": "query", "schema": {"type": "string"}},
                        *PAGING,
                    ],
                    "responses": {"200": _list("Credential", "A page"), **ERRORS, **NO_STORE},
                },
            },
            "/v1/push-credentials/{id}": {
                "get": {
                    "summary": "One push credential",
                    "security": BEARER,
                    "parameters": ID,
                    "responses": {
                        "200": _data("Credential", "Found"),
                        **ERRORS,
                        **NOT_FOUND,
                        **NO_STORE,
                    },
                },
                "delete": {
                    "summary": "Delete a push credential (409 while an app uses it)",
                    "security": BEARER,
                    "parameters": ID,
                    "responses": {
                        "200": _data("Credential", "Deleted"),
                        "409": _json(_ref("Errors"), "Used by an app"),
                        **ERRORS,
                        **NOT_FOUND,
                        **NO_STORE,
                    },
                },
            },
            "/v1/apps": {
                "post": {
                    "summary": "Create an app and attach credentials",
                    "security": BEARER,
                    "requestBody": _body("NewApp"),
                    "responses": {
                        "201": _data("App", "Created"),
                        "409": _json(_ref("Errors"), "An AppId already belongs to an app"),
                        **ERRORS,
                        **NO_STORE,
                    },
                },
                "get": {
                    "summary": "List apps",
                    "security": BEARER,
                    "parameters": [
                        {"name": "filter[provider]", "in": "query", "schema": {"type": "string"}},
                        {"name": "filter[name]", "in": "query", "schema": {"type": "string"}},
                        *PAGING,
                    ],
                    "responses": {"200": _list("App", "A page"), **ERRORS, **NO_STORE},
                },
            },
            "/v1/apps/{id}": {
                "get": {
                    "summary": "One app",
                    "security": BEARER,
                    "parameters": ID,
                    "responses": {"200": _data("App", "Found"), **ERRORS, **NOT_FOUND, **NO_STORE},
                },
                "patch": {
                    "summary": "Update an app: name, AppIds, attached credentials",
                    "security": BEARER,
                    "parameters": ID,
                    "requestBody": _body("AppUpdate"),
                    "responses": {
                        "200": _data("App", "Updated"),
                        "409": _json(_ref("Errors"), "An AppId already belongs to an app"),
                        **ERRORS,
                        **NOT_FOUND,
                        **NO_STORE,
                    },
                },
                "delete": {
                    "summary": "Delete an app (its credentials stay)",
                    "security": BEARER,
                    "parameters": ID,
                    "responses": {
                        "200": _data("App", "Deleted"),
                        **ERRORS,
                        **NOT_FOUND,
                        **NO_STORE,
                    },
                },
            },
            "/health": {
                "get": {
                    "summary": "200 once every listener is up",
                    "responses": {
                        "200": _json({"type": "object"}, "Ready"),
                        "503": _json({"type": "object"}, "Starting"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {
                        "200": {
                            "description": "Text exposition format",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "responses": {"200": _json({"type": "object"}, "OpenAPI 3.0")},
                }
            },
        },
    }


_DOCUMENT = document()


async def handle(request: Request) -> Response:
    return json_response(_DOCUMENT)
