"""HBONE's TLS transports besides the event loop's: OpenSSL on the socket
(for kernel TLS) and the C path (records moved by _tlscore.c, the default).

The event loop's TLS (asyncio's and uvloop's SSLProtocol) runs OpenSSL over
memory BIOs: every byte is copied into and out of them, and OpenSSL cannot
hand the session keys to the kernel, because kTLS needs TLS on a socket.
This transport runs OpenSSL on the TCP socket (Python's SSLSocket, non-
blocking, driven by the loop's add_reader/add_writer) with
SSL_OP_ENABLE_KTLS: where the kernel has the tls module, OpenSSL moves the
sending side into the kernel after the handshake (TCP_ULP "tls"; OpenSSL 3.0
does this for TLS 1.3 transmit only, receive stays in user space), and the
transport then writes the frames to the socket itself, a batch per writev:
the kernel makes and encrypts the records.  Where it has not, the same
transport is user-space TLS on a socket BIO.

`TETHER_TLS=c|loop|socket` picks the path; `tlssock.path()` says which is
in force, and every HBONE connection's record says which it is on and
whether the kernel took its sending side.  "c", the default, is OpenSSL on
a BIO pair whose records agent/tunnel/_tlscore.c moves to and from the
socket (TlsCoreTransport, at the end of this file): fewer copies and
syscalls than either of the others (README, "The C TLS path and the
heap").  Where the extension is not built, "c" is the loop's TLS, said
once in the log.

The transport is the subset of asyncio.Transport that H2Conn uses: write,
writelines, close, abort, is_closing, get_extra_info, pause/resume_reading,
the write buffer limits with pause_writing/resume_writing, and
connection_made/data_received/eof_received/connection_lost on the protocol.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any

from agent.tunnel import limits
from agent.tunnel.relay import fd_ready

log = logging.getLogger(__name__)

#: called with (side, path) for every HBONE TLS connection established:
#: side "client" or "server"; path "kernel_tx" (the kernel encrypts what is
#: sent), "socket" (user-space TLS on the socket) or "loop" (the event loop's)
on_established: list[Callable[[str, str], None]] = []

SSL_OP_ENABLE_KTLS = getattr(ssl, "OP_ENABLE_KTLS", 1 << 3)  # Python 3.12+; OpenSSL 3 bit 3
TCP_ULP = 31  # linux/tcp.h
READ_MAX = 256 * 1024  # decrypted bytes handed to the protocol per readable event
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024
WRITEV_BATCH = 64  # pieces per writev (IOV_MAX is 1024)
CHOICES = ("loop", "socket", "c")


DEFAULT = "c"  # measured ahead of the loop's TLS: README, "The C TLS path and the heap"


def path() -> str:
    """The TLS path in force: TETHER_TLS, else "c"; "loop" when the value is
    unknown or "c" cannot run here (the extension not built)."""
    return _path_of(os.environ.get("TETHER_TLS", DEFAULT))


@functools.cache
def _path_of(value: str) -> str:
    """(cached: asked per connection, a bad value is reported once)"""
    name = value.strip().lower() or "loop"
    if name not in CHOICES:
        log.warning("TETHER_TLS=%r is none of %s: using loop", name, "|".join(CHOICES))
        return "loop"
    if name == "c" and not core_available():
        return "loop"
    return name


async def start_tls(
    loop: asyncio.AbstractEventLoop,
    protocol: asyncio.Protocol,
    sock: socket.socket,
    ctx: ssl.SSLContext,
    *,
    side: str,
    timeout: float,
) -> str:
    """The HBONE TLS handshake on a connected `sock` for `side` ("client" or
    "server") on the path TETHER_TLS picks; `protocol` is connected to the
    transport.  Returns the path in use (see `established`).  Raises what
    the handshake raises (ssl.SSLError, OSError, TimeoutError)."""
    transport: asyncio.BaseTransport
    chosen = path()
    if chosen == "socket":
        transport = await connect(
            loop, protocol, sock, ctx, server_side=side == "server", timeout=timeout
        )
    elif chosen == "c":
        transport = await connect_core(
            loop, protocol, sock, ctx, server_side=side == "server", timeout=timeout
        )
    elif side == "server":
        # not the returned protocol: uvloop returns its SSLProtocol there
        transport, _ = await loop.connect_accepted_socket(
            lambda: protocol,
            sock,
            ssl=ctx,
            ssl_handshake_timeout=timeout,
            ssl_shutdown_timeout=limits.SHUTDOWN_TIMEOUT,
        )
    else:
        transport, _ = await asyncio.wait_for(
            loop.create_connection(
                lambda: protocol,
                sock=sock,
                ssl=ctx,
                server_hostname="",  # no SNI
                ssl_handshake_timeout=timeout,
                ssl_shutdown_timeout=limits.SHUTDOWN_TIMEOUT,
            ),
            timeout,
        )
    return established(transport, side)


def kernel_ulp(sock: socket.socket) -> str:
    """The socket's upper-layer protocol: "tls" once the kernel holds its keys."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, TCP_ULP, 16)
    except OSError:
        return ""
    return raw.rstrip(b"\0").decode(errors="replace")


