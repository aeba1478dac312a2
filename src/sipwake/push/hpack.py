"""HPACK (RFC 7541) for sipwake's HTTP/2 client, tuned for pushes.

A push connection sends the same method, scheme, authority, topic and authorization on
every request: the encoder puts those in the dynamic table once and then sends a one-byte
index for each, so only the path and per-push headers travel as literals. The encoder never
Huffman-codes (smaller CPU cost; allowed by the RFC). The decoder is complete; it borrows
only the Huffman code table of the ``hpack`` package and decodes a byte at a time through
memoised transitions, since a per-bit walk costs more than the rest of a response.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH


class HpackError(Exception):
    """A header block that cannot be decoded (HTTP/2 COMPRESSION_ERROR)."""


STATIC_TABLE: tuple[tuple[str, str], ...] = (
    (":authority", ""),
    (":method", "GET"),
    (":method", "POST"),
    (":path", "/"),
    (":path", "/index.html"),
    (":scheme", "http"),
    (":scheme", "https"),
    (":status", "200"),
    (":status", "204"),
    (":status", "206"),
    (":status", "304"),
    (":status", "400"),
    (":status", "404"),
    (":status", "500"),
    ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"),
    ("accept-language", ""),
    ("accept-ranges", ""),
    ("accept", ""),
    ("access-control-allow-origin", ""),
    ("age", ""),
    ("allow", ""),
    ("authorization", ""),
    ("cache-control", ""),
    ("content-disposition", ""),
    ("content-encoding", ""),
    ("content-language", ""),
    ("content-length", ""),
    ("content-location", ""),
    ("content-range", ""),
    ("content-type", ""),
    ("cookie", ""),
    ("date", ""),
    ("etag", ""),
    ("expect", ""),
    ("expires", ""),
    ("from", ""),
    ("host", ""),
    ("if-match", ""),
    ("if-modified-since", ""),
    ("if-none-match", ""),
    ("if-range", ""),
    ("if-unmodified-since", ""),
    ("last-modified", ""),
    ("link", ""),
    ("location", ""),
    ("max-forwards", ""),
    ("proxy-authenticate", ""),
    ("proxy-authorization", ""),
    ("range", ""),
    ("referer", ""),
    ("refresh", ""),
    ("retry-after", ""),
    ("server", ""),
    ("set-cookie", ""),
    ("strict-transport-security", ""),
    ("transfer-encoding", ""),
    ("user-agent", ""),
    ("vary", ""),
    ("via", ""),
    ("www-authenticate", ""),
)
_STATIC_LEN = len(STATIC_TABLE)
_STATIC_EXACT: dict[tuple[str, str], int] = {}
_STATIC_NAME: dict[str, int] = {}
for _i, (_n, _v) in enumerate(STATIC_TABLE, start=1):
    _STATIC_EXACT.setdefault((_n, _v), _i)
    _STATIC_NAME.setdefault(_n, _i)

ENTRY_OVERHEAD = 32
DEFAULT_TABLE_SIZE = 4096

# Headers that differ on (nearly) every request: indexing them would only churn the table.
_NO_INDEX_NAMES = frozenset(
    {
        ":path",
        "apns-id",
        "apns-expiration",
        "apns-collapse-id",
        "content-length",
        "date",
        "etag",
        "if-modified-since",
        "ttl",
        "topic",
        "urgency",
    }
)


# --- Huffman decoding (RFC 7541 §5.2, Appendix B) --------------------------------------------
# A decoder state is the pending bits of a partial code with a leading 1 bit as sentinel
# (1 = nothing pending). _CODES maps a complete code in that form to its symbol.
_CODES: dict[int, int] = {
    (1 << length) | code: symbol
    for symbol, (code, length) in enumerate(zip(REQUEST_CODES, REQUEST_CODES_LENGTH, strict=True))
}
_EOS = 256
# (state << 8 | input byte) -> (decoded bytes, next state << 8), so that the next key is
# one OR away; at most ~256 x 256 entries, filled as codes are met.
_TRANSITIONS: dict[int, tuple[bytes, int]] = {}


def _transition(key: int) -> tuple[bytes, int]:
    state = key >> 8
    byte = key & 0xFF
    out = bytearray()
    for shift in range(7, -1, -1):
        state = (state << 1) | ((byte >> shift) & 1)
        symbol = _CODES.get(state)
        if symbol is not None:
            if symbol == _EOS:
                raise HpackError("EOS symbol in a Huffman string")
            out.append(symbol)
            state = 1
        elif state >= 1 << 30:
            raise HpackError("invalid Huffman code")
    result = (bytes(out), state << 8)
    _TRANSITIONS[key] = result
    return result


def huffman_decode(data: bytes) -> bytes:
    """Decode a Huffman-coded string (errors on bad codes or padding)."""
    table = _TRANSITIONS
    key = 1 << 8  # nothing pending
    out = bytearray()
    try:
        for byte in data:
            step, key = table[key | byte]
            out += step
    except KeyError:  # a transition not met yet: make the missing ones, then decode
        key = 1 << 8
        for byte in data:
            key = (table.get(key | byte) or _transition(key | byte))[1]
        return huffman_decode(data)
    state = key >> 8
    # Padding: fewer than 8 pending bits, all ones (the start of EOS).
    if state >= 1 << 8 or state & (state + 1):
        raise HpackError("bad Huffman padding")
    return bytes(out)


def encode_int(value: int, prefix_bits: int, flags: int) -> bytes:
    """An HPACK integer with an N-bit prefix, the prefix byte OR-ed with ``flags``."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((flags | value,))
    out = bytearray((flags | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _decode_int(data: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    limit = (1 << prefix_bits) - 1
    value = data[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        if pos >= len(data):
            raise HpackError("truncated integer")
        b = data[pos]
        pos += 1
        value += (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 28:
            raise HpackError("integer too large")


def _encode_str(raw: bytes) -> bytes:
    return encode_int(len(raw), 7, 0) + raw


class HpackEncoder:
    """Encodes header lists; constant headers become one-byte dynamic-table references."""

    def __init__(self) -> None:
        self._max_size = DEFAULT_TABLE_SIZE  # what the peer allows (SETTINGS_HEADER_TABLE_SIZE)
        self._size = 0
        self._newest = 0  # sequence number of the newest entry
        self._entries: deque[tuple[int, tuple[str, str], int]] = deque()  # oldest first
        self._index: dict[tuple[str, str], int] = {}  # header -> sequence number
        self._pending_size_update: int | None = None
        self._name_prefix: dict[str, bytes] = {}
        # Representations of indexed headers; valid until the table changes.
        self._indexed: dict[tuple[str, str], bytes] = {}

    @property
    def table_size(self) -> int:
        return self._size

    def set_max_table_size(self, size: int) -> None:
        """Apply the peer's SETTINGS_HEADER_TABLE_SIZE (we never use more than 4096)."""
        size = min(size, DEFAULT_TABLE_SIZE)
        if size != self._max_size:
            self._max_size = size
            self._evict(size)
            self._pending_size_update = size

    def _evict(self, limit: int) -> None:
        self._indexed.clear()
        while self._size > limit and self._entries:
            _seq, header, entry_size = self._entries.popleft()
            self._size -= entry_size
            del self._index[header]

    def _literal_name(self, name: str) -> bytes:
        """The start of a literal-without-indexing representation for ``name``."""
        prefix = self._name_prefix.get(name)
        if prefix is None:
            idx = _STATIC_NAME.get(name)
            if idx is not None:
                prefix = encode_int(idx, 4, 0x00)
            else:
                prefix = b"\x00" + _encode_str(name.encode("ascii"))
            self._name_prefix[name] = prefix
        return prefix

    def encode(self, headers: Sequence[tuple[str, str]]) -> bytes:
        """The header block for ``headers`` (names already lower-case)."""
        out: list[bytes] = []
        if self._pending_size_update is not None:
            out.append(encode_int(self._pending_size_update, 5, 0x20))
            self._pending_size_update = None
        indexed = self._indexed
        for header in headers:
            rep = indexed.get(header)
            if rep is not None:
                out.append(rep)
                continue
            name, value = header
            if name in _NO_INDEX_NAMES:
                raw = value.encode()
                out.append(self._literal_name(name))
                out.append(encode_int(len(raw), 7, 0) + raw)
                continue
            seq = self._index.get(header)
            if seq is not None:
                rep = indexed[header] = encode_int(_STATIC_LEN + 1 + self._newest - seq, 7, 0x80)
                out.append(rep)
                continue
            static = _STATIC_EXACT.get(header)
            if static is not None:
                rep = indexed[header] = encode_int(static, 7, 0x80)
                out.append(rep)
                continue
            raw = value.encode()
            entry_size = len(name) + len(raw) + ENTRY_OVERHEAD
            if entry_size * 2 > self._max_size:
                out.append(self._literal_name(name))
                out.append(_encode_str(raw))
                continue
            # Literal with incremental indexing; later requests send just the index.
            name_seq = None
            for (n, _v), s in self._index.items():
                if n == name:
                    name_seq = s
            if name_seq is not None:
                out.append(encode_int(_STATIC_LEN + 1 + self._newest - name_seq, 6, 0x40))
            elif name in _STATIC_NAME:
                out.append(encode_int(_STATIC_NAME[name], 6, 0x40))
            else:
                out.append(b"\x40" + _encode_str(name.encode("ascii")))
            out.append(_encode_str(raw))
            self._evict(self._max_size - entry_size)  # also forgets cached indexes
            self._newest += 1
            self._entries.append((self._newest, header, entry_size))
            self._index[header] = self._newest
            self._size += entry_size
        return b"".join(out)


def _entry_size(name: str, value: str) -> int:
    """Octets a header takes in the dynamic table (RFC 7541 §4.1)."""
    return (
        ENTRY_OVERHEAD
        + (len(name) if name.isascii() else len(name.encode()))
        + (len(value) if value.isascii() else len(value.encode()))
    )


class HpackDecoder:
    """Decodes header blocks into lists of (name, value) strings.

    Written for speed on the answers of push providers: one-octet integers and cached
    Huffman strings take an inlined fast path.
    """

    def __init__(self, max_table_size: int = DEFAULT_TABLE_SIZE) -> None:
        self._allowed = max_table_size  # our SETTINGS_HEADER_TABLE_SIZE
        self._max_size = max_table_size
        self._size = 0
        self._table: deque[tuple[str, str, int]] = deque()  # oldest first, newest last
        self._huffman_cache: dict[bytes, str] = {}
        # Whole literal fields (representation octets -> name, value, entry size): servers
        # repeat server, date, content-type... byte for byte in every answer.
        self._field_cache: dict[bytes, tuple[str, str, int]] = {}

    def _get(self, idx: int) -> tuple[str, str]:
        if 0 < idx <= _STATIC_LEN:
            return STATIC_TABLE[idx - 1]
        dyn = idx - _STATIC_LEN
        if idx == 0 or dyn > len(self._table):
            raise HpackError(f"header index {idx} out of range")
        name, value, _size = self._table[-dyn]
        return name, value

    def _add(self, name: str, value: str, size: int) -> None:
        table = self._table
        limit = self._max_size - size
        while table and self._size > limit:
            self._size -= table.popleft()[2]
        if size <= self._max_size:
            table.append((name, value, size))
            self._size += size

    def _string(self, data: bytes, pos: int) -> tuple[str, int]:
        """(decoded string, position after it)."""
        first = data[pos]
        length = first & 0x7F
        if length < 0x7F:
            pos += 1
        else:
            length, pos = _decode_int(data, pos, 7)
        end = pos + length
        if end > len(data):
            raise HpackError("truncated string")
        raw = data[pos:end]
        if not first & 0x80:
            return raw.decode("utf-8", "replace"), end
        text = self._huffman_cache.get(raw)
        if text is None:
            text = huffman_decode(raw).decode("utf-8", "replace")
            if len(self._huffman_cache) >= 1024:
                self._huffman_cache.clear()
            if length < 64:  # long values are rarely repeated
                self._huffman_cache[raw] = text
        return text, end

    def decode(self, data: bytes) -> list[tuple[str, str]]:
        headers: list[tuple[str, str]] = []
        pos = 0
        n = len(data)
        string = self._string
        cache = self._field_cache
        try:
            while pos < n:
                start = pos
                b = data[pos]
                if b & 0x80:  # indexed field
                    idx = b & 0x7F
                    if 0 < idx <= _STATIC_LEN:
                        headers.append(STATIC_TABLE[idx - 1])
                        pos += 1
                    else:
                        idx, pos = _decode_int(data, pos, 7)
                        headers.append(self._get(idx))
                    continue
                if b & 0x40:  # literal with incremental indexing
                    idx = b & 0x3F
                    if idx < 0x3F:
                        pos += 1
                    else:
                        idx, pos = _decode_int(data, pos, 6)
                    add = True
                elif b & 0x20:  # dynamic table size update
                    size, pos = _decode_int(data, pos, 5)
                    if size > self._allowed:
                        raise HpackError(f"table size update {size} above {self._allowed}")
                    self._max_size = size
                    while self._table and self._size > size:
                        self._size -= self._table.popleft()[2]
                    continue
                else:  # literal without indexing / never indexed
                    idx = b & 0x0F
                    if idx < 0x0F:
                        pos += 1
                    else:
                        idx, pos = _decode_int(data, pos, 4)
                    add = False
                if idx > _STATIC_LEN:  # name from the dynamic table: not cacheable
                    name = self._get(idx)[0]
                    value, pos = string(data, pos)
                    headers.append((name, value))
                    if add:
                        self._add(name, value, _entry_size(name, value))
                    continue
                # Find where the field ends, then decode it unless it was seen before.
                end = pos
                if not idx:
                    length = data[end] & 0x7F
                    end = end + 1 + length if length < 0x7F else n + 1
                if end < n:
                    length = data[end] & 0x7F
                    end = end + 1 + length if length < 0x7F else n + 1
                key = data[start:end] if end <= n else b""
                hit = cache.get(key) if key else None
                if hit is not None:
                    name, value, size = hit
                    pos = end
                else:
                    if idx:
                        name = STATIC_TABLE[idx - 1][0]
                    else:
                        name, pos = string(data, pos)
                    value, pos = string(data, pos)
                    size = _entry_size(name, value)
                    if key and pos == end:
                        if len(cache) >= 512:
                            cache.clear()
                        cache[key] = (name, value, size)
                headers.append((name, value))
                if add:
                    self._add(name, value, size)
        except IndexError:
            raise HpackError("truncated header block") from None
        return headers
