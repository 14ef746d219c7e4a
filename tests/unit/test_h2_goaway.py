"""H2Conn under a peer's graceful drain and its own, under rapid reset, idle,
and when a tunnel breaks mid-transfer.  Each case runs an H2Conn against a
hand-driven `h2` peer (frames written raw where a real peer's differ from
what h2 would send) over a socketpair; the truncation cases relay to real
loopback TCP sockets so the application side sees what the kernel sends."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import select
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import hyperframe.frame
import pytest

from agent.tunnel.bridge import Bridge
from agent.tunnel.h2conn import MAX_STREAMS, H2Conn, H2Stream, _H2Connection
from agent.tunnel.relay import Relay

GOOD = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]
LAST = 2**31 - 1
WAIT = 3.0


class RawPeer(asyncio.Protocol):
    """The other end, driven by the test: h2 for framing and HPACK, every
    event kept, frames the test writes raw bypass h2's state machine."""

    def __init__(self, client_side: bool) -> None:
        # tether's subclass: like Go's, it keeps streams running through a GOAWAY
        self.h2 = _H2Connection(
            h2.config.H2Configuration(client_side=client_side, header_encoding="utf-8")
        )
        self.events: list[h2.events.Event] = []
        self.frames: list[Any] = []  # raw parse of what the H2Conn sent
        self.transport: asyncio.Transport | None = None
        self.lost = asyncio.get_running_loop().create_future()
        self.changed = asyncio.Event()
        self._buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.h2.initiate_connection()
        self.flush()

    def data_received(self, data: bytes) -> None:
        self._parse(data)
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.events += self.h2.receive_data(data)
        for ev in self.events:
            if isinstance(ev, h2.events.DataReceived) and ev.flow_controlled_length:
                with contextlib.suppress(Exception):
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        self.flush()
        self.changed.set()

    def _parse(self, data: bytes) -> None:
        self._buf += data
        if self._buf.startswith(b"PRI * HTTP/2.0"):
            self._buf = self._buf[24:]
        while len(self._buf) >= 9:
            f, length = hyperframe.frame.Frame.parse_frame_header(memoryview(self._buf[:9]))
            if len(self._buf) < 9 + length:
                return
            f.parse_body(memoryview(self._buf[9 : 9 + length]))
            self.frames.append(f)
            self._buf = self._buf[9 + length :]

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)
        self.changed.set()

    def flush(self) -> None:
        out = self.h2.data_to_send()
        if out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(out)

    def raw(self, *frames: Any) -> None:
        assert self.transport is not None
        self.transport.write(b"".join(f.serialize() for f in frames))

    async def until(self, cond: Callable[[], bool], timeout: float = WAIT) -> None:
        async def wait() -> None:
            while not cond():
                self.changed.clear()
                await self.changed.wait()

        await asyncio.wait_for(wait(), timeout)

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    def sent(self, kind: type) -> list[Any]:
        return [f for f in self.frames if isinstance(f, kind)]


def goaway(last: int, code: int = 0) -> hyperframe.frame.GoAwayFrame:
    f = hyperframe.frame.GoAwayFrame(0)
    f.last_stream_id, f.error_code = last, code
    return f


def ping(data: bytes = b"drain!!!") -> hyperframe.frame.PingFrame:
    f = hyperframe.frame.PingFrame(0)
    f.opaque_data = data
    return f


async def pair(
    conn_factory: Callable[[], H2Conn], peer_client_side: bool
) -> tuple[H2Conn, RawPeer]:
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    _, conn = await loop.connect_accepted_socket(conn_factory, a)
    _, peer = await loop.connect_accepted_socket(lambda: RawPeer(peer_client_side), b)
    await peer.until(lambda: bool(peer.of(h2.events.RemoteSettingsChanged)))
    return conn, peer


