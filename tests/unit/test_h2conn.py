"""The one change tether makes to hyperframe's behaviour, and that HTTP/2
semantics survive it (two in-memory h2 connections, CONNECT + DATA both ways), and
the two RFC 9113 stream-error corrections of _H2Connection."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame
import pytest

import agent.tunnel.h2conn  # noqa: F401  (installs the DataFrame repr)


def test_data_frame_repr_does_not_serialize_the_payload() -> None:
    f = hyperframe.frame.DataFrame(1, data=b"x" * (1 << 20))
    assert repr(f).endswith("<1048576 bytes>")
    assert len(repr(f)) < 100


def test_h2_connect_and_data_round_trip_with_the_patch() -> None:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    s = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    c.initiate_connection()
    s.initiate_connection()
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    c.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    payload = bytes(range(256)) * 64
    c.send_data(1, payload)
    got = b""
    for ev in s.receive_data(c.data_to_send()):
        if isinstance(ev, h2.events.DataReceived):
            got += ev.data
            s.acknowledge_received_data(ev.flow_controlled_length, 1)
    assert got == payload
    s.send_headers(1, [(":status", "200")])
    events = c.receive_data(s.data_to_send())
    assert any(isinstance(e, h2.events.ResponseReceived) for e in events)


def _pair() -> tuple[h2.connection.H2Connection, h2.connection.H2Connection]:
    from agent.tunnel.h2conn import _H2Connection

    # The client does not validate what it sends, as a hostile or buggy peer would not.
    c = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=True, validate_outbound_headers=False, normalize_outbound_headers=False
        )
    )
    s = _H2Connection(h2.config.H2Configuration(client_side=False))
    c.initiate_connection()
    s.initiate_connection()
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    return c, s


GOOD = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]
MALFORMED = {
    "missing :authority": [(":method", "CONNECT")],
    "CONNECT with :path": [*GOOD, (":path", "/")],
    "duplicate :authority": [*GOOD, (":authority", "10.0.0.1:80")],
    "uppercase field name": [*GOOD, ("X-Up", "1")],
    "connection-specific field": [*GOOD, ("connection", "close")],
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_request_is_a_stream_error_not_a_connection_error(name: str) -> None:
    """RFC 9113 §8.1.1: a malformed request is a stream error.  Unpatched h2
    raised ProtocolError for the connection, which would end every other
    stream on it.  The stream is reset (PROTOCOL_ERROR), the request never
    reaches the application, the stream opened before it keeps its data
    flowing, and the next request on the connection is served; the header
    table stays in step (the good request after it reuses indexed fields)."""
    c, s = _pair()
    c.send_headers(1, GOOD)
    c.send_headers(3, MALFORMED[name])
    c.send_headers(5, GOOD)
    c.send_data(1, b"before")
    events = s.receive_data(c.data_to_send())
    requests = [e.stream_id for e in events if isinstance(e, h2.events.RequestReceived)]
    assert requests == [1, 5], events
    got = [e.data for e in events if isinstance(e, h2.events.DataReceived)]
    assert got == [b"before"]
    back = c.receive_data(s.data_to_send())
    resets = {e.stream_id: e.error_code for e in back if isinstance(e, h2.events.StreamReset)}
    assert resets == {3: h2.errors.ErrorCodes.PROTOCOL_ERROR}, back
    assert not [e for e in back if isinstance(e, h2.events.ConnectionTerminated)], back
    # both good streams still work both ways
    for sid in (1, 5):
        s.send_headers(sid, [(":status", "200")])
        s.send_data(sid, b"reply")
    back = c.receive_data(s.data_to_send())
    assert sorted(e.stream_id for e in back if isinstance(e, h2.events.ResponseReceived)) == [1, 5]


def test_undecodable_header_block_stays_a_connection_error() -> None:
    """A header block HPACK cannot decode leaves the two header tables out of
    step: that must end the connection (COMPRESSION_ERROR), not one stream."""
    c, s = _pair()
    c.send_headers(1, GOOD)
    s.receive_data(c.data_to_send())
    frame = hyperframe.frame.HeadersFrame(3)
    frame.data = b"\xff\xff\xff\xff\xff\x7f"  # an indexed field far past any table
    frame.flags.add("END_HEADERS")
    with pytest.raises(h2.exceptions.ProtocolError):
        s.receive_data(frame.serialize())


def test_malformed_response_keeps_h2s_connection_error_on_the_client_side() -> None:
    """Only inbound requests are turned into stream errors: a client-side
    connection (whose streams the agent is waiting on) keeps h2's handling."""
    from agent.tunnel.h2conn import _H2Connection

    c = _H2Connection(h2.config.H2Configuration(client_side=True))
    s = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=False, validate_outbound_headers=False, normalize_outbound_headers=False
        )
    )
    c.initiate_connection()
    s.initiate_connection()
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    c.send_headers(1, GOOD)
    s.receive_data(c.data_to_send())
    s.send_headers(1, [(":status", "200"), ("X-Up", "1")])
    with pytest.raises(h2.exceptions.ProtocolError):
        c.receive_data(s.data_to_send())


