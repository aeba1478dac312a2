"""The character tables of push/params.py accept exactly what the regexes they replaced did."""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st

from sipwake.push.params import (
    _APNS_TOKEN_CHARS,
    _FCM_PROJECT_CHARS,
    _FCM_TOKEN_CHARS,
)
from sipwake.sip.uri import made_of

CASES = [
    (_APNS_TOKEN_CHARS, re.compile(r"[0-9A-Fa-f]+")),
    (_FCM_PROJECT_CHARS, re.compile(r"[A-Za-z0-9_.-]+")),
    (_FCM_TOKEN_CHARS, re.compile(r"[A-Za-z0-9_.:-]+")),
]


def test_every_character_is_judged_as_by_the_regex() -> None:
    for table, regex in CASES:
        assert not made_of("", table)
        for code in [*range(256), 0x660, 0xFF10, 0x1D7CE, 0xDC80]:
            text = "a" + chr(code) + "0"
            assert made_of(text, table) == (regex.fullmatch(text) is not None), hex(code)


@given(st.text(alphabet=st.sampled_from("09afAFgG_.:-+ \t\n%é٣\udc80"), max_size=12))
def test_generated_tokens_are_judged_as_by_the_regex(text: str) -> None:
    for table, regex in CASES:
        assert made_of(text, table) == (regex.fullmatch(text) is not None)