async def poll(cond: Callable[[], bool], timeout: float = WAIT) -> None:
    """For what the peer cannot see (nothing is sent back to wake it)."""
    for _ in range(int(timeout / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("condition not met")


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


# -- a peer's graceful drain (finding 10) ----------------------------------------------


def test_client_keeps_its_stream_through_a_servers_goaway_and_ping() -> None:
    """Go's http2 Server.Shutdown and Envoy's drain: GOAWAY(NO_ERROR, 2^31-1)
    then a PING.  Unpatched h2 moved to CLOSED on the GOAWAY and raised on
    the PING: tether answered GOAWAY(PROTOCOL_ERROR) and killed the stream.
    Now the PING is answered, the stream carries data both ways to a clean
    end, no new stream goes on the connection, and it closes after."""

    async def main() -> None:
        conn, srv = await pair(lambda: H2Conn(client=True), peer_client_side=False)
        await asyncio.wait_for(conn.ready, WAIT)
        drained: list[bool] = []
        conn.on_goaway.append(lambda: drained.append(True))
        stream = conn.open_stream(GOOD)
        await srv.until(lambda: bool(srv.of(h2.events.RequestReceived)))
        srv.h2.send_headers(1, [(":status", "200")])
        srv.flush()
        await asyncio.wait_for(stream.response, WAIT)
        got = bytearray()
        ended = asyncio.get_running_loop().create_future()
        stream.attach(got.extend, lambda: ended.set_result(None), lambda e: None)

        srv.raw(goaway(LAST), ping())
        await srv.until(lambda: any("ACK" in f.flags for f in srv.sent(hyperframe.frame.PingFrame)))
        assert not srv.sent(hyperframe.frame.GoAwayFrame), "answered the drain with GOAWAY"
        assert not stream.closed
        assert drained == [True] and not conn.available()
        with pytest.raises(ConnectionError):
            conn.open_stream(GOOD)

        srv.raw(goaway(1))  # the real last id, as Go sends it after the PING
        stream.write(b"upload" * 1000)
        await srv.until(lambda: sum(len(e.data) for e in srv.of(h2.events.DataReceived)) == 6000)
        srv.h2.send_data(1, b"download", end_stream=True)
        srv.flush()
        await asyncio.wait_for(ended, WAIT)
        stream.write_eof()
        await srv.until(lambda: bool(srv.of(h2.events.StreamEnded)))
        assert bytes(got) == b"download"
        await asyncio.wait_for(conn.closed, WAIT)  # its last stream ended
        codes = [f.error_code for f in srv.sent(hyperframe.frame.GoAwayFrame)]
        assert codes == [0], codes

    run(main())


def test_server_keeps_serving_a_stream_after_a_clients_goaway_and_ping() -> None:
    """The other role: a client that drains (GOAWAY then PING) while its
    stream is open keeps the stream; the server closes once it ends."""

    async def main() -> None:
        streams: list[H2Stream] = []

        async def on_request(c: H2Conn, s: H2Stream) -> None:
            streams.append(s)
            c.respond(s, 200)
            s.attach(lambda d: s.write(d), s.write_eof, lambda e: None)  # echo

        conn, cli = await pair(lambda: H2Conn(client=False, on_request=on_request), True)
        cli.h2.send_headers(1, GOOD)
        cli.flush()
        await cli.until(lambda: bool(cli.of(h2.events.ResponseReceived)))
        cli.raw(goaway(0), ping())
        await cli.until(lambda: any("ACK" in f.flags for f in cli.sent(hyperframe.frame.PingFrame)))
        assert not cli.sent(hyperframe.frame.GoAwayFrame)
        cli.h2.send_data(1, b"still here", end_stream=True)
        cli.flush()
        await cli.until(lambda: bool(cli.of(h2.events.StreamEnded)))
        echoed = b"".join(e.data for e in cli.of(h2.events.DataReceived))
        assert echoed == b"still here"
        await asyncio.wait_for(conn.closed, WAIT)

    run(main())


def test_own_drain_sends_two_goaways_around_a_ping_and_finishes_streams() -> None:
    """tether's drain: GOAWAY(NO_ERROR, 2^31-1), PING, after its ACK
    GOAWAY(NO_ERROR, last id); the open stream finishes, a stream opened
    after the second GOAWAY is refused, and the connection then closes."""

    async def main() -> None:
        async def on_request(c: H2Conn, s: H2Stream) -> None:
            c.respond(s, 200)
            s.attach(lambda d: s.write(d), s.write_eof, lambda e: None)

        conn, cli = await pair(lambda: H2Conn(client=False, on_request=on_request), True)
        cli.h2.send_headers(1, GOOD)
        cli.flush()
        await cli.until(lambda: bool(cli.of(h2.events.ResponseReceived)))
        drain = asyncio.get_running_loop().create_task(conn.drain())
        await cli.until(lambda: len(cli.sent(hyperframe.frame.GoAwayFrame)) == 2)
        g1, g2 = cli.sent(hyperframe.frame.GoAwayFrame)
        assert (g1.last_stream_id, g1.error_code) == (LAST, 0)
        assert (g2.last_stream_id, g2.error_code) == (1, 0)
        assert cli.sent(hyperframe.frame.PingFrame)
        await drain
        # a stream the client opens now was never going to be processed
        cli.raw(
            hyperframe.frame.HeadersFrame(3, cli.h2.encoder.encode(GOOD), flags=["END_HEADERS"])
        )
        await cli.until(
            lambda: any(
                f.stream_id == 3 and f.error_code == h2.errors.ErrorCodes.REFUSED_STREAM
                for f in cli.sent(hyperframe.frame.RstStreamFrame)
            )
        )
        cli.h2.send_data(1, b"finish me", end_stream=True)
        cli.flush()
        await cli.until(lambda: bool(cli.of(h2.events.StreamEnded)))
        assert b"".join(e.data for e in cli.of(h2.events.DataReceived)) == b"finish me"
        await asyncio.wait_for(conn.closed, WAIT)

    run(main())


# -- rapid reset and stream caps (finding 5) --------------------------------------


def _headers(peer: RawPeer, sid: int) -> hyperframe.frame.HeadersFrame:
    return hyperframe.frame.HeadersFrame(sid, peer.h2.encoder.encode(GOOD), flags=["END_HEADERS"])


def _rst(sid: int) -> hyperframe.frame.RstStreamFrame:
    f = hyperframe.frame.RstStreamFrame(sid)
    f.error_code = h2.errors.ErrorCodes.CANCEL
    return f


def test_rapid_reset_gets_goaway_enhance_your_calm_and_starts_no_handler() -> None:
    """CVE-2023-44487: HEADERS+RST_STREAM pairs.  Before: every CONNECT
    started a handler (and a delivery socket) and no GOAWAY ever came.  Now a
    request reset in the same batch starts nothing, and past the reset
    budget the connection gets GOAWAY(ENHANCE_YOUR_CALM) and is closed."""

    async def main() -> None:
        calls: list[int] = []

        async def on_request(c: H2Conn, s: H2Stream) -> None:
            calls.append(s.id)
            await asyncio.sleep(10)

        conn, cli = await pair(lambda: H2Conn(client=False, on_request=on_request), True)
        for batch in range(10):
            frames: list[Any] = []
            for i in range(100):
                sid = 1 + 2 * (batch * 100 + i)
                frames += [_headers(cli, sid), _rst(sid)]
            if cli.transport is None or cli.transport.is_closing() or cli.lost.done():
                break
            cli.raw(*frames)
            await asyncio.sleep(0.01)
        await asyncio.wait_for(conn.closed, WAIT)
        gas = cli.sent(hyperframe.frame.GoAwayFrame)
        assert gas and gas[-1].error_code == h2.errors.ErrorCodes.ENHANCE_YOUR_CALM, gas
        assert calls == []

    run(main())


def test_handlers_still_running_for_reset_streams_count_against_the_stream_cap() -> None:
    """h2 counts only open streams: a client resetting streams whose handler
    is still delivering could run unbounded handlers (each with a socket).
    Handlers are capped at MAX_STREAMS per connection; beyond, REFUSED_STREAM."""

    async def main() -> None:
        running: set[int] = set()

        async def on_request(c: H2Conn, s: H2Stream) -> None:
            running.add(s.id)
            await asyncio.sleep(10)

        conn, cli = await pair(lambda: H2Conn(client=False, on_request=on_request), True)
        cli.raw(*[_headers(cli, 1 + 2 * i) for i in range(MAX_STREAMS)])
        for _ in range(100):  # handlers run on the loop, not on received data: poll
            if len(running) == MAX_STREAMS:
                break
            await asyncio.sleep(0.02)
        assert len(running) == MAX_STREAMS
        cli.raw(*[_rst(1 + 2 * i) for i in range(MAX_STREAMS)])
        await asyncio.sleep(0.05)
        more = [1 + 2 * (MAX_STREAMS + i) for i in range(50)]
        cli.raw(*[_headers(cli, sid) for sid in more])
        await cli.until(
            lambda: {f.stream_id for f in cli.sent(hyperframe.frame.RstStreamFrame)} >= set(more)
        )
        await asyncio.sleep(0.05)
        assert len(running) == MAX_STREAMS  # none of the 50 started
        conn.close()

    run(main())


# -- idle (finding 6) ------------------------------------------------------------------


def test_server_connection_with_no_stream_is_closed_after_idle_timeout() -> None:
    async def main() -> None:
        async def on_request(c: H2Conn, s: H2Stream) -> None:
            c.respond(s, 200)

        conn, cli = await pair(
            lambda: H2Conn(client=False, on_request=on_request, idle_timeout=0.4), True
        )
        await asyncio.wait_for(cli.lost, WAIT)
        assert conn.closed.done()
        assert [f.error_code for f in cli.sent(hyperframe.frame.GoAwayFrame)] == [0]

    run(main())


# -- truncation is an abort, not an end (finding 7) ----------------------------------


async def _app_pair() -> tuple[socket.socket, socket.socket]:
    """A connected TCP pair on loopback: (the app's end, tether's end)."""
    loop = asyncio.get_running_loop()
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    lst.setblocking(False)
    app = socket.socket()
    app.setblocking(False)
    await loop.sock_connect(app, lst.getsockname())
    ours, _ = await loop.sock_accept(lst)
    lst.close()
    ours.setblocking(False)
    return app, ours


async def _read_to_end(app: socket.socket, expect: int) -> tuple[int, str]:
    """Read like a length-checked upload: bytes received and how it ended."""
    loop = asyncio.get_running_loop()
    n = 0
    try:
        while True:
            chunk = await asyncio.wait_for(loop.sock_recv(app, 65536), WAIT)
            if not chunk:
                return n, "EOF"
            n += len(chunk)
    except ConnectionResetError:
        return n, "ECONNRESET"
    except OSError as e:
        return n, errno.errorcode.get(e.errno or 0, str(e))


async def _bridged_server(
    rcvbuf: int = 0,
) -> tuple[socket.socket, H2Conn, RawPeer, list[Bridge]]:
    """A server H2Conn whose every request is bridged to one app socket: (the
    app's end, the H2Conn, the raw client peer, the bridges made so far)."""
    bridges: list[Bridge] = []
    app, ours = await _app_pair()
    if rcvbuf:
        app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)

    async def on_request(c: H2Conn, s: H2Stream) -> None:
        c.respond(s, 200)
        b = Bridge(s, initiator="stream")
        bridges.append(b)
        await b.start(ours)
        await b.done

    conn, cli = await pair(lambda: H2Conn(client=False, on_request=on_request), True)
    return app, conn, cli, bridges


@pytest.mark.parametrize("how", ["rst_stream", "connection_lost"])
def test_bridge_resets_the_app_socket_when_the_stream_is_cut(how: str) -> None:
    """A transfer cut mid-way (RST_STREAM, or the HBONE connection lost
    without END_STREAM): the app must see ECONNRESET, as over direct TCP.
    Before, it got a FIN: a half-received upload looked complete."""

    async def main() -> None:
        app, conn, cli, bridges = await _bridged_server()
        cli.h2.send_headers(1, GOOD)
        cli.h2.send_data(1, b"x" * 5000)
        cli.flush()
        loop = asyncio.get_running_loop()
        got = 0
        while got < 5000:
            got += len(await asyncio.wait_for(loop.sock_recv(app, 65536), WAIT))
        if how == "rst_stream":
            cli.raw(_rst(1))
        else:
            assert cli.transport is not None
            cli.transport.abort()
        n, end = await _read_to_end(app, 10000)
        assert end == "ECONNRESET", (n, end)
        assert bridges and bridges[0].abort_flag == "DC"  # inbound: the stream is downstream
        app.close()
        conn.close()

    run(main())


def test_bridge_delivers_what_the_stream_carried_before_its_reset() -> None:
    """Envoy resets a waypoint's CONNECT stream (CONNECT_ERROR) right after
    the last DATA of a `connection: close` response.  The app, slow to read,
    must still get every byte the stream delivered, then ECONNRESET; before,
    the RST went out at once and discarded what the socket still queued."""

    async def main() -> None:
        app, conn, cli, bridges = await _bridged_server(rcvbuf=65536)  # a slow reader's
        cli.h2.send_headers(1, GOOD)
        cli.flush()
        await cli.until(lambda: bool(cli.of(h2.events.ResponseReceived)))
        sent = 0
        while (room := min(cli.h2.local_flow_control_window(1), 16384)) > 0 and sent < 4 << 20:
            cli.h2.send_data(1, bytes(room))
            sent += room
        cli.flush()
        f = _rst(1)
        f.error_code = h2.errors.ErrorCodes.CONNECT_ERROR
        cli.raw(f)
        await asyncio.sleep(0.2)  # the reset is in; the app has read nothing yet
        assert bridges and not bridges[0].done.done()  # holding the RST for the app
        n, end = await _read_to_end(app, sent)
        assert (n, end) == (sent, "ECONNRESET"), (sent, n, end)
        assert bridges[0].abort_flag == "DC" and bridges[0].done.done()
        app.close()
        conn.close()

    run(main())


def test_bridge_resets_the_stream_when_the_app_resets() -> None:
    """ECONNRESET on the app's socket is passed on as RST_STREAM, never END_STREAM."""

    async def main() -> None:
        async def on_request(c: H2Conn, s: H2Stream) -> None:
            c.respond(s, 200)
            b = Bridge(s, initiator="stream")
            await b.start(ours)
            await b.done

        app, ours = await _app_pair()
        conn, cli = await pair(lambda: H2Conn(client=False, on_request=on_request), True)
        cli.h2.send_headers(1, GOOD)
        cli.flush()
        await cli.until(lambda: bool(cli.of(h2.events.ResponseReceived)))
        await asyncio.get_running_loop().sock_sendall(app, b"partial")
        await cli.until(lambda: bool(cli.of(h2.events.DataReceived)))
        app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        app.close()
        await cli.until(
            lambda: bool(cli.of(h2.events.StreamReset) or cli.of(h2.events.StreamEnded))
        )
        assert cli.of(h2.events.StreamReset) and not cli.of(h2.events.StreamEnded)
        conn.close()

    run(main())


def test_relay_passes_a_reset_on_as_a_reset() -> None:
    """Plaintext and same-node relays: one side reset, the other gets RST too."""

    async def main() -> None:
        client, a = await _app_pair()
        server, b = await _app_pair()
        r = Relay({})
        await r.start(a, b)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, b"y" * 3000)
        got = 0
        while got < 3000:
            got += len(await asyncio.wait_for(loop.sock_recv(server, 65536), WAIT))
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()
        n, end = await _read_to_end(server, 10000)
        assert end == "ECONNRESET", (n, end)
        await asyncio.wait_for(r.done, WAIT)
        assert r.abort_flag == "DC"
        server.close()

    run(main())


