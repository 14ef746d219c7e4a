"""The socket-BIO TLS transport (agent/tunnel/tlssock.py) on 127.0.0.1, real
mesh mTLS contexts, on asyncio's loop and uvloop: bytes through it unchanged
(length and SHA-256, both directions at once), the peer's identity, flow
control, close_notify as EOF, a silent peer's handshake bounded, a refused
certificate refused; and the HBONE client and server on it."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import pytest
from prometheus_client import generate_latest

from agent import eventloop
from agent.bench import loopback_tcp_pair
from agent.identity.ca import CertificateAuthority
from agent.identity.embedded import EmbeddedCA
from agent.identity.manager import CertificateManager
from agent.identity.spiffe import SpiffeId
from agent.identity.tls import peer_identity
from agent.tunnel import tlssock

T = TypeVar("T")
WEB = SpiffeId("cluster.local", "shop", "web")
DB = SpiffeId("cluster.local", "shop", "db")
LOOPS = ["asyncio"] + (["uvloop"] if eventloop.loop_factory("uvloop")[0] == "uvloop" else [])
# OpenSSL on the socket, and OpenSSL's records moved by the C extension
# (agent/tunnel/_tlscore.c; CI builds it: `pip install -e .`)
PATHS = ["socket", "c"]
REPORTED = {"socket": ("socket", "kernel_tx"), "c": ("c",)}


def connector(path: str) -> Callable[..., Awaitable[tlssock.TlsSocketTransport]]:
    if path == "c":
        assert tlssock.core_available(), "the C extension is not built: pip install -e ."
        return tlssock.connect_core
    return tlssock.connect


def run(loop_name: str, fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await asyncio.wait_for(fn(), timeout=60)

    return eventloop.run(main(), loop_name)


class Sink(asyncio.Protocol):
    """Hashes what arrives; sends `payload` `times` times when connected."""

    def __init__(self, payload: bytes = b"", times: int = 0) -> None:
        self.payload, self.times = payload, times
        self.h = hashlib.sha256()
        self.n = 0
        self.eof = asyncio.get_running_loop().create_future()
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.paused = 0
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        for _ in range(self.times):
            transport.write(self.payload)

    def data_received(self, data: bytes) -> None:
        self.h.update(data)
        self.n += len(data)

    def eof_received(self) -> bool:
        if not self.eof.done():
            self.eof.set_result(None)
        return False

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        pass

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


async def _contexts() -> tuple[ssl.SSLContext, ssl.SSLContext, CertificateManager]:
    mgr = CertificateManager(EmbeddedCA(CertificateAuthority.generate("cluster.local")))
    return await mgr.ssl_context_server(WEB), await mgr.ssl_context_client(DB), mgr


@contextlib.asynccontextmanager
async def _pair(
    server: asyncio.Protocol, client: asyncio.Protocol, path: str = "socket"
) -> AsyncIterator[tuple[tlssock.TlsSocketTransport, tlssock.TlsSocketTransport]]:
    """Both ends' transports over one loopback connection; aborted after."""
    sctx, cctx, mgr = await _contexts()
    loop = asyncio.get_running_loop()
    s, c = await loopback_tcp_pair()
    connect = connector(path)
    st, ct = await asyncio.gather(
        connect(loop, server, s, sctx, server_side=True, timeout=10),
        connect(loop, client, c, cctx, server_side=False, timeout=10),
    )
    try:
        yield st, ct
    finally:
        st.abort()
        ct.abort()
        await mgr.close()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loop_name", LOOPS)
