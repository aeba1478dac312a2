"""RFC 8599, iOS 13 voip&remote and legacy push parameters → destinations."""

from __future__ import annotations

import pytest

from sipwake.push.params import PushParamsError, parse_push_params
from sipwake.push.request import CallEndReason, Destination, Provider, Service

VOIP = "a" * 64
REMOTE = "b" * 64


def test_ios13_voip_and_remote() -> None:
    pp = parse_push_params(
        {
            "pn-provider": "apns",
            "pn-param": "ABCD1234.org.linphone.phone.voip&remote",
            "pn-prid": f"{VOIP}:voip&{REMOTE}:remote",
        }
    )
    assert pp.destinations == (
        Destination(Provider.APNS, "org.linphone.phone", VOIP, Service.VOIP, "ABCD1234"),
        Destination(Provider.APNS, "org.linphone.phone", REMOTE, Service.REMOTE, "ABCD1234"),
    )
    assert pp.for_service(Service.VOIP) is not None
    assert pp.for_service(Service.VOIP).apns_topic == "org.linphone.phone.voip"  # type: ignore[union-attr]
    assert pp.has_push and not pp.capability_query and pp.provider is Provider.APNS


def test_token_order_follows_suffix_not_position() -> None:
    pp = parse_push_params(
        {
            "pn-provider": "apns.dev",
            "pn-param": "ABCDE12345.org.example.app.remote&voip",
            "pn-prid": f"{VOIP}:voip&{REMOTE}:remote",
        }
    )
    assert {d.service: d.token for d in pp.destinations} == {
        Service.VOIP: VOIP,
        Service.REMOTE: REMOTE,
    }
    assert all(d.sandbox and d.team_id == "ABCDE12345" for d in pp.destinations)


@pytest.mark.parametrize(
    ("param", "prid", "service", "team", "bundle"),
    [
        ("ABCD1234.org.example.app", REMOTE, Service.REMOTE, "ABCD1234", "org.example.app"),
        ("ABCD1234.org.example.app.voip", VOIP, Service.VOIP, "ABCD1234", "org.example.app"),
        ("ABCD1234.org.example.app.remote", REMOTE, Service.REMOTE, "ABCD1234", "org.example.app"),
        ("org.example.app.voip", VOIP, Service.VOIP, None, "org.example.app"),  # plain RFC 8599
        ("org.example.app", REMOTE, Service.REMOTE, None, "org.example.app"),
        ("ABCD1234.org.example.app.voip", f"{VOIP}:voip", Service.VOIP, "ABCD1234", None),
        ("com.Example.App", REMOTE, Service.REMOTE, None, "com.Example.App"),
    ],
)
def test_apple_single_service_forms(
    param: str, prid: str, service: Service, team: str | None, bundle: str | None
) -> None:
    (dest,) = parse_push_params(
        {"pn-provider": "apns", "pn-param": param, "pn-prid": prid}
    ).destinations
    assert dest.service is service
    assert dest.team_id == team
    assert dest.token in (VOIP, REMOTE)
    if bundle is not None:
        assert dest.app_id == bundle


def test_names_case_insensitive_quoted_and_percent_encoded() -> None:
    pp = parse_push_params(
        {
            "PN-Provider": "APNS",
            "Pn-Param": '"ABCD1234.org.example.app.voip%26remote"',
            "PN-PRID": f"{VOIP}%3Avoip%26{REMOTE}%3Aremote",
        }
    )
    assert [d.service for d in pp.destinations] == [Service.VOIP, Service.REMOTE]


def test_fcm() -> None:
    (dest,) = parse_push_params(
        {"pn-provider": "fcm", "pn-param": "my-project-42", "pn-prid": "dE3x:APA91b-_tok"}
    ).destinations
    assert dest == Destination(Provider.FCM, "my-project-42", "dE3x:APA91b-_tok")


def test_webpush() -> None:
    uri = "https://push.example.net/wpush/v2/gAAAAB"
    pp = parse_push_params({"pn-provider": "webpush", "pn-prid": uri, "pn-param": "BPk"})
    assert pp.destinations == (Destination(Provider.WEBPUSH, "", uri),)


