"""SIP, SIPS, tel and opaque URIs: parsing, byte-exact round trip and RFC 3261 comparison."""

from __future__ import annotations

import pytest

from sipwake.sip.uri import AbsoluteUri, SipUri, TelUri, UriError, is_request_uri, parse_uri

PRID = "0f" * 32


def test_sip_uri_fields() -> None:
    uri = SipUri.parse("sips:Alice:secret@Example.COM:5061;transport=TLS;lr?Subject=hi&X=y")
    assert uri.scheme == "sips" and uri.secure
    assert (uri.user, uri.password) == ("Alice", "secret")
    assert (uri.host, uri.host_raw, uri.port) == ("example.com", "Example.COM", 5061)
    assert uri.params == {"transport": "TLS", "lr": None}
    assert uri.transport == "tls"
    assert uri.headers == {"Subject": "hi", "X": "y"}


def test_ipv6_reference_and_no_user() -> None:
    uri = SipUri.parse("sip:[2001:DB8::10]:5070;maddr=[2001:db8::1]")
    assert (uri.user, uri.host, uri.port) == (None, "[2001:db8::10]", 5070)
    assert uri.params["maddr"] == "[2001:db8::1]"


def test_escaped_user_is_unescaped_but_raw_kept() -> None:
    uri = SipUri.parse("sip:%61lice%20b@example.com")
    assert uri.user == "alice b" and uri.user_raw == "%61lice%20b"
    assert uri.to_string() == "sip:%61lice%20b@example.com"


def test_pn_params_with_colon_and_ampersand_round_trip_byte_exact() -> None:
    text = (
        "sip:alice@192.0.2.4:5060;transport=tcp;pn-provider=apns.dev"
        ";pn-param=ABCD1234.org.linphone.phone.voip&remote"
        f";pn-prid={PRID}:voip&{PRID}:remote;PN-Silent"
    )
    uri = SipUri.parse(text)
    assert uri.params["pn-prid"] == f"{PRID}:voip&{PRID}:remote"
    assert uri.params["pn-param"] == "ABCD1234.org.linphone.phone.voip&remote"
    assert uri.params["pn-silent"] is None
    assert uri.to_string() == text


def test_changed_uri_is_rebuilt() -> None:
    uri = SipUri.parse("sip:bob@example.com;transport=udp")
    uri.params["transport"] = "tcp"
    uri.port = 5080
    assert uri.to_string() == "sip:bob@example.com:5080;transport=tcp"
    assert (
        str(SipUri("example.org", user="carol", params={"lr": None})) == "sip:carol@example.org;lr"
    )


@pytest.mark.parametrize(
    "text",
    [
        "sip:",
        "sip:user@",
        "sip:@example.com",
        "sip:example.com:99999",
        "sip:example.com:port",
        "sip:exa mple.com",
        "sip:[2001:db8::1",
        "sip:example.com;;lr",
        "sip:example.com;",
        "sip:example.com?novalue",
        "sip:<example.com>",
        "http",
    ],
)
def test_malformed_uris_raise(text: str) -> None:
    with pytest.raises(UriError):
        parse_uri(text)


# RFC 3261 §19.1.4: equivalent pairs and non-equivalent pairs.
EQUAL = [
    ("sip:%61lice@atlanta.com;transport=TCP", "sip:alice@AtLanTa.CoM;Transport=Tcp"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com;newparam=5"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com;security=on"),
    ("sip:carol@chicago.com;newparam=5", "sip:carol@chicago.com;security=on"),
    ("sip:biloxi.com;transport=tcp;method=REGISTER?to=sip:bob%40biloxi.com",
     "sip:biloxi.com;method=REGISTER;transport=tcp?to=sip:bob%40biloxi.com"),
    ("sip:alice@atlanta.com?subject=project%20x&priority=urgent",
     "sip:alice@atlanta.com?priority=urgent&subject=project%20x"),
]  # fmt: skip
NOT_EQUAL = [
    ("SIP:ALICE@AtLanTa.CoM;Transport=udp", "sip:alice@AtLanTa.CoM;Transport=UDP"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com:5060"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com;transport=udp"),
    ("sip:bob@biloxi.com", "sip:bob@biloxi.com:6000;transport=tcp"),
    ("sip:carol@chicago.com", "sip:carol@chicago.com?Subject=next%20meeting"),
    ("sip:bob@phone21.boxesbybob.com", "sip:bob@192.0.2.4"),
    ("sip:alice@example.com", "sips:alice@example.com"),
    ("sip:alice@example.com", "sip:alice@example.com;maddr=192.0.2.1"),
]


@pytest.mark.parametrize(("a", "b"), EQUAL)
def test_equivalent_uris_compare_equal(a: str, b: str) -> None:
    ua, ub = SipUri.parse(a), SipUri.parse(b)
    assert ua == ub and ub == ua
    assert hash(ua) == hash(ub)


@pytest.mark.parametrize(("a", "b"), NOT_EQUAL)
def test_different_uris_compare_unequal(a: str, b: str) -> None:
    assert SipUri.parse(a) != SipUri.parse(b)
    assert SipUri.parse(b) != SipUri.parse(a)


def test_tel_uri() -> None:
    uri = parse_uri("tel:+1-201-555-0123;phone-context=example.com")
    assert isinstance(uri, TelUri) and uri.is_global
    assert uri.params == {"phone-context": "example.com"}
    assert uri == TelUri.parse("tel:+1.201.555.0123;Phone-Context=Example.com")
    assert str(uri) == "tel:+1-201-555-0123;phone-context=example.com"
    uri.params["phone-context"] = "example.org"
    assert str(uri) == "tel:+1-201-555-0123;phone-context=example.org"


def test_unknown_scheme_kept_opaque_for_a_416() -> None:
    uri = parse_uri("urn:service:sos")
    assert isinstance(uri, AbsoluteUri)
    assert (uri.scheme, uri.to_string()) == ("urn", "urn:service:sos")


def test_request_uri_check_refuses_headers_and_brackets() -> None:
    assert is_request_uri("sip:alice@example.com;lr")
    assert is_request_uri("tel:+123")
    assert is_request_uri("urn:service:sos")
    assert not is_request_uri("sip:alice@example.com?Route=x")
    assert not is_request_uri("<sip:alice@example.com>")
    assert not is_request_uri("sip:alice@example.com:70000")
