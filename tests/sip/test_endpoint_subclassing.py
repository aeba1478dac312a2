"""Subclasses of the endpoint's TU classes written in Python behave the same whether
sipwake.sip.endpoint runs compiled with mypyc or interpreted.

A compiled base reads its settings (``stateless_methods``, OptionsUser's ``implemented``)
from the instance, never from an interpreted subclass's class body: such a subclass is
refused in both modes, and the same setting assigned in ``__init__`` works in both.
"""

from __future__ import annotations

import pytest

from sipwake.sip.endpoint import Endpoint, OptionsUser, TransactionUser
from sipwake.sip.message import Request, parse_message
from sipwake.sip.transaction import Address

SOURCE = Address("UDP", "127.0.0.1", 5070)


def request(method: str) -> Request:
    data = (
        f"{method} sip:example.org SIP/2.0\r\n"
        "Via: SIP/2.0/UDP 127.0.0.1:5070;branch=z9hG4bKsub;rport\r\n"
        "Max-Forwards: 70\r\nFrom: <sip:alice@example.org>;tag=1\r\nTo: <sip:example.org>\r\n"
        f"Call-ID: sub-1\r\nCSeq: 1 {method}\r\nContent-Length: 0\r\n\r\n"
    ).encode()
    msg = parse_message(data)
    assert isinstance(msg, Request)
    return msg


def test_a_setting_in_a_subclass_body_is_refused() -> None:
    with pytest.raises(TypeError, match="stateless_methods in __init__"):

        class Stateless(TransactionUser):
            stateless_methods = frozenset({"OPTIONS"})

    with pytest.raises(TypeError, match="implemented in __init__"):

        class MoreMethods(OptionsUser):
            implemented = frozenset({"OPTIONS", "MESSAGE"})


def test_stateless_methods_set_in_init_reach_the_endpoint() -> None:
    class Answering(TransactionUser):
        def __init__(self) -> None:
            self.stateless_methods = frozenset({"OPTIONS"})

        def answer_stateless(
            self, endpoint: Endpoint, request: Request, source: Address
        ) -> bytes | None:
            return b"answered " + request.method.encode()

    endpoint = Endpoint(Answering())
    assert endpoint.on_message(request("OPTIONS"), SOURCE) == b"answered OPTIONS"


def test_implemented_set_in_init_is_what_options_allows() -> None:
    class MoreMethods(OptionsUser):
        def __init__(self) -> None:
            self.implemented = frozenset({"OPTIONS", "ACK", "CANCEL", "MESSAGE"})

    tu = MoreMethods()
    assert tu.allow_header(request("OPTIONS")) == "ACK, CANCEL, MESSAGE, OPTIONS"
    assert OptionsUser().allow_header(request("OPTIONS")) == "ACK, CANCEL, OPTIONS"


def test_an_overridden_hook_is_called_by_the_compiled_endpoint() -> None:
    seen: list[str] = []

    class Recording(OptionsUser):
        def allowed_for(self, request: Request) -> frozenset[str]:
            seen.append(request.method)
            return frozenset({"ACK", "CANCEL"})

    answer = Recording().allow_header(request("OPTIONS"))
    assert answer == "ACK, CANCEL" and seen == ["OPTIONS"]