def test_capability_query_has_no_destination() -> None:
    pp = parse_push_params({"pn-provider": "apns"})
    assert pp.capability_query and not pp.has_push and pp.provider is Provider.APNS
    pp = parse_push_params({"pn-provider": "fcm", "pn-param": "proj"})
    assert pp.capability_query and pp.provider is Provider.FCM


def test_no_push_params() -> None:
    pp = parse_push_params({"transport": "tcp", "ob": None})
    assert not pp.has_push and not pp.capability_query and pp.provider is None


@pytest.mark.parametrize(
    ("params", "dest"),
    [
        (
            {"pn-type": "apple", "pn-tok": REMOTE, "app-id": "org.linphone.phone.prod"},
            Destination(Provider.APNS, "org.linphone.phone", REMOTE, Service.REMOTE),
        ),
        (
            {"pn-type": "apple", "pn-tok": REMOTE, "app-id": "org.linphone.phone.dev"},
            Destination(Provider.APNS_DEV, "org.linphone.phone", REMOTE, Service.REMOTE),
        ),
        (
            {"pn-type": "apple", "pn-tok": VOIP, "app-id": "org.linphone.phone.voip.prod"},
            Destination(Provider.APNS, "org.linphone.phone", VOIP, Service.VOIP),
        ),
        (
            {"pn-type": "firebase", "pn-tok": "fcmtok", "app-id": "929724111839"},
            Destination(Provider.FCM, "929724111839", "fcmtok"),
        ),
        (
            {"pn-type": "android", "pn-tok": "fcmtok", "app-id": "proj"},
            Destination(Provider.FCM, "proj", "fcmtok"),
        ),
        (
            {"PN-TYPE": "Google", "pn-tok": "fcmtok", "app-id": "proj"},
            Destination(Provider.FCM, "proj", "fcmtok"),
        ),
    ],
)
def test_legacy(params: dict[str, str | None], dest: Destination) -> None:
    pp = parse_push_params(params)
    assert pp.destinations == (dest,)
    assert pp.provider is dest.provider


def test_rfc8599_wins_over_legacy() -> None:
    pp = parse_push_params(
        {
            "pn-provider": "fcm",
            "pn-param": "proj",
            "pn-prid": "new",
            "pn-type": "apple",
            "pn-tok": "old",
            "app-id": "x.prod",
        }
    )
    assert pp.destinations == (Destination(Provider.FCM, "proj", "new"),)


def test_alert_strings_timeout_and_end_strings() -> None:
    pp = parse_push_params(
        {
            "pn-provider": "apns",
            "pn-param": "ABCD1234.org.example.app",
            "pn-prid": REMOTE,
            "pn-call-str": "CALL_KEY",
            "pn-msg-str": "MSG_KEY",
            "pn-groupchat-str": "GROUP_KEY",
            "pn-call-snd": "ring.caf",
            "pn-msg-snd": "",  # empty keeps the default
            "pn-timeout": "0",
            "pn-call-remote-push-interval": "3",
            "pn-missing-call-str": "Missed",
        }
    )
    s = pp.strings
    assert (s.call_loc_key, s.message_loc_key, s.groupchat_loc_key) == (
        "CALL_KEY",
        "MSG_KEY",
        "GROUP_KEY",
    )
    assert (s.call_sound, s.message_sound) == ("ring.caf", "default")
    assert pp.timeout == 0
    assert pp.call_remote_push_interval == 3
    assert pp.end_strings == {CallEndReason.MISSED: "Missed"}


@pytest.mark.parametrize(
    ("value", "silent"), [("1", True), ("0", False), (None, True), ("TRUE", True)]
)
def test_pn_silent(value: str | None, silent: bool) -> None:
    pp = parse_push_params(
        {"pn-type": "firebase", "pn-tok": "t", "app-id": "p", "pn-silent": value}
    )
    assert pp.silent is silent


