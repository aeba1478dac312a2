"""Cost of parsing and serializing a Linphone-like REGISTER with RFC 8599 push parameters.

Run: python3 bench/bench_sip_parse.py [--runs 7] [--number 20000]
Prints the median over runs of the time per operation, in microseconds.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from sipwake.sip.message import Request, parse_message

PRID = "a1" * 32
REGISTER = (
    "REGISTER sip:sip.example.org SIP/2.0\r\n"
    "Via: SIP/2.0/TCP 192.168.1.20:50312;alias;branch=z9hG4bK.Bh3rTn9cQ;rport\r\n"
    "Max-Forwards: 70\r\n"
    "From: <sip:alice@sip.example.org>;tag=9xhWmqpE2\r\n"
    "To: sip:alice@sip.example.org\r\n"
    "Call-ID: 3Xc8-Pm4ZfR2\r\n"
    "CSeq: 21 REGISTER\r\n"
    "Contact: <sip:alice@192.168.1.20:50312;transport=tcp"
    ";pn-provider=apns.dev;pn-param=ABCD1234.org.linphone.phone.voip&remote"
    f";pn-prid={PRID}:voip&{PRID}:remote>"
    ';+sip.instance="<urn:uuid:5a4b3c2d-1e0f-4a9b-8c7d-6e5f4a3b2c1d>";reg-id=1\r\n'
    "Expires: 3600\r\n"
    "User-Agent: LinphoneiOS/5.2.3 (iPhone) LinphoneSDK/5.3.0\r\n"
    "Supported: replaces, outbound, gruu, path\r\n"
    "Allow: INVITE, ACK, CANCEL, OPTIONS, BYE, REFER, NOTIFY, MESSAGE, SUBSCRIBE, INFO, UPDATE\r\n"
    "Content-Length: 0\r\n"
    "\r\n"
).encode()


def parse_serialize() -> None:
    parse_message(REGISTER).to_bytes()


def parse_only() -> None:
    parse_message(REGISTER)


def parse_read_pn() -> None:
    msg = parse_message(REGISTER)
    msg.contacts[0].pn_params()


def median_us(fn: Callable[[], None], number: int, runs: int) -> float:
    """Median over ``runs`` of the mean time of one call, in microseconds."""
    results = []
    for _ in range(runs):
        start = time.perf_counter_ns()
        for _ in range(number):
            fn()
        results.append((time.perf_counter_ns() - start) / number / 1000)
    return statistics.median(results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--number", type=int, default=20000)
    args = parser.parse_args()

    msg = parse_message(REGISTER)
    assert isinstance(msg, Request) and msg.to_bytes() == REGISTER  # byte-exact round trip
    assert msg.contacts[0].pn_params()["pn-prid"] == f"{PRID}:voip&{PRID}:remote"
    pre = parse_message(REGISTER)

    def read_pn_cold() -> None:
        pre.headers._cache.clear()  # force the Contact to be parsed again
        pre.contacts[0].pn_params()

    print(f"message: {len(REGISTER)} bytes, {len(msg.headers)} header fields")
    for label, fn in (
        ("parse + serialize", parse_serialize),
        ("parse only", parse_only),
        ("parse + read Contact pn-* params", parse_read_pn),
        ("read Contact pn-* params (Contact parse, no message parse)", read_pn_cold),
    ):
        print(f"{label}: {median_us(fn, args.number, args.runs):.2f} us")


if __name__ == "__main__":
    main()