def test_relay_clean_end_is_still_a_fin() -> None:
    async def main() -> None:
        client, a = await _app_pair()
        server, b = await _app_pair()
        r = Relay({})
        await r.start(a, b)
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(client, b"z" * 100)
        client.shutdown(socket.SHUT_WR)
        n, end = await _read_to_end(server, 100)
        assert (n, end) == (100, "EOF")
        server.close()
        client.close()
        await asyncio.wait_for(r.done, WAIT)
        assert r.abort_flag is None

    run(main())


def test_resets_of_established_streams_do_not_spend_the_budget() -> None:
    """Only premature resets count (Envoy's rule): apps aborting streams that
    have lived a while (ordinary in a busy mesh) never earn a GOAWAY."""

    async def main() -> None:
        async def on_request(c: H2Conn, s: H2Stream) -> None:
            c.respond(s, 200)

        conn, cli = await pair(lambda: H2Conn(client=False, on_request=on_request), True)
        for _ in range(4):  # 400 resets, twice the burst
            ids = []
            for _ in range(MAX_STREAMS):
                sid = cli.h2.get_next_available_stream_id()
                cli.h2.send_headers(sid, GOOD)
                ids.append(sid)
            cli.flush()
            await cli.until(lambda ids=ids: len(cli.of(h2.events.ResponseReceived)) >= ids[-1] // 2)
            for s in conn.streams.values():
                s.started -= 5.0  # as if they had been running for a while
            for sid in ids:
                cli.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            cli.flush()
            await asyncio.sleep(0.05)
        assert not cli.sent(hyperframe.frame.GoAwayFrame) and not conn.closed.done()
        conn.close()

    run(main())


def _client_with(dial: Callable[[Any], Awaitable[H2Conn]]) -> tuple[Any, Any]:
    """An HboneClient whose connections come from `dial`, and a pool key."""
    from agent.identity.spiffe import SpiffeId
    from agent.tunnel.hbone import HboneClient, PoolKey

    async def no_context(_: SpiffeId) -> Any:
        raise AssertionError("not dialled for real")

    client = HboneClient(no_context)
    client._dial = dial  # type: ignore[method-assign]
    ident = SpiffeId("cluster.local", "ns", "sa")
    return client, PoolKey(ident, ident, "/proc/self/ns/net", ("10.0.0.1", 15008))


def _raw_dialer(peers: list[RawPeer]) -> Callable[[Any], Awaitable[H2Conn]]:
    """Dials a tether client H2Conn to a RawPeer server, kept in `peers`."""

    async def dial(key: Any) -> H2Conn:
        conn, srv = await pair(lambda: H2Conn(client=True), peer_client_side=False)
        await asyncio.wait_for(conn.ready, WAIT)
        peers.append(srv)
        return conn

    return dial


def test_pool_drops_a_connection_on_goaway_and_dials_a_fresh_one() -> None:
    """A peer's GOAWAY: the connection leaves the pool at once (its open
    stream keeps going), the next CONNECT dials a new connection."""

    async def main() -> None:
        servers: list[RawPeer] = []

        async def answer(srv: RawPeer, n: int) -> None:
            await srv.until(lambda: len(srv.of(h2.events.RequestReceived)) >= n)
            sid = srv.of(h2.events.RequestReceived)[n - 1].stream_id
            srv.h2.send_headers(sid, [(":status", "200")])
            srv.flush()

        client, key = _client_with(_raw_dialer(servers))
        first = asyncio.get_running_loop().create_task(client.open(key, GOOD))
        await asyncio.sleep(0.05)
        await answer(servers[0], 1)
        s1 = await first
        servers[0].raw(goaway(1))
        await servers[0].until(lambda: True)
        for _ in range(50):
            if key not in client.pool:
                break
            await asyncio.sleep(0.01)
        assert key not in client.pool and not s1.closed
        second = asyncio.get_running_loop().create_task(client.open(key, GOOD))
        await asyncio.sleep(0.05)
        assert len(servers) == 2
        await answer(servers[1], 1)
        s2 = await second
        assert s2.conn is not s1.conn and client.pool[key] == [s2.conn]
        client.close()

    run(main())


# -- refused requests leave nothing behind ------------------------------------------


async def tether_pair(
    on_request: Callable[[H2Conn, H2Stream], Awaitable[None]],
) -> tuple[H2Conn, H2Conn]:
    """A tether client and a tether server H2Conn, connected."""
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    _, cli = await loop.connect_accepted_socket(lambda: H2Conn(client=True), a)
    _, srv = await loop.connect_accepted_socket(
        lambda: H2Conn(client=False, on_request=on_request), b
    )
    await asyncio.wait_for(cli.ready, WAIT)
    return cli, srv


def _tether_dialer(
    on_request: Callable[[H2Conn, H2Stream], Awaitable[None]], servers: list[H2Conn]
) -> Callable[[Any], Awaitable[H2Conn]]:
    """Dials a tether client H2Conn to a tether server H2Conn, kept in `servers`."""

    async def dial(key: Any) -> H2Conn:
        cli, srv = await tether_pair(on_request)
        servers.append(srv)
        return cli

    return dial


def test_refused_connects_leave_no_stream_on_either_end() -> None:
    """A 401 or 503 ends the server's side of the stream.  Before, neither
    end closed the other side: each refusal left a half-closed stream (an
    H2Stream and one of MAX_STREAMS slots) on both agents for the life of
    the pooled connection, so every 100 refusals (a denied client retrying)
    the pool dialled a new connection and kept the full one, unswept (it
    had streams), until the server's per-source limit refused the pod
    altogether.  Now 150 refusals go over one connection, nothing is left
    on either end, and an allowed request still goes through on it."""
    from agent.tunnel.hbone import HboneError

    async def main() -> None:
        servers: list[H2Conn] = []

        async def on_request(c: H2Conn, s: H2Stream) -> None:
            status = dict(s.request_headers)[":authority"].rpartition(":")[2]
            c.respond(s, int(status))
            if status == "200":
                s.attach(lambda d: s.write(d), s.write_eof, lambda e: None)

        client, key = _client_with(_tether_dialer(on_request, servers))
        for i in range(150):
            status = (401, 503)[i % 2]
            with pytest.raises(HboneError) as e:
                await client.open(
                    key, [(":method", "CONNECT"), (":authority", f"10.0.0.1:{status}")]
                )
            assert e.value.status == status
        await poll(lambda: not servers[0].streams)
        assert len(servers) == 1 and len(client.pool[key]) == 1, "refusals filled connections"
        conn = client.pool[key][0]
        assert not conn.streams and conn.h2.open_outbound_streams == 0
        assert servers[0].h2.open_inbound_streams == 0
        s = await client.open(key, [(":method", "CONNECT"), (":authority", "10.0.0.1:200")])
        got = bytearray()
        s.attach(got.extend, lambda: None, lambda e: None)
        s.write(b"still served")
        await poll(lambda: bytes(got) == b"still served")
        assert not conn.goaway_received and not servers[0].goaway_received
        client.close()

    run(main())


def test_a_client_that_does_not_end_a_refused_stream_gets_rst_no_error() -> None:
    """The server's side of a refusal: after the 401 with END_STREAM it
    sends RST_STREAM(NO_ERROR) and forgets the stream, whatever the client
    does; the client's own reset after that spends no reset budget."""

    async def main() -> None:
        async def on_request(c: H2Conn, s: H2Stream) -> None:
            c.respond(s, 401)

        conn, cli = await pair(lambda: H2Conn(client=False, on_request=on_request), True)
        budget = conn.resets.tokens
        for i in range(150):
            sid = 1 + 2 * i
            cli.h2.send_headers(sid, GOOD)
            cli.flush()
            await cli.until(
                lambda sid=sid: any(
                    f.stream_id == sid and f.error_code == h2.errors.ErrorCodes.NO_ERROR
                    for f in cli.sent(hyperframe.frame.RstStreamFrame)
                )
            )
            cli.raw(_rst(sid))  # a client that resets after the answer anyway
        await asyncio.sleep(0.05)
        ended = [e for e in cli.of(h2.events.ResponseReceived) if e.stream_ended]
        assert len(ended) == 150
        assert not conn.streams and conn.h2.open_inbound_streams == 0
        assert conn.resets.tokens >= budget - 1 and not conn.closed.done()
        conn.close()

    run(main())


def test_a_refusal_from_a_server_that_does_not_reset_is_ended_by_the_client() -> None:
    """A server (Go's, Envoy's) may end its side with the refusal and leave
    the stream half-closed: the client resets it."""
    from agent.tunnel.hbone import HboneError

    async def main() -> None:
        peers: list[RawPeer] = []

        async def refuse(n: int) -> None:
            srv = peers[0]
            await srv.until(lambda: len(srv.of(h2.events.RequestReceived)) >= n)
            sid = srv.of(h2.events.RequestReceived)[n - 1].stream_id
            srv.h2.send_headers(sid, [(":status", "401")], end_stream=True)
            srv.flush()

        client, key = _client_with(_raw_dialer(peers))
        loop = asyncio.get_running_loop()
        for n in range(1, 4):
            opening = loop.create_task(client.open(key, GOOD))
            await poll(lambda: bool(peers))
            await refuse(n)
            with pytest.raises(HboneError):
                await opening
        srv = peers[0]
        await srv.until(lambda: len(srv.sent(hyperframe.frame.RstStreamFrame)) == 3)
        conn = client.pool[key][0]
        assert not conn.streams and conn.h2.open_outbound_streams == 0
        client.close()

    run(main())


# -- data that arrives before the stream is delivered ------------------------------------


def test_data_before_delivery_is_held_within_the_stream_window_not_acknowledged() -> None:
    """A request's DATA may arrive while its destination is still being
    dialled (up to CONNECT_TIMEOUT).  It is kept for the app, but not
    acknowledged until the stream is attached: a peer streaming into a
    destination that never answers stops at the stream's window, instead of
    the agent buffering whatever it sends.  Once attached, every byte is
    delivered in order and the window opens again."""
    from agent.tunnel.h2conn import STREAM_WINDOW

    async def main() -> None:
        release = asyncio.Event()
        streams: list[H2Stream] = []
        got = bytearray()

        async def on_request(c: H2Conn, s: H2Stream) -> None:
            streams.append(s)
            await release.wait()  # the destination is slow to answer
            c.respond(s, 200)
            s.attach(got.extend, lambda: None, lambda e: None)

        conn, cli = await pair(lambda: H2Conn(client=False, on_request=on_request), True)
        cli.h2.send_headers(1, GOOD)
        cli.flush()
        await poll(lambda: bool(streams))  # nothing goes out to wake the peer
        chunk = bytes(range(256)) * 64  # 16 KiB
        sent = bytearray()
        for _ in range(4 * STREAM_WINDOW // len(chunk)):  # four windows' worth, at most
            if cli.h2.local_flow_control_window(1) < len(chunk):
                await asyncio.sleep(0.05)  # any WINDOW_UPDATE in flight lands
                if cli.h2.local_flow_control_window(1) < len(chunk):
                    break
            cli.h2.send_data(1, chunk)
            sent += chunk
            cli.flush()
            await asyncio.sleep(0)
        held = sum(len(x) for x in streams[0]._early)
        assert len(sent) <= STREAM_WINDOW, len(sent)
        assert held == len(sent), (held, len(sent))
        assert not got
        release.set()
        await cli.until(lambda: cli.h2.local_flow_control_window(1) >= len(chunk))
        cli.h2.send_data(1, b"tail", end_stream=True)
        cli.flush()
        sent += b"tail"
        await poll(lambda: len(got) == len(sent))
        assert bytes(got) == bytes(sent)
        conn.close()

    run(main())


def test_a_frame_spanning_reads_reaches_the_consumer_in_pieces_unjoined_and_whole() -> None:
    """1 MiB DATA frames arrive over several socket reads: the payload is
    handed over as the views it arrived in (on_pieces, one writev in the
    bridge), never joined; the bytes, their order and the flow-control
    accounting are exactly those sent, early bytes (before attach) included."""
    from agent.tunnel.h2conn import MAX_FRAME

    async def main() -> None:
        got = bytearray()
        calls: list[int] = []
        attached = asyncio.Event()

        def on_pieces(pieces: list[memoryview]) -> None:
            calls.append(len(pieces))
            for p in pieces:
                assert isinstance(p, memoryview) and p.readonly
                got.extend(p)

        async def on_request(c: H2Conn, s: H2Stream) -> None:
            await attached.wait()
            c.respond(s, 200)
            s.attach(got.extend, lambda: None, lambda e: None, on_pieces)

        conn, cli = await pair(lambda: H2Conn(client=False, on_request=on_request), True)
        cli.h2.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: MAX_FRAME})
        cli.flush()
        await cli.until(lambda: cli.h2.max_outbound_frame_size == MAX_FRAME)
        cli.h2.send_headers(1, GOOD)
        payload = bytes(i * 7 % 251 for i in range(3 * MAX_FRAME + 12345))
        sent = 0
        cli.h2.send_data(1, payload[:MAX_FRAME])  # before attach: held as pieces
        sent = MAX_FRAME
        cli.flush()
        await asyncio.sleep(0.05)
        attached.set()
        while sent < len(payload):
            await cli.until(lambda: cli.h2.local_flow_control_window(1) > 0)
            n = min(MAX_FRAME, len(payload) - sent, cli.h2.local_flow_control_window(1))
            cli.h2.send_data(1, payload[sent : sent + n])
            sent += n
            cli.flush()
        await poll(lambda: len(got) == len(payload))
        assert bytes(got) == payload
        assert max(calls) > 1, calls  # frames did span reads, and were not joined
        conn.close()

    run(main())