def established(transport: asyncio.BaseTransport, side: str) -> str:
    """Which TLS path a handshaken HBONE transport is on; the hooks hear of it."""
    if isinstance(transport, TlsCoreTransport):
        used = "c"
    elif isinstance(transport, TlsSocketTransport):
        used = "kernel_tx" if transport.ktls_tx else "socket"
    else:
        used = "loop"
    for hook in on_established:
        hook(side, used)
    return used


async def connect(
    loop: asyncio.AbstractEventLoop,
    protocol: asyncio.Protocol,
    sock: socket.socket,
    ctx: ssl.SSLContext,
    *,
    server_side: bool,
    timeout: float,
) -> TlsSocketTransport:
    """The TLS handshake on `sock` (connected, non-blocking) within `timeout`,
    then a transport driving `protocol`.  `sock` is consumed: on any failure
    the connection is closed, and the error (ssl.SSLError, OSError,
    TimeoutError) propagates."""
    ctx.options |= SSL_OP_ENABLE_KTLS
    sock.setblocking(False)
    tls = ctx.wrap_socket(
        sock,
        server_side=server_side,
        server_hostname=None,
        do_handshake_on_connect=False,
    )
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    tls.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await fd_ready(loop, tls.fileno(), write=False)
                except ssl.SSLWantWriteError:
                    await fd_ready(loop, tls.fileno(), write=True)
        # (a peer gone right after the handshake fails getpeername() here)
        return TlsSocketTransport(loop, tls, tls, protocol)
    except BaseException:
        tls.close()
        raise


