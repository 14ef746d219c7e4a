"""Byte relay between two connected sockets on asyncio transports.

Protocols rather than stream coroutines: data_received hands bytes straight to
the other transport with no task switch, flow control is the transports' own
(pause_writing on one side pauses reading on the other), and a relay can be
frozen at a clean point (reads paused, write buffers drained) so its sockets
can be handed to a successor agent without losing a byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, cast


def tcp_socket(family: int) -> socket.socket:
    """A TCP socket for the tunnel, with TCP_NODELAY: a relay must pass every
    byte on at once.  Created with proto=IPPROTO_TCP, so sockets accepted from
    it carry that proto too and asyncio's transports set TCP_NODELAY on them
    as well (asyncio only does so when sock.proto == IPPROTO_TCP, and
    `socket.socket(family, SOCK_STREAM)` reports proto 0).  Seen on the wire
    before (tcpdump in both pods, while the test tiers loaded the machine):
    the HBONE server's Nagle held a 32-byte h2 frame until the client's 40 ms
    delayed ACK, stalling one new connection in ten (188 -> 804 conn/s under
    the same load); on an idle machine the stall rarely shows."""
    s = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


async def fd_ready(
    loop: asyncio.AbstractEventLoop, fd: int, write: bool, timeout: float | None = None
) -> None:
    """Until `fd` is writable (`write`) or readable, or `timeout` s have
    passed (TimeoutError): one callback, one future, one timer.  Its own
    timer rather than asyncio.timeout(): that asks for the running loop and
    task, each a getpid syscall on CPython 3.11, on every connect."""
    fut: asyncio.Future[None] = loop.create_future()

    def done() -> None:
        if not fut.done():
            fut.set_result(None)

    def expired() -> None:
        if not fut.done():
            fut.set_exception(TimeoutError())

    if write:
        loop.add_writer(fd, done)
    else:
        loop.add_reader(fd, done)
    timer = loop.call_later(timeout, expired) if timeout is not None else None
    try:
        await fut
    finally:
        if timer is not None:
            timer.cancel()
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def connect(sock: socket.socket, addr: tuple[str, int], timeout: float) -> None:
    """Connect the non-blocking `sock` to the numeric address `addr` within
    `timeout` s (TimeoutError; OSError for a refusal).  What
    `loop.sock_connect` does, without its name lookup: uvloop resolves even
    a numeric address through getaddrinfo on its thread pool, two thread
    wake-ups per connection (strace: ~4 futex calls per delivered
    connection), and `wait_for` around it costs a task."""
    try:
        sock.connect(addr)
        return
    except (BlockingIOError, InterruptedError):
        pass  # EINPROGRESS: writable when the handshake is done (or failed)
    try:
        await fd_ready(asyncio.get_running_loop(), sock.fileno(), write=True, timeout=timeout)
    except TimeoutError:
        raise TimeoutError(f"connect to {addr[0]}:{addr[1]} timed out") from None
    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if code:
        raise OSError(code, f"connect to {addr[0]}:{addr[1]}: {os.strerror(code)}")


def reset_transport(transport: asyncio.Transport | None) -> None:
    """Close with RST (SO_LINGER 0), as the kernel does for a direct TCP
    connection whose other end aborted: the application must see
    ECONNRESET, not a FIN that makes a cut transfer look complete."""
    if transport is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


async def poll_until(done: Callable[[], bool], timeout: float, every: float = 0.005) -> bool:
    """Check `done` every `every` s until it holds (True) or `timeout` s pass
    (False).  For transport state that raises no event: buffers drained to
    the kernel, the kernel's send queue acknowledged."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(every)
    return True


class _Half(asyncio.Protocol):
    """One socket of a relay; what it reads goes to its peer's transport."""

    def __init__(self, relay: Relay, name: str) -> None:
        self.relay = relay
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.bytes_in = 0
        self.pending: list[bytes] = []
        self.eof = False
        self.closed = False

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses (same interface)
        self.transport = transport = cast(asyncio.Transport, base)
        # The peer may have read bytes before this end existed.
        if self.peer is not None and self.peer.pending:
            for chunk in self.peer.pending:
                transport.write(chunk)
            self.peer.pending.clear()
        if self.peer is not None and self.peer.eof and transport.can_write_eof():
            transport.write_eof()

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        assert self.peer is not None
        if self.peer.transport is None:
            self.pending.append(data)
        else:
            self.peer.transport.write(data)

    def eof_received(self) -> bool:
        """Half-close: pass the FIN on, keep the other direction open."""
        self.eof = True
        assert self.peer is not None
        if self.peer.transport is None:
            return True  # the peer's connection_made passes it on
        if self.peer.transport.can_write_eof() and not self.peer.transport.is_closing():
            self.peer.transport.write_eof()
        if self.peer.eof:
            self.relay.close()
        return True

    def pause_writing(self) -> None:
        if self.peer and self.peer.transport:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer and self.peer.transport and not self.relay.frozen:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.relay.frozen:
            return
        if exc is not None:  # ECONNRESET and the like: pass the abort on
            self.relay.abort(self, exc)
        else:
            self.relay.close()


class Relay:
    """Relays a and b until both sides finish.  `done` resolves then."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info
        self.a = _Half(self, "a")
        self.b = _Half(self, "b")
        self.a.peer, self.b.peer = self.b, self.a
        self.frozen = False
        self.started = time.monotonic()
        self.abort_flag: str | None = None  # Istio response flag when a side aborted
        self.abort_reason: str | None = None
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def start(self, a: socket.socket, b: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(lambda: self.b, b)
        await loop.connect_accepted_socket(lambda: self.a, a)

    @property
    def bytes_a_to_b(self) -> int:
        return self.a.bytes_in

    @property
    def bytes_b_to_a(self) -> int:
        return self.b.bytes_in

    def abort(self, side: _Half, exc: Exception) -> None:
        """One side was reset: reset the other (a is the downstream side)."""
        if self.abort_flag is None and not self.done.done():
            self.abort_flag = "DC" if side is self.a else "UC"
            self.abort_reason = f"{'downstream' if side is self.a else 'upstream'} reset: {exc}"
        assert side.peer is not None
        reset_transport(side.peer.transport)
        self.close()

    def kill(self) -> None:
        """Reset both sides (policy change)."""
        for half in (self.a, self.b):
            reset_transport(half.transport)
        self.close()

    def close(self) -> None:
        for half in (self.a, self.b):
            if half.transport is not None and not half.transport.is_closing():
                half.transport.close()
        if not self.done.done():
            self.done.set_result(None)

    async def freeze(self, timeout: float = 5.0) -> tuple[socket.socket, socket.socket] | None:
        """Stop reading, let buffered bytes drain to the kernel, and give back
        duplicates of both sockets for a successor; the relay is then closed
        here without shutting the connections down.  None if it ended first."""
        self.frozen = True
        halves = (self.a, self.b)
        for half in halves:
            if half.transport is not None and not half.transport.is_closing():
                half.transport.pause_reading()
        if not await poll_until(
            lambda: all(
                h.transport is None or h.transport.get_write_buffer_size() == 0 for h in halves
            ),
            timeout,
        ):
            raise TimeoutError("relay did not drain")
        socks: list[socket.socket] = []
        for half in halves:
            if half.transport is None or half.closed:
                return None
            ts = half.transport.get_extra_info("socket")
            socks.append(socket.socket(fileno=socket.dup(ts.fileno())))
        for half in halves:
            assert half.transport is not None
            half.transport.abort()  # closes our fd only; the dups keep the connection
        if not self.done.done():
            self.done.set_result(None)
        return socks[0], socks[1]