# -- early data: the app's first bytes go out with the CONNECT ---------------------------


def test_early_data_is_sent_with_the_connect_before_the_answer_and_delivered_once() -> None:
    """The server sees the request's DATA before it answers (the round trip
    saved); after the 200 the stream carries on in order, each byte once."""

    async def main() -> None:
        peers: list[RawPeer] = []
        client, key = _client_with(_raw_dialer(peers))
        early = bytes(range(256)) * 8
        opening = asyncio.get_running_loop().create_task(client.open(key, GOOD, early))
        await poll(lambda: bool(peers))
        srv = peers[0]
        await srv.until(lambda: bool(srv.of(h2.events.DataReceived)))
        assert b"".join(e.data for e in srv.of(h2.events.DataReceived)) == early
        assert not opening.done()
        srv.h2.send_headers(1, [(":status", "200")])
        srv.flush()
        stream = await opening
        assert stream.bytes_out == len(early)
        stream.write(b"and the rest")
        stream.write_eof()
        await srv.until(lambda: bool(srv.of(h2.events.StreamEnded)))
        got = b"".join(e.data for e in srv.of(h2.events.DataReceived))
        assert got == early + b"and the rest"
        client.close()

    run(main())


def test_early_data_of_a_stream_refused_by_goaway_is_sent_again_on_the_new_connection() -> None:
    """A GOAWAY below the stream's id: the peer never processed it, so the
    retry on a fresh connection carries the early bytes again."""

    async def main() -> None:
        peers: list[RawPeer] = []
        client, key = _client_with(_raw_dialer(peers))
        opening = asyncio.get_running_loop().create_task(client.open(key, GOOD, b"GET / HTTP/1.1"))
        await poll(lambda: bool(peers))
        await peers[0].until(lambda: bool(peers[0].of(h2.events.DataReceived)))
        peers[0].raw(goaway(0))
        await poll(lambda: len(peers) == 2)
        srv = peers[1]
        await srv.until(lambda: bool(srv.of(h2.events.DataReceived)))
        srv.h2.send_headers(1, [(":status", "200")])
        srv.flush()
        stream = await opening
        assert (
            stream.conn is not None
            and b"".join(e.data for e in srv.of(h2.events.DataReceived)) == b"GET / HTTP/1.1"
        )
        client.close()

    run(main())


