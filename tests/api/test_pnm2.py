"""The Acrobits-compatible gateway against the APNs simulator."""

from __future__ import annotations

from typing import Any

import pytest

from sipwake.simulator.apns import ApnsSimulator

from .conftest import APP, DEAD, TOKEN, TOKEN2, Api

SENT = {"code": 200, "response": "Your message was sent."}


def push(verb: str, app_id: str = APP, token: str = TOKEN, **extra: Any) -> dict[str, Any]:
    body = {"verb": verb, "AppId": app_id, "DeviceToken": token, "Selector": "acc-1"}
    body.update(extra)
    return body


async def test_text_message_is_an_alert_with_the_acrobits_fields(
    api: Api, sim: ApnsSimulator
) -> None:
    status, data, _ = await api.post(
        "/pnm2/send",
        push("NotifyTextMessage", Message="hi", Badge=3, Sound="ping.caf", ThreadId="t1",
             UserName="alice", UserDisplayName="Alice", ContentType="text/plain", Id="m-1"),
    )  # fmt: skip
    assert (status, data) == (200, SENT)
    [p] = sim.received
    assert (p.token, p.topic, p.push_type) == (TOKEN, APP, "alert")
    custom = p.payload["customPayload"]
    assert custom["Selector"] == "acc-1"
    assert custom["Message"] == "hi"
    assert custom["Badge"] == 3
    assert custom["ThreadId"] == "t1"
    assert custom["UserDisplayName"] == "Alice"
    assert p.payload["aps"]["sound"] == "ping.caf"
    assert p.payload["display-name"] == "Alice"
    assert p.collapse_id is None  # a thread is no collapse id: each message is kept


async def test_messages_of_one_thread_do_not_replace_each_other(
    api: Api, sim: ApnsSimulator
) -> None:
    for text in ("first", "second"):
        body = push("NotifyTextMessage", Message=text, ThreadId="room-7")
        status, data, _ = await api.post("/pnm2/send", body)
        assert (status, data) == (200, SENT)
    assert [p.collapse_id for p in sim.received] == [None, None]
    assert [p.payload["aps"]["thread-id"] for p in sim.received] == ["room-7", "room-7"]
    assert [p.payload["aps"]["alert"]["body"] for p in sim.received] == ["first", "second"]


async def test_generic_text_message_carries_the_message(api: Api, sim: ApnsSimulator) -> None:
    body = {"verb": "NotifyGenericTextMessage", "AppId": APP, "DeviceToken": TOKEN,
            "Message": "Server maintenance at 22:00"}  # fmt: skip
    status, data, _ = await api.post("/pnm2/send", body)
    assert (status, data) == (200, SENT)
    assert sim.received[0].payload["customPayload"]["Message"] == "Server maintenance at 22:00"
    assert sim.received[0].push_type == "alert"


async def test_reprovision_is_a_silent_push(api: Api, sim: ApnsSimulator) -> None:
    status, data, _ = await api.post("/pnm2/send", push("NotifyReprovision"))
    assert (status, data) == (200, SENT)
    [p] = sim.received
    assert p.push_type == "background"
    assert p.payload["aps"] == {"content-available": 1}
    assert p.payload["customPayload"]["verb"] == "NotifyReprovision"


async def test_incoming_call_to_the_pushkit_app_id_is_a_voip_push(
    api: Api, sim: ApnsSimulator
) -> None:
    body = push("NotifyIncomingCall", app_id=APP + ".voip", token=TOKEN2, CallId="c-42",
                UserName="sip:bob@example.org")  # fmt: skip
    status, data, _ = await api.post("/pnm2/send", body)
    assert (status, data) == (200, SENT)
    [p] = sim.received
    assert (p.token, p.topic, p.push_type, p.priority) == (TOKEN2, APP + ".voip", "voip", 10)
    assert p.payload["call-id"] == "c-42"
    assert p.payload["from-uri"] == "sip:bob@example.org"


async def test_incoming_call_to_the_remote_app_id_rings_with_an_alert(
    api: Api, sim: ApnsSimulator
) -> None:
    status, data, _ = await api.post("/pnm2/send", push("NotifyIncomingCall", CallId="c-1"))
    assert (status, data) == (200, SENT)
    [p] = sim.received
    assert (p.topic, p.push_type) == (APP, "alert")
    assert p.collapse_id == "c-1"


async def test_other_verbs_refuse_the_pushkit_app_id(api: Api, sim: ApnsSimulator) -> None:
    status, data, _ = await api.post("/pnm2/send", push("NotifyTextMessage", app_id=APP + ".voip"))
    assert status == 200
    assert data["code"] == 400
    assert "PushKit" in data["response"]
    assert sim.received == []


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"AppId": APP, "DeviceToken": TOKEN}, "verb: missing"),
        ({"verb": "NotifyTextMessage", "DeviceToken": TOKEN}, "AppId: missing"),
        ({"verb": "NotifyTextMessage", "AppId": APP}, "DeviceToken: missing"),
        ({"verb": "NotifyTextMessage", "AppId": APP, "DeviceToken": TOKEN}, "Selector: missing"),
        ({"verb": "NotifyGenericTextMessage", "AppId": APP, "DeviceToken": TOKEN}, "Message"),
        ({"verb": "NotifyNothing", "AppId": APP, "DeviceToken": TOKEN}, "unknown verb"),
        (push("NotifyTextMessage", app_id="com.unknown"), "unknown AppId"),
        (push("NotifyTextMessage", token="zz/../x"), "DeviceToken"),
        (push("NotifyTextMessage", Badge=-1), "Badge"),
        (push("NotifyTextMessage", Badge="\u00b2"), "Badge"),  # a digit, not ASCII
        (push("NotifyTextMessage", Badge="-3"), "Badge"),
        (push("NotifyTextMessage", Message=["x"]), "Message: expected a string"),
    ],
)
async def test_bad_fields_get_code_400_naming_the_field(
    api: Api, sim: ApnsSimulator, body: dict[str, Any], needle: str
) -> None:
    status, data, _ = await api.post("/pnm2/send", body)
    assert status == 200
    assert data["code"] == 400
    assert needle in data["response"]
    assert sim.received == []