def _settle(a: h2.connection.H2Connection, b: h2.connection.H2Connection) -> None:
    for _ in range(4):
        b.receive_data(a.data_to_send())
        a.receive_data(b.data_to_send())


@pytest.mark.parametrize("ours", ["sender", "receiver", "both"])
@pytest.mark.parametrize("piece", [1, 7, 9, 4096, 65536, 1 << 20])
def test_data_bytes_unchanged_through_the_copy_free_paths(ours: str, piece: int) -> None:
    """The sender's header + payload pieces (chunks_to_send) and the receiver's
    view-parsing frame buffer carry every byte unchanged, against stock h2 on
    the other side, frames of every size around JOIN_BELOW and the frame
    limit, END_STREAM, and the wire fed in pieces that split headers and
    payloads anywhere (length and sha256 checked)."""
    import hashlib
    import random

    from agent.tunnel.h2conn import JOIN_BELOW, MAX_FRAME, _H2Connection

    def conn(client: bool, mine: bool) -> h2.connection.H2Connection:
        cfg = h2.config.H2Configuration(client_side=client)
        return _H2Connection(cfg) if mine else h2.connection.H2Connection(cfg)

    c = conn(True, ours in ("sender", "both"))
    s = conn(False, ours in ("receiver", "both"))
    for x in (c, s):
        x.initiate_connection()
        x.update_settings(
            {
                h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 30,
            }
        )
        x.increment_flow_control_window((1 << 30) - 65535)
    _settle(c, s)
    c.send_headers(1, GOOD)
    rnd = random.Random(piece)
    sizes = [1, JOIN_BELOW - 1, JOIN_BELOW, JOIN_BELOW + 1, 100_000, MAX_FRAME, 3]
    sent = hashlib.sha256()
    total = 0
    for n in sizes:
        data = rnd.randbytes(n)
        sent.update(data)
        total += n
        c.send_data(1, data, end_stream=n == sizes[-1])
    wire = c.data_to_send() if ours == "receiver" else b"".join(c.chunks_to_send())  # type: ignore[attr-defined]
    got = hashlib.sha256()
    n_got = 0
    ended = False
    for i in range(0, len(wire), piece):
        for ev in s.receive_data(wire[i : i + piece]):
            if isinstance(ev, h2.events.DataReceived):
                assert ev.data is not None
                got.update(ev.data)
                n_got += len(ev.data)
            ended = ended or isinstance(ev, h2.events.StreamEnded)
    assert (n_got, got.hexdigest()) == (total, sent.hexdigest())
    assert ended


def test_data_to_send_with_an_amount_keeps_the_rest_in_order() -> None:
    from agent.tunnel.h2conn import JOIN_BELOW, _H2Connection

    c = _H2Connection(h2.config.H2Configuration(client_side=True))
    c.initiate_connection()
    s = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    s.initiate_connection()
    _settle(c, s)
    c.send_headers(1, GOOD)
    c.send_data(1, b"a" * JOIN_BELOW)
    c.send_data(1, b"b" * 10, end_stream=True)
    wire = c.data_to_send(5) + c.data_to_send(7) + c.data_to_send()
    assert c.data_to_send() == b""
    got = b"".join(
        ev.data or b"" for ev in s.receive_data(wire) if isinstance(ev, h2.events.DataReceived)
    )
    assert got == b"a" * JOIN_BELOW + b"b" * 10


