"""The sans-IO HTTP/2 server connection, driven in memory by an h2 client (no sockets)."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import h2.settings

from sipwake.simulator.h2server import Http2ServerConnection


def pair(
    settings: dict[int, int] | None = None,
) -> tuple[h2.connection.H2Connection, Http2ServerConnection, list[object]]:
    server = Http2ServerConnection(max_concurrent_streams=10)
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding="utf-8")
    )
    client.initiate_connection()
    if settings:
        client.update_settings(settings)
    assert server.receive_data(client.data_to_send()) == []
    events = list(client.receive_data(server.data_to_send()))
    server.receive_data(client.data_to_send())  # settings acks
    return client, server, events


def request(client: h2.connection.H2Connection, body: bytes = b"{}") -> int:
    sid = client.get_next_available_stream_id()
    client.send_headers(
        sid,
        [(":method", "POST"), (":scheme", "https"), (":authority", "x"), (":path", "/p")],
    )
    client.send_data(sid, body, end_stream=True)
    return sid


def test_advertises_max_concurrent_streams() -> None:
    _, _, events = pair()
    [changed] = [e for e in events if isinstance(e, h2.events.RemoteSettingsChanged)]
    setting = changed.changed_settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS]
    assert setting.new_value == 10


def test_goaway_waits_for_answers_and_drops_higher_streams() -> None:
    client, server, _ = pair()
    sids = [request(client, b"%d" % i) for i in range(3)]
    reqs = server.receive_data(client.data_to_send())
    assert [(r.stream_id, r.body) for r in reqs] == [(1, b"0"), (3, b"1"), (5, b"2")]

    server.goaway(3)
    server.respond(1, 200, [], b"")
    events = client.receive_data(server.data_to_send())
    assert not any(isinstance(e, h2.events.ConnectionTerminated) for e in events)
    assert not server.finished  # stream 3 still owes an answer

    server.respond(3, 400, [("content-type", "application/json")], b'{"reason":"X"}')
    server.respond(5, 200, [], b"")  # above last_stream_id: never answered
    events = client.receive_data(server.data_to_send())
    kinds = [type(e).__name__ for e in events]
    assert kinds.index("ResponseReceived") < kinds.index("ConnectionTerminated")
    [goaway] = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway.last_stream_id == 3
    assert [e.stream_id for e in events if isinstance(e, h2.events.ResponseReceived)] == [3]
    assert server.finished
    assert sids == [1, 3, 5]


def test_invalid_utf8_in_headers_is_delivered_replaced_not_raised() -> None:
    client, server, _ = pair()
    hdrs = [(":method", "POST"), (":scheme", "https"), (":authority", "x")]
    client.send_headers(1, [*hdrs, (":path", b"/3/device/\xff"), ("x", b"\xc3(")], end_stream=True)
    [req] = server.receive_data(client.data_to_send())
    assert req.header(":path") == "/3/device/\ufffd"
    assert req.header("x") == "\ufffd("


def test_response_body_respects_the_client_window() -> None:
    client, server, _ = pair({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 4})
    request(client)
    [req] = server.receive_data(client.data_to_send())
    server.respond(req.stream_id, 200, [], b"0123456789")
    got = b""
    for _ in range(5):
        for ev in client.receive_data(server.data_to_send()):
            if isinstance(ev, h2.events.DataReceived):
                got += ev.data
                client.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        server.receive_data(client.data_to_send())  # window updates
    assert got == b"0123456789"
    assert req.stream_id not in server.open_streams