def test_early_data_then_a_refusal_is_dropped_and_leaves_nothing() -> None:
    """Early bytes to a destination that refuses: the open fails (the app is
    refused), the server held them unacknowledged, both ends forget the
    stream and the connection's window gets the held bytes back."""
    from agent.tunnel.hbone import HboneError

    async def main() -> None:
        servers: list[H2Conn] = []
        held: list[int] = []

        async def on_request(c: H2Conn, s: H2Stream) -> None:
            await asyncio.sleep(0.02)
            held.append(sum(len(x) for x in s._early))
            c.respond(s, 401)

        client, key = _client_with(_tether_dialer(on_request, servers))
        for _ in range(3):
            with pytest.raises(HboneError):
                await client.open(key, GOOD, b"x" * 1000)
        assert held == [1000, 1000, 1000]
        conn = client.pool[key][0]
        await poll(lambda: not servers[0].streams)
        assert not conn.streams and servers[0].h2.open_inbound_streams == 0
        # the held bytes are credited back to the connection (h2 sends the
        # WINDOW_UPDATE once half the window is due): before, each refusal
        # took its early bytes off the connection's window for good, and
        # 16 MiB of them stalled every stream on it
        wm = servers[0].h2._inbound_flow_control_window_manager
        assert wm.current_window_size + wm._bytes_processed == wm.max_window_size
        client.close()

    run(main())


