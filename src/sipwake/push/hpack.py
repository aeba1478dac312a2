"""HPACK (RFC 7541) for sipwake's HTTP/2 client, tuned for pushes.

A push connection sends the same method, scheme, authority, topic and authorization on
every request: the encoder puts those in the dynamic table once and then sends a one-byte
index for each, so only the path and per-push headers travel as literals. The encoder never
Huffman-codes (smaller CPU cost; allowed by the RFC). The decoder is complete; it borrows
the Huffman decoder of the ``hpack`` package and caches decoded strings, since servers
repeat most response header values.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from hpack.huffman_table import decode_huffman


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
        index = self._index
        for header in headers:
            seq = index.get(header)
            if seq is not None:
                out.append(encode_int(_STATIC_LEN + 1 + self._newest - seq, 7, 0x80))
                continue
            static = _STATIC_EXACT.get(header)
            if static is not None:
                out.append(encode_int(static, 7, 0x80))
                continue
            name, value = header
            raw = value.encode()
            entry_size = len(name) + len(raw) + ENTRY_OVERHEAD
            if name in _NO_INDEX_NAMES or entry_size * 2 > self._max_size:
                out.append(self._literal_name(name))
                out.append(_encode_str(raw))
                continue
            # Literal with incremental indexing; later requests send just the index.
            name_seq = None
            for (n, _v), s in index.items():
                if n == name:
                    name_seq = s
            if name_seq is not None:
                out.append(encode_int(_STATIC_LEN + 1 + self._newest - name_seq, 6, 0x40))
            elif name in _STATIC_NAME:
                out.append(encode_int(_STATIC_NAME[name], 6, 0x40))
            else:
                out.append(b"\x40" + _encode_str(name.encode("ascii")))
            out.append(_encode_str(raw))
            self._evict(self._max_size - entry_size)
            self._newest += 1
            self._entries.append((self._newest, header, entry_size))
            self._index[header] = self._newest
            self._size += entry_size
        return b"".join(out)


class HpackDecoder:
    """Decodes header blocks into lists of (name, value) strings."""

    def __init__(self, max_table_size: int = DEFAULT_TABLE_SIZE) -> None:
        self._allowed = max_table_size  # our SETTINGS_HEADER_TABLE_SIZE
        self._max_size = max_table_size
        self._size = 0
        self._table: deque[tuple[str, str, int]] = deque()  # newest first
        self._huffman_cache: dict[bytes, str] = {}

    def _get(self, idx: int) -> tuple[str, str]:
        if 0 < idx <= _STATIC_LEN:
            return STATIC_TABLE[idx - 1]
        dyn = idx - _STATIC_LEN - 1
        if idx == 0 or dyn >= len(self._table):
            raise HpackError(f"header index {idx} out of range")
        name, value, _size = self._table[dyn]
        return name, value

    def _add(self, name: str, value: str, size: int) -> None:
        while self._table and self._size + size > self._max_size:
            self._size -= self._table.pop()[2]
        if size <= self._max_size:
            self._table.appendleft((name, value, size))
            self._size += size

    def _string(self, data: bytes, pos: int) -> tuple[str, int, int]:
        """(decoded string, new position, length in octets once decoded)."""
        huffman = data[pos] & 0x80
        length, pos = _decode_int(data, pos, 7)
        end = pos + length
        if end > len(data):
            raise HpackError("truncated string")
        raw = data[pos:end]
        if not huffman:
            return raw.decode("utf-8", "replace"), end, length
        cached = self._huffman_cache.get(raw)
        if cached is None:
            try:
                decoded = decode_huffman(raw)
            except Exception as exc:  # the hpack package raises its own error types
                raise HpackError(f"bad Huffman string: {exc}") from None
            cached = decoded.decode("utf-8", "replace")
            if len(self._huffman_cache) > 2048:
                self._huffman_cache.clear()
            self._huffman_cache[raw] = cached
        return cached, end, len(cached.encode())

    def decode(self, data: bytes) -> list[tuple[str, str]]:
        headers: list[tuple[str, str]] = []
        pos = 0
        n = len(data)
        try:
            while pos < n:
                b = data[pos]
                if b & 0x80:  # indexed field
                    idx, pos = _decode_int(data, pos, 7)
                    headers.append(self._get(idx))
                    continue
                if b & 0x40:  # literal with incremental indexing
                    idx, pos = _decode_int(data, pos, 6)
                    add = True
                elif b & 0x20:  # dynamic table size update
                    size, pos = _decode_int(data, pos, 5)
                    if size > self._allowed:
                        raise HpackError(f"table size update {size} above {self._allowed}")
                    self._max_size = size
                    while self._table and self._size > size:
                        self._size -= self._table.pop()[2]
                    continue
                else:  # literal without indexing / never indexed
                    idx, pos = _decode_int(data, pos, 4)
                    add = False
                if idx:
                    name = self._get(idx)[0]
                    name_len = len(name.encode())
                else:
                    name, pos, name_len = self._string(data, pos)
                value, pos, value_len = self._string(data, pos)
                headers.append((name, value))
                if add:
                    self._add(name, value, name_len + value_len + ENTRY_OVERHEAD)
        except IndexError:
            raise HpackError("truncated header block") from None
        return headers
