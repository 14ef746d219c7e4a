"""The DATA fast path of agent.tunnel.h2conn._H2Connection, checked against
h2 itself: every scenario runs twice, with the fast path on and off (h2 as
shipped), on the same raw bytes from a peer that does not police what it
sends, and must give the same events, the same bytes on the wire, the same
flow-control windows and the same errors.  What the fast path may never do
is accept what h2 would refuse."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import hyperframe.frame
import pytest

from agent.tunnel import h2conn

CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]


@pytest.fixture(params=[True, False], ids=["fast", "h2"])
def fast(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[bool]:
    monkeypatch.setattr(h2conn, "FAST_DATA", request.param)
    yield request.param


def _peer(client: bool) -> h2.connection.H2Connection:
    """Plain h2, validating nothing it sends (as a hostile peer would not)."""
    return h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=client, validate_outbound_headers=False, normalize_outbound_headers=False
        )
    )


def _ours(client: bool) -> h2conn._H2Connection:
    return h2conn._H2Connection(h2.config.H2Configuration(client_side=client))


def _pair(ours_client: bool = False) -> tuple[Any, Any]:
    """(peer, ours), settings exchanged; the tunnel's windows on our side."""
    peer, ours = _peer(not ours_client), _ours(ours_client)
    peer.initiate_connection()
    ours.initiate_connection()
    ours.update_settings(
        {
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: h2conn.STREAM_WINDOW,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: h2conn.MAX_FRAME,
        }
    )
    ours.increment_flow_control_window(h2conn.CONN_WINDOW - 65535)
    for _ in range(3):
        ours.receive_data(peer.data_to_send())
        peer.receive_data(ours.data_to_send())
    return peer, ours


def _events(evs: list[h2.events.Event]) -> list[tuple[Any, ...]]:
    out = []
    for e in evs:
        data = getattr(e, "data", None)
        out.append(
            (
                type(e).__name__,
                getattr(e, "stream_id", None),
                bytes(data) if data is not None else None,
                getattr(e, "flow_controlled_length", None),
                getattr(e, "error_code", None),
            )
        )
    return out


def _windows(c: Any, sid: int) -> tuple[int, ...]:
    st = c.streams.get(sid)
    return (
        c.outbound_flow_control_window,
        c._inbound_flow_control_window_manager.current_window_size,
        st.outbound_flow_control_window if st else -1,
        st._inbound_window_manager.current_window_size if st else -1,
        st._actual_content_length if st else -1,
    )


def _data(sid: int, payload: bytes, flags: tuple[str, ...] = (), pad: int = 0) -> bytes:
    f = hyperframe.frame.DataFrame(sid, data=payload)
    for fl in flags:
        f.flags.add(fl)
    if pad:
        f.flags.add("PADDED")
        f.pad_length = pad
    return bytes(f.serialize())


def _run(script: Callable[[Any, Any], Any]) -> dict[bool, Any]:
    """`script(peer, ours)` under both settings of FAST_DATA: what it returns
    (or the exception type and text it raised), plus what ours put on the wire."""
    results = {}
    saved = h2conn.FAST_DATA
    try:
        for on in (True, False):
            h2conn.FAST_DATA = on
            peer, ours = _pair()
            try:
                r: Any = script(peer, ours)
            except Exception as e:  # compared below: the same error both ways
                r = ("raised", type(e).__name__, str(e))
            if isinstance(r, list):
                r = _events(r)
            results[on] = (r, ours.data_to_send())
    finally:
        h2conn.FAST_DATA = saved
    return results


def _same(script: Callable[[Any, Any], Any]) -> Any:
    r = _run(script)
    assert r[True] == r[False]
    return r[True][0]