def test_already_sent_reads_what_is_there_without_waiting_and_raises_a_reset() -> None:
    """Loopback TCP: the bytes the client sent; nothing (not a wait) when it
    sent none; b"" at a clean end; a reset raised, not read as a clean end."""
    import struct as _struct

    from agent.tunnel.outbound import EARLY_DATA_MAX, already_sent

    def connected() -> tuple[socket.socket, socket.socket]:
        with socket.socket() as lst:
            lst.bind(("127.0.0.1", 0))
            lst.listen(1)
            c = socket.create_connection(lst.getsockname())
            s, _ = lst.accept()
        return c, s

    c, s = connected()
    with c, s:
        assert already_sent(s) == b""
        c.sendall(b"hello" + b"." * EARLY_DATA_MAX)
        for _ in range(100):
            if s.recv(1, socket.MSG_PEEK):
                break
        got = already_sent(s)
        assert got.startswith(b"hello") and len(got) <= EARLY_DATA_MAX
        c.shutdown(socket.SHUT_WR)
    c, s = connected()
    with c, s:
        c.shutdown(socket.SHUT_WR)
        s.settimeout(2)
        assert s.recv(1, socket.MSG_PEEK) == b""
        assert already_sent(s) == b""
    c, s = connected()
    with s:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _struct.pack("ii", 1, 0))
        c.close()
        assert select.select([s], [], [], 2)[0], "the reset never arrived"
        with pytest.raises(ConnectionResetError):
            already_sent(s)