def test_defaults() -> None:
    pp = parse_push_params({"pn-provider": "apns", "pn-param": "org.x.app", "pn-prid": REMOTE})
    assert (pp.strings.call_loc_key, pp.strings.message_loc_key) == ("IC_MSG", "IM_MSG")
    assert pp.strings.groupchat_loc_key == "GC_MSG"
    assert pp.timeout is None and pp.end_strings == {} and pp.silent is None


APPLE = {"pn-provider": "apns", "pn-param": "ABCD1234.org.example.app.voip&remote"}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"pn-provider": "gcm", "pn-prid": "x"}, "pn-provider: unsupported provider 'gcm'"),
        ({"pn-provider": "", "pn-prid": "x"}, "pn-provider: empty value"),
        ({"pn-provider": None, "pn-prid": "x"}, "pn-provider: empty value"),
        ({"pn-prid": "x", "pn-param": "y"}, "pn-provider: missing (pn-prid given"),
        ({"pn-param": "y"}, "pn-provider: missing (pn-param given"),
        ({**APPLE, "pn-prid": f"{VOIP}:voip"}, "pn-prid: 1 token for 2 services in pn-param"),
        (
            {"pn-provider": "apns", "pn-param": "ABCD1234.org.x.app", "pn-prid": "a:voip&b:remote"},
            "pn-prid: 2 tokens for 1 service in pn-param",
        ),
        ({**APPLE, "pn-prid": f"{VOIP}&{REMOTE}:remote"}, "pn-prid: token without a :voip"),
        ({**APPLE, "pn-prid": f"{VOIP}:video&{REMOTE}:remote"}, "pn-prid: unknown service 'video'"),
        ({**APPLE, "pn-prid": f"{VOIP}:voip&{REMOTE}:voip"}, "pn-prid: two tokens for service"),
        ({**APPLE, "pn-prid": f":voip&{REMOTE}:remote"}, "pn-prid: empty token for service 'voip'"),
        ({**APPLE, "pn-prid": ""}, "pn-prid: empty value"),
        ({**APPLE, "pn-prid": None}, "pn-prid: empty value"),
        ({**APPLE, "pn-prid": "../x:voip&b:remote"}, "pn-prid: invalid APNs token"),
        (
            {"pn-provider": "apns", "pn-param": "ABCD1234.org.x.app", "pn-prid": "a:voip"},
            "pn-prid: token for service 'voip' but pn-param declares remote",
        ),
        ({"pn-provider": "apns", "pn-prid": "a"}, "pn-param: missing (the APNs topic"),
        ({"pn-provider": "apns", "pn-param": "", "pn-prid": "a"}, "pn-param: empty value"),
        (
            {"pn-provider": "apns", "pn-param": "T.org.x.voip&voip", "pn-prid": "a"},
            "pn-param: service 'voip' repeated",
        ),
        (
            {"pn-provider": "apns", "pn-param": "T.org.x.voip&video", "pn-prid": "a"},
            "pn-param: unknown service in 'voip&video'",
        ),
        (
            {"pn-provider": "apns", "pn-param": "ABCD1234..voip", "pn-prid": "a"},
            "pn-param: invalid bundle id ''",
        ),
        (
            {"pn-provider": "apns", "pn-param": "org..x", "pn-prid": "a"},
            "pn-param: invalid bundle id 'org..x'",
        ),
        ({"pn-provider": "apns", "pn-param": "org/x"}, "pn-param: invalid bundle id 'org/x'"),
        ({"pn-provider": "fcm", "pn-prid": "t"}, "pn-param: missing (the Firebase project"),
        ({"pn-provider": "fcm", "pn-param": "a b", "pn-prid": "t"}, "pn-param: invalid Firebase"),
        (
            {"pn-provider": "fcm", "pn-param": "p", "pn-prid": "t/../x"},
            "pn-prid: invalid FCM registration token",
        ),
        (
            {"pn-provider": "webpush", "pn-prid": "http://push.example.net/x"},
            "pn-prid: Web Push subscription must be an https:// URI",
        ),
        ({"pn-provider": "webpush", "pn-prid": "https:///x"}, "pn-prid: Web Push subscription"),
        ({"pn-provider": "apns", "pn-prid": "%zz"}, "pn-prid: invalid percent-encoding"),
        ({**APPLE, "pn-prid": "a:voip&b:remote", "pn-timeout": "soon"}, "pn-timeout: expected"),
        ({**APPLE, "pn-prid": "a:voip&b:remote", "pn-timeout": "-1"}, "pn-timeout: expected"),
        ({**APPLE, "pn-prid": "a:voip&b:remote", "pn-timeout": None}, "pn-timeout: expected"),
        ({**APPLE, "pn-prid": "a:voip&b:remote", "pn-silent": "maybe"}, "pn-silent: expected"),
        ({"pn-tok": "t", "app-id": "x.prod"}, "pn-type: missing"),
        ({"pn-type": "apple", "app-id": "x.prod"}, "pn-tok: missing"),
        ({"pn-type": "apple", "pn-tok": "", "app-id": "x.prod"}, "pn-tok: empty value"),
        ({"pn-type": "apple", "pn-tok": "t"}, "app-id: missing (the bundle id ending in .prod"),
        (
            {"pn-type": "apple", "pn-tok": "t", "app-id": "org.x.app"},
            "app-id: 'org.x.app' does not end in .prod or .dev",
        ),
        ({"pn-type": "apple", "pn-tok": "t", "app-id": ".prod"}, "app-id: invalid bundle id ''"),
        ({"pn-type": "apple", "pn-tok": "t/x", "app-id": "a.prod"}, "pn-tok: invalid APNs token"),
        ({"pn-type": "firebase", "pn-tok": "t"}, "app-id: missing (the Firebase project"),
        ({"pn-type": "wp", "pn-tok": "t", "app-id": "x"}, "pn-type: unsupported type 'wp'"),
    ],
)
def test_malformed(params: dict[str, str | None], message: str) -> None:
    with pytest.raises(PushParamsError) as info:
        parse_push_params(params)
    assert str(info.value).startswith(message), str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("token", [".", "..", "a_b", "ab-cd", "xyz0"])
