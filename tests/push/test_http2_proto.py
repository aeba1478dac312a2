"""Sans-IO HTTP/2 client and HPACK: bytes in, events out, checked against the h2 library."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
import pytest
from hpack.table import HeaderTable

from sipwake.clock import FakeClock
from sipwake.push import h2proto
from sipwake.push.h2proto import (
    ConnectionTerminated,
    GoAwayReceived,
    H2ClientConnection,
    PingAcked,
    PingReceived,
    ResponseReceived,
    SettingsReceived,
    StreamReset,
    frame,
)
from sipwake.push.hpack import STATIC_TABLE, HpackDecoder, HpackEncoder, HpackError

APNS_HEADERS = [
    (":method", "POST"),
    (":scheme", "https"),
    (":authority", "api.push.apple.com"),
    (":path", "/3/device/" + "ab" * 32),
    ("authorization", "bearer " + "j" * 150),
    ("apns-topic", "org.example.app.voip"),
    ("apns-push-type", "voip"),
    ("apns-id", "1c7e3a8e-0000-4000-8000-000000000001"),
]


# --- HPACK -------------------------------------------------------------------------------


def test_static_table_matches_rfc_table_of_hpack_package() -> None:
    assert [(n.decode(), v.decode()) for n, v in HeaderTable.STATIC_TABLE] == list(STATIC_TABLE)


def test_encoder_output_decodes_with_independent_decoder_and_shrinks_after_first_use() -> None:
    enc = HpackEncoder()
    ref = hpack.Decoder()
    sizes = []
    for i in range(3):
        headers = [*APNS_HEADERS[:3], (":path", f"/3/device/{i}"), *APNS_HEADERS[4:]]
        block = enc.encode(headers)
        sizes.append(len(block))
        assert ref.decode(block) == headers
    # Constant headers are indexed once: later blocks carry only path and apns-id literals.
    assert sizes[1] < 80 < sizes[0]
    assert sizes[1] == sizes[2]


def test_encoder_honours_smaller_peer_table_with_size_update() -> None:
    enc = HpackEncoder()
    ref = hpack.Decoder()
    assert ref.decode(enc.encode(APNS_HEADERS)) == APNS_HEADERS
    enc.set_max_table_size(256)
    block = enc.encode(APNS_HEADERS)
    assert block[0] & 0xE0 == 0x20  # starts with a dynamic table size update
    assert ref.decode(block) == APNS_HEADERS
    assert ref.decode(enc.encode(APNS_HEADERS)) == APNS_HEADERS
    assert enc.table_size <= 256


def test_decoder_reads_independent_encoder_output_including_huffman_and_indexing() -> None:
    ref = hpack.Encoder()
    dec = HpackDecoder()
    response = [(":status", "200"), ("apns-id", "abc-123"), ("server", "nginx"), ("x-a", "é")]
    for _ in range(3):
        assert dec.decode(ref.encode(response)) == response


def test_decoder_agrees_with_independent_encoder_over_many_blocks() -> None:
    """Random header lists through one shared table: indexing, eviction, caches, Huffman."""
    import random

    rng = random.Random(3)
    ref = hpack.Encoder()
    dec = HpackDecoder()
    names = ["server", "date", "x-a", "apns-id", "content-type", ":status", "x-long"]
    for _ in range(2000):
        headers = [
            (
                rng.choice(names),
                rng.choice(["1", "nginx", "x" * rng.randrange(300), str(rng.random())]),
            )
            for _ in range(rng.randrange(1, 8))
        ]
        if rng.random() < 0.2:
            block = ref.encode([hpack.NeverIndexedHeaderTuple(n, v) for n, v in headers])
        else:
            block = ref.encode(headers, huffman=rng.random() < 0.7)
        assert dec.decode(block) == headers


@pytest.mark.parametrize(
    "block",
    [b"\xbf", b"\x82\xff\xff\xff\xff\xff\x0f", b"\x40\x05ab", b"\x3f\xe1\x3f"],
    ids=["index-past-table", "huge-integer", "truncated-string", "size-above-setting"],
)
def test_decoder_rejects_malformed_blocks(block: bytes) -> None:
    with pytest.raises(HpackError):
        HpackDecoder().decode(block)


# --- connection, with h2 playing the server ----------------------------------------------


def make_server(**settings: int) -> h2.connection.H2Connection:
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
    )
    codes = {getattr(h2.settings.SettingCodes, k.upper()): v for k, v in settings.items()}
    server.local_settings = h2.settings.Settings(client=False, initial_values=codes or None)
    server.initiate_connection()
    return server


def pair(
    clock: FakeClock | None = None, **kwargs: float
) -> tuple[H2ClientConnection, h2.connection.H2Connection, list[h2.events.Event]]:
    client = H2ClientConnection(clock or FakeClock(), **kwargs)  # type: ignore[arg-type]
    client.initiate()
    server = make_server(max_concurrent_streams=3)
    events = server.receive_data(client.data_to_send())
    client_events = client.receive_data(server.data_to_send())
    assert any(isinstance(e, SettingsReceived) for e in client_events)
    events += server.receive_data(client.data_to_send())
    return client, server, events


def test_preface_disables_push_and_opens_wide_windows() -> None:
    client, server, events = pair()
    remote = next(e for e in events if isinstance(e, h2.events.RemoteSettingsChanged))
    assert remote.changed_settings[h2.settings.SettingCodes.ENABLE_PUSH].new_value == 0
    assert server.remote_settings.initial_window_size >= 1 << 24
    assert server.outbound_flow_control_window > 1 << 25
    assert client.ready
    assert client.available_streams == 3  # the server's MAX_CONCURRENT_STREAMS


def test_request_and_response_round_trip() -> None:
    client, server, _ = pair()
    sid = client.send_request(APNS_HEADERS, b'{"aps":{}}')
    events = server.receive_data(client.data_to_send())
    req = next(e for e in events if isinstance(e, h2.events.RequestReceived))
    assert req.stream_id == sid == 1
    assert list(req.headers) == APNS_HEADERS
    assert b"".join(e.data for e in events if isinstance(e, h2.events.DataReceived)) == (
        b'{"aps":{}}'
    )
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)
    server.send_headers(sid, [(":status", "400"), ("apns-id", "x1")])
    server.send_data(sid, b'{"reason":"BadDeviceToken"}', end_stream=True)
    out = client.receive_data(server.data_to_send())
    assert out == [ResponseReceived(1, 400, {"apns-id": "x1"}, b'{"reason":"BadDeviceToken"}')]
    assert client.open_streams == 0


def test_stream_limit_counts_open_streams_and_frees_on_answer() -> None:
    client, server, _ = pair()
    ids = [client.send_request(APNS_HEADERS) for _ in range(3)]
    assert client.available_streams == 0
    with pytest.raises(RuntimeError):
        client.send_request(APNS_HEADERS)
    server.receive_data(client.data_to_send())
    server.send_headers(ids[0], [(":status", "200")], end_stream=True)
    client.receive_data(server.data_to_send())
    assert client.available_streams == 1


def test_informational_headers_and_trailers_fold_into_one_response() -> None:
    client, server, _ = pair()
    sid = client.send_request(APNS_HEADERS)
    server.receive_data(client.data_to_send())
    server.send_headers(sid, [(":status", "103"), ("link", "x")])
    server.send_headers(sid, [(":status", "200"), ("a", "1")])
    server.send_data(sid, b"body")
    server.send_headers(sid, [("trailer-x", "2")], end_stream=True)
    assert client.receive_data(server.data_to_send()) == [
        ResponseReceived(sid, 200, {"a": "1", "trailer-x": "2"}, b"body")
    ]


def test_refused_stream_is_reported_with_its_code() -> None:
    client, server, _ = pair()
    sid = client.send_request(APNS_HEADERS)
    server.receive_data(client.data_to_send())
    server.reset_stream(sid, error_code=h2proto.REFUSED_STREAM)
    assert client.receive_data(server.data_to_send()) == [StreamReset(sid, h2proto.REFUSED_STREAM)]
    assert client.open_streams == 0


def test_goaway_lists_streams_the_server_did_not_process() -> None:
    client, server, _ = pair()
    ids = [client.send_request(APNS_HEADERS) for _ in range(3)]
    server.receive_data(client.data_to_send())
    server.close_connection(last_stream_id=ids[0])
    events = client.receive_data(server.data_to_send())
    assert events == [GoAwayReceived(ids[0], 0, b"", ids[1:])]
    assert client.available_streams == 0
    assert client.open_streams == 1  # stream 1 may still be answered


def test_server_ping_is_answered() -> None:
    client, server, _ = pair()
    server.ping(b"12345678")
    assert client.receive_data(server.data_to_send()) == [PingReceived(b"12345678")]
    events = server.receive_data(client.data_to_send())
    assert [e.ping_data for e in events if isinstance(e, h2.events.PingAckReceived)] == [
        b"12345678"
    ]


def test_keepalive_ping_after_idle_interval_and_dead_peer_detection() -> None:
    clock = FakeClock()
    client, server, _ = pair(clock, ping_interval=30.0, ping_timeout=5.0)
    assert client.next_deadline() == clock.monotonic() + 30.0
    clock.advance(29.0)
    assert client.tick() == [] and client.data_to_send() == b""
    clock.advance(1.0)
    assert client.tick() == []
    events = server.receive_data(client.data_to_send())
    ping = next(e for e in events if isinstance(e, h2.events.PingReceived))
    clock.advance(0.25)
    assert client.receive_data(server.data_to_send()) == [PingAcked(ping.ping_data, 0.25)]
    # Next round: the server stays silent.
    clock.advance(30.0)
    client.tick()
    assert client.data_to_send()[3] == h2proto.PING
    clock.advance(5.0)
    assert isinstance(client.tick()[0], ConnectionTerminated)
    assert client.available_streams == 0


def test_receive_windows_are_replenished_for_large_bodies() -> None:
    client, server, _ = pair(receive_window=65_535, connection_window=131_072)
    sid = client.send_request(APNS_HEADERS)
    server.receive_data(client.data_to_send())
    server.send_headers(sid, [(":status", "200")])
    body = bytes(range(256)) * 1024  # 256 KiB: four times the stream window
    sent = 0
    result: list[h2proto.Event] = []
    while sent < len(body):
        window = server.local_flow_control_window(sid)
        assert window > 0, "client stopped granting window"
        chunk = body[sent : sent + min(window, server.max_outbound_frame_size)]
        sent += len(chunk)
        server.send_data(sid, chunk, end_stream=sent == len(body))
        result += client.receive_data(server.data_to_send())
        server.receive_data(client.data_to_send())
    assert result == [ResponseReceived(sid, 200, {}, body)]


def test_request_body_waits_for_send_window() -> None:
    client = H2ClientConnection(FakeClock())
    client.initiate()
    server = make_server(initial_window_size=1000)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    body = b"x" * 5000
    sid = client.send_request(APNS_HEADERS, body)
    got = bytearray()
    ended = False
    for _ in range(20):
        for ev in server.receive_data(client.data_to_send()):
            if isinstance(ev, h2.events.DataReceived):
                got += ev.data
                server.acknowledge_received_data(ev.flow_controlled_length, sid)
            ended = ended or isinstance(ev, h2.events.StreamEnded)
        client.receive_data(server.data_to_send())
        if ended:
            break
    assert ended and bytes(got) == body


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (frame(h2proto.DATA, 0, 1, b"x" * 20_000), h2proto.FRAME_SIZE_ERROR),
        (frame(h2proto.HEADERS, 4, 1, b"\xbf"), h2proto.COMPRESSION_ERROR),
        (frame(h2proto.PUSH_PROMISE, 4, 1, b"\x00\x00\x00\x02\x88"), h2proto.PROTOCOL_ERROR),
        (frame(h2proto.CONTINUATION, 4, 1, b"\x88"), h2proto.PROTOCOL_ERROR),
        (frame(h2proto.SETTINGS, 0, 0, b"\x00\x05\x00\x00\x00\x01"), h2proto.PROTOCOL_ERROR),
    ],
    ids=["oversized-frame", "bad-hpack", "push-promise", "stray-continuation", "bad-frame-size"],
)
def test_protocol_errors_end_the_connection_with_goaway(data: bytes, code: int) -> None:
    client, _server, _ = pair()
    client.send_request(APNS_HEADERS)
    client.data_to_send()
    events = client.receive_data(data)
    assert isinstance(events[-1], ConnectionTerminated) and events[-1].error_code == code
    out = client.data_to_send()
    assert out[3] == h2proto.GOAWAY and int.from_bytes(out[13:17], "big") == code
    assert client.available_streams == 0


def test_frames_split_across_reads_are_reassembled() -> None:
    client, server, _ = pair()
    sid = client.send_request(APNS_HEADERS)
    server.receive_data(client.data_to_send())
    server.send_headers(sid, [(":status", "200"), ("apns-id", "z")], end_stream=True)
    data = server.data_to_send()
    events: list[h2proto.Event] = []
    for i in range(len(data)):
        events += client.receive_data(data[i : i + 1])
    assert events == [ResponseReceived(sid, 200, {"apns-id": "z"}, b"")]


def test_large_header_block_uses_continuation_frames() -> None:
    client, server, _ = pair()
    headers = [*APNS_HEADERS, ("x-big", "v" * 40_000)]
    client.send_request(headers)
    events = server.receive_data(client.data_to_send())
    req = next(e for e in events if isinstance(e, h2.events.RequestReceived))
    assert dict(req.headers)["x-big"] == "v" * 40_000


def test_huffman_decoder_matches_rfc_code_table_and_rejects_bad_padding() -> None:
    import random

    from hpack.huffman import HuffmanEncoder
    from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

    from sipwake.push.hpack import huffman_decode

    encoder = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
    rng = random.Random(7)
    for _ in range(500):
        text = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        assert huffman_decode(encoder.encode(text)) == text
    uuid_code = encoder.encode(b"123e4567-e89b-12d3-a456-426614174000")
    with pytest.raises(HpackError, match="padding"):
        huffman_decode(uuid_code[:-1] + bytes([uuid_code[-1] & 0xF0]))  # zero padding
    with pytest.raises(HpackError, match="padding"):
        huffman_decode(uuid_code + b"\xff")  # more than 7 bits of padding
    with pytest.raises(HpackError, match="EOS"):
        huffman_decode(b"\xff\xff\xff\xff")


def test_non_ascii_digit_status_is_a_stream_error_not_an_exception() -> None:
    client, server, _ = pair()
    sid = client.send_request(APNS_HEADERS)
    server.receive_data(client.data_to_send())
    # h2 validates :status; an HPACK block is encoded by hand to get "²" through.
    block = hpack.Encoder().encode([(":status", "2²0")])
    data = frame(h2proto.HEADERS, h2proto.FLAG_END_HEADERS | h2proto.FLAG_END_STREAM, sid, block)
    assert client.receive_data(data) == [StreamReset(sid, h2proto.PROTOCOL_ERROR)]
    assert client.open_streams == 0 and not client.closed


def test_probe_pings_at_once_and_ends_the_connection_after_its_short_timeout() -> None:
    clock = FakeClock()
    client, server, _ = pair(clock, ping_interval=60.0, ping_timeout=20.0)
    client.probe(2.0)
    events = server.receive_data(client.data_to_send())
    assert any(isinstance(e, h2.events.PingReceived) for e in events)
    assert client.next_deadline() == clock.monotonic() + 2.0
    clock.advance(1.0)
    client.probe(2.0)  # a second probe never extends the first one's deadline
    assert client.data_to_send() == b""
    clock.advance(1.0)
    assert isinstance(client.tick()[0], ConnectionTerminated)
    assert client.available_streams == 0


def test_answered_probe_keeps_the_connection() -> None:
    clock = FakeClock()
    client, server, _ = pair(clock, ping_interval=60.0, ping_timeout=20.0)
    client.probe(2.0)
    server.receive_data(client.data_to_send())
    assert isinstance(client.receive_data(server.data_to_send())[0], PingAcked)
    clock.advance(5.0)
    assert client.tick() == [] and client.available_streams == 3