def test_bytes_both_ways_arrive_unchanged(loop_name: str, path: str) -> None:
    chunk = os.urandom(1 << 20)
    times = 24  # 24 MiB each way, at the same time

    async def main() -> None:
        server, client = Sink(chunk, times), Sink(chunk, times)
        async with _pair(server, client, path) as (st, ct):
            assert peer_identity(st.get_extra_info("ssl_object")) == DB
            assert peer_identity(ct.get_extra_info("ssl_object")) == WEB
            assert st.get_extra_info("cipher")[1] == "TLSv1.3"
            want = hashlib.sha256(chunk * times).hexdigest()
            for _ in range(600):
                if server.n >= len(chunk) * times and client.n >= len(chunk) * times:
                    break
                await asyncio.sleep(0.05)
            assert server.n == client.n == len(chunk) * times
            assert server.h.hexdigest() == client.h.hexdigest() == want
            assert client.paused >= 1, "24 MiB queued without pause_writing"
            assert tlssock.established(ct, "client") in REPORTED[path]
            # close: what is queued goes first, then close_notify, read as EOF
            ct.write(b"tail")
            ct.close()
            assert ct.is_closing()
            await asyncio.wait_for(server.eof, 10)
            assert server.n == len(chunk) * times + 4
            await asyncio.wait_for(server.lost, 10)
            assert await asyncio.wait_for(client.lost, 10) is None

    run(loop_name, main)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loop_name", LOOPS)
def test_paused_reader_closes_the_senders_window(loop_name: str, path: str) -> None:
    """pause_reading stops reading the socket: the sender's buffer grows past
    its high-water mark and it is told to pause; resume delivers it all."""

    async def main() -> None:
        chunk = os.urandom(1 << 20)
        server, client = Sink(), Sink()
        async with _pair(server, client, path) as (st, ct):
            st.pause_reading()
            assert not st.is_reading()
            for _ in range(16):
                ct.write(chunk)
            await asyncio.sleep(0.3)
            assert server.n < 16 * len(chunk)
            assert ct.get_write_buffer_size() > 0 and client.paused == 1
            st.resume_reading()
            for _ in range(400):
                if server.n == 16 * len(chunk):
                    break
                await asyncio.sleep(0.05)
            assert server.h.hexdigest() == hashlib.sha256(chunk * 16).hexdigest()
            assert ct.get_write_buffer_size() == 0

    run(loop_name, main)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loop_name", LOOPS)
def test_close_with_a_peer_that_never_reads_is_bounded(loop_name: str, path: str) -> None:
    """close() waits for what is queued to go out, but not for ever: a peer
    that stops reading gets the connection aborted after close_timeout."""

    async def main() -> None:
        chunk = os.urandom(1 << 20)
        server, client = Sink(), Sink()
        async with _pair(server, client, path) as (st, ct):
            st.pause_reading()
            for _ in range(32):
                ct.write(chunk)
            await asyncio.sleep(0.2)
            assert ct.get_write_buffer_size() > 0
            ct.close_timeout = 0.5
            t0 = asyncio.get_running_loop().time()
            ct.close()
            ct.write(b"after close: dropped, no error")
            await asyncio.wait_for(client.lost, 5)
            assert 0.4 < asyncio.get_running_loop().time() - t0 < 3
            assert ct.get_write_buffer_size() == 0

    run(loop_name, main)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loop_name", LOOPS)
def test_silent_peer_handshake_is_bounded_and_closed(loop_name: str, path: str) -> None:
    """A client that connects and sends nothing holds the server's handshake
    for the timeout only; the socket is closed after."""

    async def main() -> None:
        sctx, _, mgr = await _contexts()
        loop = asyncio.get_running_loop()
        ls = socket.create_server(("127.0.0.1", 0))
        ls.setblocking(False)
        silent = socket.create_connection(ls.getsockname())
        s, _ = await loop.sock_accept(ls)
        t0 = loop.time()
        try:
            with pytest.raises(TimeoutError):
                await connector(path)(loop, Sink(), s, sctx, server_side=True, timeout=0.5)
            assert 0.4 < loop.time() - t0 < 5
            silent.settimeout(5)
            assert silent.recv(1) == b""  # closed by the server
        finally:
            silent.close()
            ls.close()
            await mgr.close()

    run(loop_name, main)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loop_name", LOOPS)
