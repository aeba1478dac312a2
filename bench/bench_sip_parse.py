"""Cost of parsing and serializing a Linphone-like REGISTER with RFC 8599 push parameters.

Run: python3 bench/bench_sip_parse.py [--runs 7] [--number 20000]
Prints, per operation, the median over runs of wall time and of CPU time, and the best
run's CPU time, in microseconds.
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


def measure(fn: Callable[[], None], number: int, runs: int) -> tuple[float, float, float]:
    """Per call, in microseconds: median wall time, median CPU time, best CPU time.

    Each run times ``number`` calls. CPU time (process_time) is the steadier figure on a
    shared machine: other processes stretch wall time but not this process's CPU time.
    """
    wall, cpu = [], []
    for _ in range(runs):
        w0, c0 = time.perf_counter_ns(), time.process_time_ns()
        for _ in range(number):
            fn()
        wall.append((time.perf_counter_ns() - w0) / number / 1000)
        cpu.append((time.process_time_ns() - c0) / number / 1000)
    return statistics.median(wall), statistics.median(cpu), min(cpu)


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
        wall, cpu, best = measure(fn, args.number, args.runs)
        print(f"{label}: median {wall:.2f} us wall, {cpu:.2f} us CPU (best run {best:.2f})")


if __name__ == "__main__":
    main()