def test_bytes_events_and_windows_match_h2_over_a_long_exchange() -> None:
    """Many sizes both ways, each piece fed to ours in odd-sized slices (frames
    split across reads), every DataReceived acknowledged as the tunnel does."""

    def script(peer: Any, ours: Any) -> Any:
        peer.send_headers(1, CONNECT)
        ours.receive_data(peer.data_to_send())
        ours.send_headers(1, [(":status", "200")])
        peer.receive_data(ours.data_to_send())
        rnd = os.urandom(1 << 17)
        log: list[Any] = []
        sent = received = b""
        for i, n in enumerate((1, 7, 1024, 16383, 16384, 70000, 1 << 17, 3, 0)):
            piece = rnd[:n]
            if n:
                peer.send_data(1, piece)
                sent += piece
            wire = peer.data_to_send()
            evs = []
            step = 1 + i * 997
            for k in range(0, len(wire), step):
                evs += ours.receive_data(wire[k : k + step])
            for e in evs:
                if isinstance(e, h2.events.DataReceived):
                    received += bytes(e.data)
                    ours.acknowledge_received_data(e.flow_controlled_length, 1)
            log.append((_events(evs), _windows(ours, 1)))
            if n:
                ours.send_data(1, piece)  # ours echoes: its send path too
            log.append(_events(peer.receive_data(ours.data_to_send())))
            log.append(_windows(peer, 1))
        assert received == sent
        return log

    _same(script)


def test_data_beyond_the_stream_window_is_h2s_flow_control_error() -> None:
    def script(peer: Any, ours: Any) -> Any:
        peer.send_headers(1, CONNECT)
        ours.receive_data(peer.data_to_send())
        ours.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 100})
        peer.receive_data(ours.data_to_send())
        ours.receive_data(peer.data_to_send())
        ours.receive_data(_data(1, b"x" * 100))
        return ours.receive_data(_data(1, b"y"))  # one byte past the window

    r = _same(script)
    assert r[0] == "raised" and r[1] == "FlowControlError", r