def test_certificate_from_another_ca_is_refused(loop_name: str, path: str) -> None:
    async def main() -> None:
        sctx, _, mgr = await _contexts()
        other = CertificateManager(EmbeddedCA(CertificateAuthority.generate("cluster.local")))
        loop = asyncio.get_running_loop()
        try:
            cctx = await other.ssl_context_client(DB)
            s, c = await loopback_tcp_pair()
            results = await asyncio.gather(
                connector(path)(loop, Sink(), s, sctx, server_side=True, timeout=5),
                connector(path)(loop, Sink(), c, cctx, server_side=False, timeout=5),
                return_exceptions=True,
            )
            assert isinstance(results[0], ssl.SSLError), results
            # the client refuses the server's certificate as well (other CA)
            assert isinstance(results[1], ssl.SSLError), results
            for r in results:
                if isinstance(r, tlssock.TlsSocketTransport):
                    r.abort()
        finally:
            await other.close()
            await mgr.close()

    run(loop_name, main)


def test_path_is_c_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TETHER_TLS", raising=False)
    assert tlssock.path() == "c"
    monkeypatch.setenv("TETHER_TLS", "loop")
    assert tlssock.path() == "loop"
    monkeypatch.setenv("TETHER_TLS", "socket")
    assert tlssock.path() == "socket"
    monkeypatch.setenv("TETHER_TLS", "c")
    assert tlssock.path() == "c"
    monkeypatch.setenv("TETHER_TLS", "ktls-please")
    assert tlssock.path() == "loop"


def test_c_without_the_extension_is_the_loop_said_in_the_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("TETHER_TLS", raising=False)
    monkeypatch.setattr(tlssock, "_tlscore", None)
    monkeypatch.setattr(tlssock, "_core_missing", "No module named 'agent.tunnel._tlscore'")
    tlssock._path_of.cache_clear()
    tlssock._warn_core_missing.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="agent.tunnel.tlssock"):
            assert tlssock.path() == "loop"
        assert "C extension is not available (No module named" in caplog.text
    finally:
        tlssock._path_of.cache_clear()
        tlssock._warn_core_missing.cache_clear()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("loop_name", LOOPS)
def test_the_path_in_use_is_counted_by_side(loop_name: str, path: str) -> None:
    """tether_hbone_tls_connections{side,path}: what `established` reports for
    each end reaches the agent's metrics (here: socket, no kTLS, or
    kernel_tx where the kernel took the sending side)."""
    from agent.metrics import Metrics

    m = Metrics()

    async def main() -> tuple[str, str]:
        async with _pair(Sink(), Sink(), path) as (st, ct):
            return tlssock.established(st, "server"), tlssock.established(ct, "client")

    try:
        server_path, client_path = run(loop_name, main)
    finally:
        tlssock.on_established.remove(m.on_tls)
    assert server_path == client_path and server_path in REPORTED[path]
    text = generate_latest(m.registry).decode()
    for side in ("server", "client"):
        line = f'tether_hbone_tls_connections_total{{path="{server_path}",side="{side}"}} 1.0'
        assert line in text, text