# -- writes of one turn of the loop go out together --------------------------------------


def test_stream_writes_of_one_loop_turn_go_out_in_one_transport_write() -> None:
    """Bulk reads of several streams and a FIN, produced in one turn of the
    loop's callbacks: framed at once, written to the TLS transport once (one
    write, one syscall), bytes and order unchanged.  A small write with
    nothing scheduled goes out at once (a message is not delayed)."""
    from agent.tunnel.h2conn import DEFER_FLUSH_MIN

    async def main() -> None:
        conn, srv = await pair(lambda: H2Conn(client=True), peer_client_side=False)
        await asyncio.wait_for(conn.ready, WAIT)
        s1, s3 = conn.open_stream(GOOD), conn.open_stream(GOOD)
        await srv.until(lambda: len(srv.of(h2.events.RequestReceived)) == 2)
        for sid in (1, 3):
            srv.h2.send_headers(sid, [(":status", "200")])
        srv.flush()
        await asyncio.wait_for(asyncio.gather(s1.response, s3.response), WAIT)
        assert conn.transport is not None
        calls: list[int] = []
        real_write, real_writelines = conn.transport.write, conn.transport.writelines
        inside: list[bool] = []  # asyncio's writelines calls write: count the outer call

        def counted(real: Callable[[Any], None]) -> Callable[[Any], None]:
            def call(data: Any) -> None:
                if not inside:
                    calls.append(1)
                inside.append(True)
                try:
                    real(data)
                finally:
                    inside.pop()

            return call

        conn.transport.write = counted(real_write)  # type: ignore[method-assign]
        conn.transport.writelines = counted(real_writelines)  # type: ignore[method-assign]
        bulk = bytes(range(256)) * (DEFER_FLUSH_MIN // 256)
        s1.write(bulk)
        s3.write(b"other stream")
        s1.write(b"then the end")
        s1.write_eof()
        assert calls == []  # framed, not yet written
        await srv.until(lambda: bool(srv.of(h2.events.StreamEnded)))
        assert calls == [1]
        got: dict[int, bytes] = {1: b"", 3: b""}
        for e in srv.of(h2.events.DataReceived):
            got[e.stream_id] += e.data
        assert got == {1: bulk + b"then the end", 3: b"other stream"}
        s3.write(b"a message")
        assert calls == [1, 1]  # at once
        await srv.until(lambda: sum(len(e.data) for e in srv.of(h2.events.DataReceived)) > 0)
        conn.close()

    run(main())


def test_a_batch_of_data_is_handed_back_with_one_window_update_per_stream() -> None:
    """Many small DATA frames in one read (Envoy sends 16 KiB frames): the
    consumed bytes go back to the sender after the batch, once per stream
    and once for the connection, every byte of them, and without waiting
    for half a window (the windows' first refresh, ACK_FIRST)."""
    from agent.tunnel.h2conn import ACK_FIRST

    async def main() -> None:
        got: list[bytes] = []

        async def on_request(c: H2Conn, s: H2Stream) -> None:
            c.respond(s, 200)
            s.attach(got.append, lambda: None, lambda e: None)

        conn, cli = await pair(lambda: H2Conn(client=False, on_request=on_request), True)
        batches = 0
        received = conn.data_received

        def counted(data: bytes) -> None:
            nonlocal batches
            batches += 1
            received(data)

        conn.data_received = counted  # type: ignore[method-assign]
        cli.h2.send_headers(1, GOOD)
        cli.flush()
        await cli.until(lambda: bool(cli.of(h2.events.ResponseReceived)))
        batches, before = 0, len(cli.frames)
        frames, size = 64, 1024  # 64 KiB, in one write
        for i in range(frames):
            cli.h2.send_data(1, bytes([i]) * size)
        cli.flush()
        total = frames * size
        assert total >= ACK_FIRST
        await poll(lambda: sum(map(len, got)) == total)

        def updates(sid: int) -> list[Any]:
            new = cli.frames[before:]
            return [
                f
                for f in new
                if type(f) is hyperframe.frame.WindowUpdateFrame and f.stream_id == sid
            ]

        await cli.until(lambda: sum(f.window_increment for f in updates(1)) == total)
        assert 1 <= len(updates(1)) <= batches, (len(updates(1)), batches)
        assert sum(f.window_increment for f in updates(0)) == total
        assert len(updates(0)) <= batches
        assert b"".join(got) == b"".join(bytes([i]) * size for i in range(frames))

    run(main())
