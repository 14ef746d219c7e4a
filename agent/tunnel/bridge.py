"""Relay between a plain TCP socket (the app's side) and an HBONE stream."""

from __future__ import annotations

import asyncio
import fcntl
import socket
import struct
import termios
from typing import cast

from agent.tunnel.h2conn import HIGH_WATER, H2Stream
from agent.tunnel.relay import poll_until, reset_transport

# A stream reset by the peer (RST_STREAM, or its HBONE connection lost) ends
# the app's connection with an RST (RFC 9113 §8.5), never a FIN that would
# pass a cut transfer as whole; but only once the app has every byte the
# stream delivered before the reset: an RST discards the socket's send queue.
# Envoy resets a waypoint's CONNECT stream (CONNECT_ERROR) right after the
# last DATA when its inner connection closes, as it does after a response to
# `connection: close`; an immediate RST cut such responses short.  Bounded:
# an app that stops reading gets the RST after this long.
FLUSH_BEFORE_RESET_S = 5.0


def unacked_bytes(transport: asyncio.Transport) -> int:
    """Bytes the transport still holds plus those the kernel has not had
    acknowledged (SIOCOUTQ, which is TIOCOUTQ); 0 when the socket is gone."""
    pending = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is None:
        return pending
    try:
        out = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (OSError, ValueError):
        return pending
    return pending + int(struct.unpack("i", out)[0])


class _SocketSide(asyncio.Protocol):
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.transport: asyncio.Transport | None = None

    def connection_made(self, base: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses (same interface)
        self.transport = transport = cast(asyncio.Transport, base)
        self.bridge._socket_ready(transport)

    def data_received(self, data: bytes) -> None:
        self.bridge.from_socket += len(data)
        stream = self.bridge.stream
        stream.write(data)
        if stream.buffered() > HIGH_WATER and self.transport is not None:
            self.transport.pause_reading()
            self.bridge._resume_when_drained()

    def eof_received(self) -> bool:
        self.bridge.stream.write_eof()
        self.bridge._half_closed("socket")
        return True

    def pause_writing(self) -> None:
        self.bridge.stream.pause_reading()  # stop acking: the peer's window closes

    def resume_writing(self) -> None:
        self.bridge.stream.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:  # the app reset its connection: so does the stream
            self.bridge._aborted("socket", exc)
            self.bridge.stream.reset()
        elif not self.bridge.socket_eof:
            self.bridge.stream.write_eof()
        self.bridge._finish(exc)


class Bridge:
    """Bytes from the socket go out as DATA on the stream and back.  `done`
    resolves when both directions have ended (or either side failed)."""

    def __init__(self, stream: H2Stream, initiator: str = "socket") -> None:
        self.stream = stream
        self.initiator = initiator  # which side opened the connection, for byte counts
        self.transport: asyncio.Transport | None = None
        self.from_socket = 0
        self.socket_eof = False
        self.stream_eof = False
        self.error: Exception | None = None
        self.abort_flag: str | None = None  # Istio response flag when a side aborted
        self.done: asyncio.Future[None] = stream.loop.create_future()

    async def start(self, sock: socket.socket) -> None:
        await self.stream.loop.connect_accepted_socket(lambda: _SocketSide(self), sock)

    @property
    def to_socket(self) -> int:
        return self.stream.bytes_in

    @property
    def bytes_a_to_b(self) -> int:
        """Bytes from the initiator towards the destination."""
        return self.from_socket if self.initiator == "socket" else self.to_socket

    @property
    def bytes_b_to_a(self) -> int:
        return self.to_socket if self.initiator == "socket" else self.from_socket

    def _socket_ready(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.stream.attach(self._on_data, self._on_eof, self._on_close, self._on_pieces)

    def _on_data(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _on_pieces(self, pieces: list[memoryview]) -> None:
        """One payload in pieces: one writev, nothing joined."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.writelines(pieces)

    def _on_eof(self) -> None:
        self.stream_eof = True
        if (
            self.transport is not None
            and self.transport.can_write_eof()
            and not self.transport.is_closing()
        ):
            self.transport.write_eof()
        self._half_closed("stream")

    def _aborted(self, side: str, exc: Exception) -> None:
        """`side` (socket | stream) ended without a clean end; flags are from
        this connection's view: the initiator's side is downstream (DC)."""
        if self.abort_flag is None and not self.done.done():
            self.abort_flag = "DC" if side == self.initiator else "UC"
            self.error = self.error or exc

    def _on_close(self, exc: Exception | None) -> None:
        if exc is not None:
            # RST_STREAM, or the HBONE connection lost without END_STREAM: the
            # app gets what was delivered, then an RST (FLUSH_BEFORE_RESET_S)
            self._aborted("stream", exc)
            t = self.transport
            if t is None or t.is_closing() or unacked_bytes(t) == 0:
                reset_transport(t)
                self._finish(exc)
                return
            t.pause_reading()  # the stream is gone: nothing more goes out
            task = asyncio.get_running_loop().create_task(self._reset_when_flushed(t, exc))
            task.add_done_callback(lambda t: None)
            self._flush_task = task
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    async def _reset_when_flushed(self, t: asyncio.Transport, exc: Exception) -> None:
        try:
            await poll_until(lambda: t.is_closing() or unacked_bytes(t) == 0, FLUSH_BEFORE_RESET_S)
        finally:
            reset_transport(t)
            self._finish(exc)

    def _half_closed(self, side: str) -> None:
        if side == "socket":
            self.socket_eof = True
        if self.socket_eof and self.stream_eof and self.transport is not None:
            self.transport.close()

    def _resume_when_drained(self) -> None:
        async def wait() -> None:
            await self.stream.drain()
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()

        task = asyncio.get_running_loop().create_task(wait())
        task.add_done_callback(lambda t: None)
        self._drain_task = task

    def close(self) -> None:
        """Abort both sides (the stream is reset, the socket gets an RST)."""
        self.stream.reset()
        reset_transport(self.transport)
        self._finish(ConnectionAbortedError("closed by the agent"))

    def _finish(self, exc: Exception | None) -> None:
        if exc is not None and self.error is None:
            self.error = exc
        if not self.done.done():
            self.done.set_result(None)