def test_data_beyond_the_connection_window_is_h2s_flow_control_error() -> None:
    def script(peer: Any, ours: Any) -> Any:
        peer.send_headers(1, CONNECT)
        peer.send_headers(3, CONNECT)
        ours.receive_data(peer.data_to_send())
        chunk = b"z" * (h2conn.STREAM_WINDOW // 4)
        for _ in range(4):
            for sid in (1, 3):
                ours.receive_data(_data(sid, chunk))
        # 2 x STREAM_WINDOW received, CONN_WINDOW is 16 MiB: open more streams
        for sid in (5, 7):
            peer.send_headers(sid, CONNECT)
            ours.receive_data(peer.data_to_send())
            for _ in range(4):
                ours.receive_data(_data(sid, chunk))
        return ours.receive_data(_data(5, b"!"))

    r = _same(script)
    assert r[0] == "raised" and r[1] == "FlowControlError", r


@pytest.mark.parametrize(
    "case",
    [
        "unknown stream",
        "stream 0",
        "during a header block",
        "after END_STREAM",
        "after reset",
        "before the response (client side)",
    ],
)
def test_refused_data_is_refused_the_same_way(case: str) -> None:
    def script(peer: Any, ours: Any) -> Any:
        peer.send_headers(1, CONNECT)
        ours.receive_data(peer.data_to_send())
        if case == "unknown stream":
            return ours.receive_data(_data(9, b"hello"))
        if case == "stream 0":
            return ours.receive_data(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00!")
        if case == "during a header block":
            h = hyperframe.frame.HeadersFrame(3)
            h.data = b"\x82"  # no END_HEADERS: only CONTINUATION may follow
            return ours.receive_data(bytes(h.serialize()) + _data(1, b"x"))
        if case == "after END_STREAM":
            ours.receive_data(_data(1, b"last", ("END_STREAM",)))
            return ours.receive_data(_data(1, b"more"))
        if case == "after reset":
            ours.reset_stream(1)
            return ours.receive_data(_data(1, b"late"))
        raise AssertionError(case)

    if case == "before the response (client side)":
        # our client's stream has sent CONNECT; the server sends DATA before HEADERS
        results = {}
        for on in (True, False):
            h2conn.FAST_DATA = on
            try:
                peer, ours = _pair(ours_client=True)
                ours.send_headers(1, CONNECT)
                peer.receive_data(ours.data_to_send())
                try:
                    r: Any = _events(ours.receive_data(_data(1, b"early")))
                except Exception as e:
                    r = ("raised", type(e).__name__)
                results[on] = r
            finally:
                h2conn.FAST_DATA = True
        assert results[True] == results[False]
        assert results[True][0] == "raised", results
        return
    r = _same(script)  # the same error, or the same RST_STREAM on the wire
    assert r[:1] == ("raised",) or not any(e[0] == "DataReceived" for e in r), r


def test_padded_and_end_stream_data_take_h2s_path_with_the_same_result() -> None:
    def script(peer: Any, ours: Any) -> Any:
        peer.send_headers(1, CONNECT)
        ours.receive_data(peer.data_to_send())
        a = _events(ours.receive_data(_data(1, b"padded", pad=9)))
        b = _events(ours.receive_data(_data(1, b"end", ("END_STREAM",))))
        return a, b, _windows(ours, 1)

    (a, b, _w) = _same(script)
    assert a[0][:4] == ("DataReceived", 1, b"padded", 16)
    assert [e[0] for e in b] == ["DataReceived", "StreamEnded"]


def test_content_length_is_still_enforced() -> None:
    """A request with content-length: h2 tracks the body, so its DATA is h2's."""

    def script(peer: Any, ours: Any) -> Any:
        peer.send_headers(
            1,
            [
                (":method", "POST"),
                (":scheme", "https"),
                (":path", "/"),
                (":authority", "x"),
                ("content-length", "3"),
            ],
        )
        ours.receive_data(peer.data_to_send())
        return ours.receive_data(_data(1, b"four"))

    r = _same(script)
    assert r[0] == "raised" and r[1] == "InvalidBodyLengthError", r


def test_sending_past_a_window_or_on_a_closed_stream_is_h2s_error() -> None:
    def past_window(peer: Any, ours: Any) -> Any:
        peer.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 10})
        ours.receive_data(peer.data_to_send())
        peer.send_headers(1, CONNECT)
        ours.receive_data(peer.data_to_send())
        ours.send_headers(1, [(":status", "200")])
        ours.send_data(1, b"0123456789")
        return ours.send_data(1, b"!")

    r = _same(past_window)
    assert r[0] == "raised" and r[1] == "FlowControlError", r

    def closed(peer: Any, ours: Any) -> Any:
        peer.send_headers(1, CONNECT)
        ours.receive_data(peer.data_to_send())
        ours.send_headers(1, [(":status", "200")])
        ours.send_data(1, b"bye", end_stream=True)
        return ours.send_data(1, b"more")

    r = _same(closed)  # h2's stream state machine: SEND_DATA in CLOSED
    assert r[0] == "raised" and r[1] == "ProtocolError", r