async def test_rejected_token_is_code_404(api: Api) -> None:
    status, data, _ = await api.post("/pnm2/send", push("NotifyTextMessage", token=DEAD))
    assert status == 200
    assert data["code"] == 404
    assert "Unregistered" in data["response"]


async def test_upstream_failure_is_code_500_saying_why(api: Api, sim: ApnsSimulator) -> None:
    await sim.stop()
    status, data, _ = await api.post("/pnm2/send", push("NotifyTextMessage"))
    assert status == 200
    assert data["code"] == 500
    assert "apns failed" in data["response"]


async def test_multisend_answers_each_element_in_order(api: Api, sim: ApnsSimulator) -> None:
    body = [push("NotifyTextMessage"), None, push("NotifyTextMessage", token=DEAD), 7,
            {"verb": "NotifyTextMessage"}, push("NotifyReprovision", token=TOKEN2)]  # fmt: skip
    status, data, _ = await api.post("/pnm2/multisend", body)
    assert status == 200
    assert [r["code"] for r in data] == [200, 400, 404, 400, 400, 200]
    assert all(isinstance(r["response"], str) and r["response"] for r in data)
    assert sorted(p.token for p in sim.received) == sorted([TOKEN, TOKEN2])


async def test_multisend_single_object_is_a_one_element_list(api: Api) -> None:
    status, data, _ = await api.post("/pnm2/multisend", push("NotifyTextMessage"))
    assert (status, data) == (200, [SENT])


async def test_multisend_empty_list_is_an_empty_list(api: Api) -> None:
    status, data, _ = await api.post("/pnm2/multisend", [])
    assert (status, data) == (200, [])


@pytest.mark.parametrize("path", ["/pnm2/send", "/pnm2/multisend"])
async def test_null_body_is_http_400(api: Api, path: str) -> None:
    status, data, _ = await api.post(
        path, data=b"null", headers={"Content-Type": "application/json"}
    )
    assert status == 400
    assert data["code"] == 400
    assert "expected" in data["response"]


@pytest.mark.parametrize("path", ["/pnm2/send", "/pnm2/multisend"])
async def test_not_a_json_post_is_http_400_with_json(api: Api, path: str) -> None:
    status, data, _ = await api.request("GET", path)
    assert (status, data["code"]) == (400, 400)
    assert "POST" in data["response"]
    status, data, _ = await api.post(path, data=b"verb=x", headers={"Content-Type": "text/plain"})
    assert (status, data["code"]) == (400, 400)
    assert "Content-Type" in data["response"]
    status, data, _ = await api.post(
        path, data=b'{"verb": ', headers={"Content-Type": "application/json"}
    )
    assert (status, data["code"]) == (400, 400)
    assert "invalid JSON" in data["response"]


async def test_form_api_sends_and_answers_with_the_code_as_status(
    api: Api, sim: ApnsSimulator
) -> None:
    form = {"verb": "NotifyTextMessage", "AppId": APP, "DeviceToken": TOKEN, "Selector": "s1",
            "Badge": "2"}  # fmt: skip
    status, data, _ = await api.post("/pnm2", data=form)
    assert (status, data) == (200, SENT)
    assert sim.received[0].payload["customPayload"]["Badge"] == 2
    status, data, _ = await api.post("/pnm2", data={"verb": "NotifyTextMessage", "AppId": APP})
    assert status == 400
    assert "DeviceToken: missing" in data["response"]
    status, data, _ = await api.post("/pnm2", data={**form, "DeviceToken": DEAD})
    assert (status, data["code"]) == (404, 404)


async def test_form_api_refuses_json_and_get(api: Api) -> None:
    status, data, _ = await api.post("/pnm2", {"verb": "NotifyTextMessage"})
    assert status == 400
    assert "x-www-form-urlencoded" in data["response"]
    status, data, _ = await api.request("GET", "/pnm2")
    assert (status, data["code"]) == (400, 400)


async def test_multisend_of_300_to_one_app_queues_instead_of_failing(
    api: Api, sim: ApnsSimulator
) -> None:
    # [push] max-queue-size bounds pushes waiting, not pushes under way: a batch larger
    # than it but within the provider's concurrency is sent whole.
    body = [
        {"verb": "NotifyTextMessage", "AppId": APP, "Selector": "s", "DeviceToken": f"{i:064x}"}
        for i in range(300)
    ]
    status, data, _ = await api.post("/pnm2/multisend", body)
    assert status == 200
    assert [r["code"] for r in data] == [200] * 300


@pytest.mark.parametrize("token", ["..", "ab/cd", "not_hex_token"])
async def test_non_hexadecimal_device_token_is_code_400(
    api: Api, sim: ApnsSimulator, token: str
) -> None:
    status, data, _ = await api.post("/pnm2/send", push("NotifyTextMessage", token=token))
    assert status == 200
    assert data["code"] == 400 and "DeviceToken" in data["response"]
    assert sim.received == []