def test_apns_tokens_must_be_hexadecimal(token: str) -> None:
    with pytest.raises(PushParamsError, match="pn-prid: invalid APNs token"):
        parse_push_params(
            {"pn-provider": "apns", "pn-param": "ABCD1234.org.x.app", "pn-prid": token}
        )
    with pytest.raises(PushParamsError, match="pn-tok: invalid APNs token"):
        parse_push_params({"pn-type": "apple", "pn-tok": token, "app-id": "org.x.app.prod"})


def test_apns_token_hex_of_either_case_accepted() -> None:
    (dest,) = parse_push_params(
        {"pn-provider": "apns", "pn-param": "ABCD1234.org.x.app", "pn-prid": "AbCdEf0123"}
    ).destinations
    assert dest.token == "AbCdEf0123"


def test_percent_escapes_beyond_ascii_are_utf8() -> None:
    pp = parse_push_params({**APPLE, "pn-prid": "a:voip&b:remote", "pn-call-str": "Appel%20%C3%A9"})
    assert pp.strings.call_loc_key == "Appel é"


@pytest.mark.parametrize("value", ["%C3", "%FF%FE", "ab%2", "ab%", "%2G"])
def test_bad_percent_escapes_are_a_precise_error(value: str) -> None:
    with pytest.raises(PushParamsError) as info:
        parse_push_params({**APPLE, "pn-prid": "a:voip&b:remote", "pn-msg-str": value})
    assert str(info.value).startswith("pn-msg-str: invalid percent-encoding")


def test_parameters_other_than_push_ones_are_not_read() -> None:
    # A Contact's other parameters (transport, ob, a vendor's own) never fail the push part.
    pp = parse_push_params(
        {"transport": "%zz", "x-vendor": '"%"', **APPLE, "pn-prid": f"{VOIP}:voip&{REMOTE}:remote"}
    )
    assert [d.service for d in pp.destinations] == [Service.VOIP, Service.REMOTE]
    assert parse_push_params({"transport": "%zz", "ob": None}) == parse_push_params({})