@pytest.mark.parametrize("loop_name", LOOPS)
@pytest.mark.parametrize("asked", ["loop", "socket", "c"])
def test_start_tls_takes_the_path_asked_for(
    loop_name: str, asked: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What HBONE's client and server call: TETHER_TLS picks the transport,
    and both ends report the path they are on."""
    monkeypatch.setenv("TETHER_TLS", asked)

    async def main() -> tuple[str, str]:
        sctx, cctx, mgr = await _contexts()
        loop = asyncio.get_running_loop()
        s, c = await loopback_tcp_pair()
        server, client = Sink(), Sink()
        try:
            return await asyncio.gather(
                tlssock.start_tls(loop, server, s, sctx, side="server", timeout=10),
                tlssock.start_tls(loop, client, c, cctx, side="client", timeout=10),
            )
        finally:
            for p in (server, client):
                if p.transport is not None:
                    p.transport.abort()
            await mgr.close()

    assert list(run(loop_name, main)) == [asked, asked]


def test_the_c_path_refuses_an_object_it_cannot_prove() -> None:
    """_tlscore reads OpenSSL's handle out of CPython's private _SSLSocket
    struct only after proving it: the right type, an SSL of the asked role
    whose read BIO holds the caller's marker.  Anything else is a TypeError
    (the caller stays on the event loop's TLS), never a wild pointer."""
    assert tlssock.core_available(), "the C extension is not built: pip install -e ."
    core_type = tlssock._tlscore.Core
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    a, b = socket.socketpair()
    try:
        incoming = ssl.MemoryBIO()
        obj = ctx.wrap_bio(incoming, ssl.MemoryBIO())
        with pytest.raises(TypeError, match="_SSLSocket"):
            core_type(obj, a.fileno(), b"marker", False)  # the SSLObject, not its _sslobj
        with pytest.raises(TypeError):
            core_type(object(), a.fileno(), b"marker", False)
        incoming.write(b"another")
        with pytest.raises(TypeError, match=r"layout|marker"):
            core_type(obj._sslobj, a.fileno(), b"marker!", False)  # not what the BIO holds
        obj2 = ctx.wrap_bio(incoming2 := ssl.MemoryBIO(), ssl.MemoryBIO())
        incoming2.write(b"marker")
        with pytest.raises(TypeError):
            core_type(obj2._sslobj, a.fileno(), b"marker", True)  # a client, asked as a server
        obj3 = ctx.wrap_bio(incoming3 := ssl.MemoryBIO(), ssl.MemoryBIO())
        incoming3.write(b"marker")
        core = core_type(obj3._sslobj, a.fileno(), b"marker", False)
        assert core.unsent() == 0 and not core.pending()
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("path", PATHS)
def test_a_peer_that_sends_garbage_fails_the_handshake(path: str) -> None:
    """Plaintext where a TLS record should be: an ssl.SSLError from the
    handshake, and the socket closed."""

    async def main() -> None:
        sctx, _, mgr = await _contexts()
        loop = asyncio.get_running_loop()
        s, c = await loopback_tcp_pair()
        try:
            await loop.sock_sendall(c, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 4)
            with pytest.raises(ssl.SSLError):
                await connector(path)(loop, Sink(), s, sctx, server_side=True, timeout=5)
            assert s.fileno() == -1  # consumed and closed
        finally:
            c.close()
            await mgr.close()

    run("asyncio", main)


@pytest.mark.parametrize("path", PATHS)
def test_a_connection_cut_inside_a_record_ends_as_eof(path: str) -> None:
    """After the handshake the peer sends half a TLS record and a FIN (no
    close_notify): the reader gets every whole record before it, then EOF,
    once (no spin on the half record).  Run on a thread with a bound: a C
    loop that spins never gives the event loop back."""
    import threading

    async def main() -> tuple[int, bool]:
        server, client = Sink(), Sink()
        async with _pair(server, client, path) as (_, ct):
            ct.write(b"whole" * 1000)
            for _ in range(200):
                if server.n == 5000:
                    break
                await asyncio.sleep(0.01)
            raw = ct.get_extra_info("socket")
            os.write(raw.fileno(), b"\x17\x03\x03\x40\x00" + b"x" * 100)  # 16 KiB announced
            raw.shutdown(socket.SHUT_WR)
            await asyncio.wait_for(server.eof, 5)
            return server.n, server.eof.done()

    got: list[Any] = []
    t = threading.Thread(target=lambda: got.append(run("asyncio", main)), daemon=True)
    t.start()
    t.join(20)
    assert not t.is_alive(), "the reader did not come back from a cut record"
    assert got == [(5000, True)]