class TlsSocketTransport(asyncio.Transport):
    """OpenSSL on the socket (ssl.SSLSocket), or on a subclass's own I/O:
    `sock` is the TCP socket, `ssl_object` answers getpeercert()."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        ssl_object: ssl.SSLSocket | ssl.SSLObject,
        protocol: asyncio.Protocol,
    ) -> None:
        super().__init__()
        self._loop = loop
        self._sock = sock
        self._tls: Any = ssl_object
        self._fd = sock.fileno()
        self._protocol = protocol
        self._out: collections.deque[bytes | memoryview] = collections.deque()
        self._out_bytes = 0
        self._high, self._low = HIGH_WATER, LOW_WATER
        self._writer = False  # add_writer armed
        self._reading = True
        self._closing = False
        self._lost = False
        self._protocol_paused = False
        self._close_timer: asyncio.TimerHandle | None = None
        self.close_timeout = limits.SHUTDOWN_TIMEOUT
        self.ktls_tx = kernel_ulp(sock) == "tls"
        self._extra = {
            "ssl_object": ssl_object,
            "socket": sock,
            "peername": sock.getpeername(),
            "sockname": sock.getsockname(),
            "cipher": ssl_object.cipher(),
            "ktls_tx": self.ktls_tx,
        }
        protocol.connection_made(self)
        if not self._closing:
            loop.add_reader(self._fd, self._read_ready)
            if self._pending():
                loop.call_soon(self._read_ready)

    # -- reading ------------------------------------------------------------

    def _read_ready(self) -> None:
        if self._lost or self._closing or not self._reading:
            return  # (a call_soon from before close() or pause_reading())
        chunks: list[bytes] = []
        total, eof = 0, False
        try:
            while total < READ_MAX:
                try:
                    data = self._tls.recv(READ_MAX - total)  # one record at most
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    break
                if not data:
                    eof = True
                    break
                chunks.append(data)
                total += len(data)
        except (OSError, ssl.SSLError) as e:
            if chunks:
                self._protocol.data_received(b"".join(chunks))
            self._fatal(e)
            return
        if chunks:
            self._protocol.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if eof:
            self._eof()
        elif total >= READ_MAX and self._reading and not self._lost and self._pending():
            self._loop.call_soon(self._read_ready)  # decrypted bytes epoll cannot see

    def _eof(self) -> None:
        self._loop.remove_reader(self._fd)
        keep = False
        with contextlib.suppress(AttributeError):
            keep = bool(self._protocol.eof_received())
        if not keep:
            self.close()

    def pause_reading(self) -> None:
        if self._reading and not self._lost:
            self._reading = False
            self._loop.remove_reader(self._fd)

    def resume_reading(self) -> None:
        if not self._reading and not self._lost and not self._closing:
            self._reading = True
            self._loop.add_reader(self._fd, self._read_ready)
            if self._pending():
                self._loop.call_soon(self._read_ready)

    def _pending(self) -> bool:
        """Decrypted bytes that no readable event will announce."""
        return bool(self._tls.pending())

    def is_reading(self) -> bool:
        return self._reading and not self._lost

    # -- writing ------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data or self._closing or self._lost:
            return  # after close(): nothing more goes out (as the loop's transports)
        self._out.append(data if isinstance(data, bytes | memoryview) else bytes(data))
        self._out_bytes += len(data)
        if not self._writer:
            self._flush()
        self._maybe_pause()

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _flush(self) -> None:
        """Write what is queued until the socket would block."""
        try:
            done = self._flush_out()
        except (OSError, ssl.SSLError) as e:
            self._fatal(e)
            return
        if not done:
            if not self._writer:
                self._writer = True
                self._loop.add_writer(self._fd, self._write_ready)
            return
        if self._writer:
            self._writer = False
            self._loop.remove_writer(self._fd)
        self._maybe_resume()
        if self._closing:
            self._finish_close()

    def _flush_out(self) -> bool:
        return self._flush_kernel() if self.ktls_tx else self._flush_ssl()

    def _flush_ssl(self) -> bool:
        """Through SSL_write, one queued piece at a time.  A write that blocks
        is retried with the same object (OpenSSL's rule), and OpenSSL resumes
        it where it stopped.  False: the socket would block."""
        while self._out:
            head = self._out[0]
            try:
                n = self._tls.send(head)
            except (ssl.SSLWantWriteError, ssl.SSLWantReadError, BlockingIOError):
                return False
            if n != len(head):  # partial writes are off in Python's ssl: never expected
                raise OSError(f"TLS write took {n} of {len(head)} bytes")
            self._out.popleft()
            self._out_bytes -= n
        return True

    def _flush_kernel(self) -> bool:
        """The kernel holds the sending keys: plaintext goes to the socket as
        it is, a batch of queued pieces per writev (frame headers and payloads
        in one call, no copy in user space); the kernel makes the records.
        False: the socket would block."""
        while self._out:
            batch = list(itertools.islice(self._out, WRITEV_BATCH))
            try:
                n = os.writev(self._fd, batch)
            except BlockingIOError:
                return False
            self._taken(n)
        return True

    def _taken(self, n: int) -> None:
        """The first `n` queued bytes are on their way: off the queue (a
        piece taken in part is cut where it stopped)."""
        self._out_bytes -= n
        out = self._out
        while n:
            head = out[0]
            if n >= len(head):
                n -= len(head)
                out.popleft()
            else:
                out[0] = memoryview(head)[n:]
                n = 0

    def _write_ready(self) -> None:
        if not self._lost:
            self._flush()

    def _maybe_pause(self) -> None:
        if not self._protocol_paused and self._out_bytes > self._high:
            self._protocol_paused = True
            with contextlib.suppress(AttributeError):
                self._protocol.pause_writing()

    def _maybe_resume(self) -> None:
        if self._protocol_paused and self._out_bytes <= self._low:
            self._protocol_paused = False
            with contextlib.suppress(AttributeError):
                self._protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return self._out_bytes

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = HIGH_WATER if high is None else high
        self._low = self._high // 4 if low is None else low
        self._maybe_pause()

    def can_write_eof(self) -> bool:
        return False  # TLS has no half-close

    def write_eof(self) -> None:
        raise NotImplementedError("TLS transports cannot half-close")

    # -- closing ------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        """Send what is queued, then close_notify, then close the socket; a
        peer that does not read what is queued within `close_timeout` gets
        the connection aborted (as the loop's ssl_shutdown_timeout)."""
        if self._closing or self._lost:
            return
        self._closing = True
        if self._reading:
            self._loop.remove_reader(self._fd)
        if not self._out:
            self._finish_close()
        else:
            self._close_timer = self._loop.call_later(self.close_timeout, self.abort)

    def _finish_close(self) -> None:
        if self._lost:
            return
        # close_notify; a non-blocking SSL_shutdown that would wait for the
        # peer's reply stops there (the alert is sent: that is all we want)
        self._close_notify()
        self._lose(None)

    def _close_notify(self) -> None:
        with contextlib.suppress(OSError, ssl.SSLError, ValueError):
            self._tls.unwrap()

    def abort(self) -> None:
        self._lose(None)

    def _fatal(self, exc: BaseException) -> None:
        log.debug("HBONE TLS socket %s: %s", self._extra.get("peername"), exc)
        self._lose(exc if isinstance(exc, Exception) else None)

    def _lose(self, exc: Exception | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        if self._close_timer is not None:
            self._close_timer.cancel()
        self._loop.remove_reader(self._fd)
        if self._writer:
            self._loop.remove_writer(self._fd)
            self._writer = False
        self._out.clear()
        self._out_bytes = 0
        with contextlib.suppress(OSError):
            self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)

    # -- information ---------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._extra.get(name, default)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._protocol = protocol


# -- the C path: OpenSSL records moved by agent/tunnel/_tlscore.c ------------

try:
    from agent.tunnel import _tlscore
except ImportError as e:  # not built (a checkout without `pip install`), or another OpenSSL
    _tlscore = None  # type: ignore[assignment]
    _core_missing = str(e)
else:
    _core_missing = ""


def core_available() -> bool:
    """Whether the C path can run here; says once why not."""
    if _tlscore is None:
        _warn_core_missing()
    return _tlscore is not None


@functools.cache
def _warn_core_missing() -> None:
    log.warning("TETHER_TLS=c: the C extension is not available (%s): using loop", _core_missing)


async def connect_core(
    loop: asyncio.AbstractEventLoop,
    protocol: asyncio.Protocol,
    sock: socket.socket,
    ctx: ssl.SSLContext,
    *,
    server_side: bool,
    timeout: float,
) -> TlsCoreTransport:
    """As `connect`, with the records moved by the C extension: Python's ssl
    configures and owns the TLS object (SSLContext.wrap_bio), the extension
    moves its records between a BIO pair and `sock`.  `sock` is consumed."""
    assert _tlscore is not None
    sock.setblocking(False)
    try:
        incoming = ssl.MemoryBIO()
        tls = ctx.wrap_bio(incoming, ssl.MemoryBIO(), server_side=server_side)
        # the extension proves it found this object's OpenSSL handle by
        # reading these bytes back out of its read BIO (_tlscore.c)
        marker = os.urandom(16)
        incoming.write(marker)
        core = _tlscore.Core(tls._sslobj, sock.fileno(), marker, server_side)  # type: ignore[attr-defined]
        async with asyncio.timeout(timeout):
            while (want := core.handshake()) != 0:
                await fd_ready(loop, sock.fileno(), write=want == 2)
        return TlsCoreTransport(loop, sock, tls, protocol, core)
    except BaseException:
        sock.close()
        raise


class TlsCoreTransport(TlsSocketTransport):
    """The socket path's transport with the C extension moving the records:
    a read() per readable event (up to READ_MAX decrypted, one syscall per
    256 KiB of records), a write() per batch of queued pieces."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        tls: ssl.SSLObject,
        protocol: asyncio.Protocol,
        core: _tlscore.Core,
    ) -> None:
        self._core = core
        super().__init__(loop, sock, tls, protocol)
        if core.unsent() and not self._lost:  # the server's session tickets
            self._flush()

    def _pending(self) -> bool:
        return bool(self._core.pending())

    def _read_ready(self) -> None:
        if self._lost or self._closing or not self._reading:
            return
        try:
            data, state = self._core.read(READ_MAX)
        except (OSError, ssl.SSLError) as e:
            self._fatal(e)
            return
        if data:
            self._protocol.data_received(data)
        if self._core.unsent() and not self._writer and not self._lost:
            self._flush()  # records of its own a read made (key updates)
        if state == 1:
            if not self._lost:
                self._eof()
        elif state == 2 and self._reading and not self._lost:
            self._loop.call_soon(self._read_ready)

    def _flush_out(self) -> bool:
        """Queued pieces encrypted and written a batch per call; False: the
        socket would block (what OpenSSL took is off the queue)."""
        out = self._out
        if not out:  # records of its own only (session tickets, key updates)
            return bool(self._core.flush())
        while out:
            taken, blocked = self._core.write(list(itertools.islice(out, WRITEV_BATCH)))
            self._taken(taken)
            if blocked:
                return False
        return True

    def _close_notify(self) -> None:
        with contextlib.suppress(OSError, ssl.SSLError):
            self._core.close_notify()