def test_request_headers_go_out_without_huffman_and_unique_ones_unindexed() -> None:
    """tether's HPACK: no Huffman coding (optional per string, RFC 7541
    §5.2; pure Python per character in hpack), and the values new on every
    request (traceparent, forwarded) never enter the dynamic table, so the
    repeating ones (CONNECT, authority, baggage) stay indexed.  A stock h2 peer
    decodes every request exactly."""
    import asyncio
    import socket

    from agent.tunnel.h2conn import H2Conn
    from agent.tunnel.hbone import request_headers

    async def main() -> None:
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        _, conn = await loop.connect_accepted_socket(lambda: H2Conn(client=True), a)
        peer = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        peer.initiate_connection()
        b.sendall(peer.data_to_send())
        b.setblocking(False)
        await asyncio.wait_for(conn.ready, 3)
        sent = []
        for i in range(40):
            hdrs = request_headers(
                "10.1.2.3:7000", ("10.1.1.1", 40000 + i), namespace="mesh", workload="client"
            )
            sent.append([tuple(h) for h in hdrs])
            conn.open_stream(hdrs)
        await asyncio.sleep(0.05)
        raw = b""
        while True:
            try:
                chunk = b.recv(1 << 20)
            except BlockingIOError:
                break
            raw += chunk
        got = [
            [tuple(h) for h in ev.headers]
            for ev in peer.receive_data(raw)
            if isinstance(ev, h2.events.RequestReceived)
        ]
        assert got == sent
        trace = dict(sent[-1])["traceparent"]
        assert trace.encode() in raw, "a literal was Huffman-coded"
        names = {n for n, _ in peer.decoder.header_table.dynamic_entries}
        assert names == {b":method", b":authority", b"baggage"}, names  # CONNECT is not static
        conn.close()
        b.close()

    asyncio.run(main())


def test_consumed_bytes_are_handed_back_early_not_after_half_a_window() -> None:
    """A sender with a burst ready gets its window back once ACK_FIRST bytes
    are consumed (a window's first refresh), not after half a 4 MiB window
    (h2's rule, kept for later refreshes): a response a little over the
    window then never waits for us, which Envoy punishes by discarding it
    when its inner connection closes.  The bytes handed back are exactly
    those acknowledged, for the stream and the connection."""
    from agent.tunnel.h2conn import ACK_FIRST, STREAM_WINDOW, _H2Connection

    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    s = _H2Connection(h2.config.H2Configuration(client_side=False))
    c.initiate_connection()
    s.initiate_connection()
    s.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW})
    s.increment_flow_control_window(4 * STREAM_WINDOW - 65535)
    _settle(c, s)
    c.send_headers(1, GOOD)
    assert c.local_flow_control_window(1) == STREAM_WINDOW
    frame = 4096

    def send_and_consume(n: int) -> list[h2.events.WindowUpdated]:
        for i in range(0, n, frame):
            c.send_data(1, b"x" * min(frame, n - i))
        for ev in s.receive_data(c.data_to_send()):
            if isinstance(ev, h2.events.DataReceived):
                s.acknowledge_received_data(ev.flow_controlled_length, 1)
        events = c.receive_data(s.data_to_send())
        return [e for e in events if isinstance(e, h2.events.WindowUpdated)]

    half = STREAM_WINDOW // 2
    for threshold, ids in ((ACK_FIRST, [0, 1]), (half, [1]), (half, [1])):
        sent = 0
        while sent + frame < threshold:
            assert send_and_consume(frame) == [], (threshold, sent)  # nothing handed back yet
            sent += frame
        updates = send_and_consume(threshold - sent)
        assert sorted((u.stream_id, u.delta) for u in updates) == [(i, threshold) for i in ids]
        assert c.local_flow_control_window(1) == STREAM_WINDOW  # all of it back, no more
    # the same for data held and acknowledged later (an app that was not reading)
    for _ in range(half // frame):
        c.send_data(1, b"y" * frame)
    held = sum(
        ev.flow_controlled_length
        for ev in s.receive_data(c.data_to_send())
        if isinstance(ev, h2.events.DataReceived)
    )
    assert c.local_flow_control_window(1) == STREAM_WINDOW - half
    s.acknowledge_received_data(held, 1)
    c.receive_data(s.data_to_send())
    assert c.local_flow_control_window(1) == STREAM_WINDOW