def test_the_fast_path_really_runs_and_the_switch_really_turns_it_off(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The A/B switch (TETHER_H2_FAST_DATA) must change the code that runs,
    or a benchmark of it compares the path with itself."""
    calls = {"recv": 0, "send": 0}
    orig_recv = h2.connection.H2Connection._receive_data_frame
    orig_send = h2.stream.H2Stream.send_data

    def recv(self: Any, frame: Any) -> Any:
        calls["recv"] += 1
        return orig_recv(self, frame)

    def send(self: Any, *a: Any, **k: Any) -> Any:
        calls["send"] += 1
        return orig_send(self, *a, **k)

    monkeypatch.setattr(h2.connection.H2Connection, "_receive_data_frame", recv)
    monkeypatch.setattr(h2.stream.H2Stream, "send_data", send)
    seen = {}
    for on in (True, False):
        monkeypatch.setattr(h2conn, "FAST_DATA", on)
        calls.update(recv=0, send=0)
        peer, ours = _pair()
        peer.send_headers(1, CONNECT)
        ours.receive_data(peer.data_to_send())
        ours.send_headers(1, [(":status", "200")])
        for _ in range(10):
            ours.receive_data(_data(1, b"m" * 1024))
            ours.send_data(1, b"r" * 1024)
        seen[on] = dict(calls)
    assert seen[True] == {"recv": 0, "send": 0}, seen
    assert seen[False] == {"recv": 10, "send": 10}, seen


def test_the_switch_is_read_from_the_environment() -> None:
    import subprocess
    import sys

    code = "from agent.tunnel import h2conn; print(h2conn.FAST_DATA)"
    for value, want in (("0", "False"), ("1", "True"), ("", "True")):
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "TETHER_H2_FAST_DATA": value},
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip() == want, (value, out)


def test_a_small_payload_in_a_large_read_does_not_keep_the_read_alive(fast: bool) -> None:
    """A payload view keeps its whole read alive while it waits (for the app
    socket, or for delivery).  1 byte of DATA read together with 200 KiB for
    another stream must not pin the 200 KiB; a bulk frame that is most of
    its read stays a view of it (no copy)."""
    peer, ours = _pair()
    peer.send_headers(1, CONNECT)
    peer.send_headers(3, CONNECT)
    ours.receive_data(peer.data_to_send())
    bulk = os.urandom(200 * 1024)
    read = _data(1, b"x") + _data(3, bulk)
    got = {}
    for e in ours.receive_data(read):
        if isinstance(e, h2.events.DataReceived):
            pieces = getattr(e, "pieces", None) or [e.data]
            got[e.stream_id] = pieces
    (small,) = got[1]
    assert bytes(small) == b"x"
    assert small.obj is not None and len(small.obj) <= 4 * len(small), len(small.obj)
    (big,) = got[3]
    assert bytes(big) == bulk
    assert len(big.obj) == len(read)  # a view of the read itself


def test_the_start_of_a_frame_waiting_for_its_end_does_not_keep_the_read_alive(
    fast: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A read that ends inside a frame leaves that frame's first bytes in the
    frame buffer until the rest comes.  5 bytes of a header at the end of a
    200 KiB read must not keep the 200 KiB alive (a peer could do it on each
    of the hundreds of connections it may open); the start of a frame that
    is most of its read stays a view of it; a frame fed a byte at a time
    stays linear."""
    peer, ours = _pair()
    peer.send_headers(1, CONNECT)
    ours.receive_data(peer.data_to_send())
    bulk = os.urandom(200 * 1024)
    tail = os.urandom(150 * 1024)
    whole = _data(1, tail)
    ours.receive_data(_data(1, bulk) + whole[:5])
    (waiting,) = ours.incoming_buffer._chunks
    assert bytes(waiting) == whole[:5]
    assert waiting.obj is not None and len(waiting.obj) <= 4 * len(waiting), len(waiting.obj)
    ours.receive_data(whole[5:-1000])  # most of its read: a view of it
    big = ours.incoming_buffer._chunks[-1]
    assert len(big.obj) == len(whole) - 1005
    got = b"".join(
        bytes(e.data)
        for e in ours.receive_data(whole[-1000:])
        if isinstance(e, h2.events.DataReceived)
    )
    assert got == tail
    calls = 0
    real = h2conn._unpinned

    def counted(v: memoryview) -> memoryview:
        nonlocal calls
        calls += 1
        return real(v)

    monkeypatch.setattr(h2conn, "_unpinned", counted)
    wire = _data(1, os.urandom(16 * 1024))
    for b in wire:
        ours.receive_data(bytes([b]))
    assert calls <= 3 * len(wire), calls  # each wait looks at the new byte and the first
