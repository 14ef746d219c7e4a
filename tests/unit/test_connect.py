"""agent.tunnel.relay.connect: the agent's own non-blocking connect (no name
lookup, no task), on both event loops the agent can run: it connects, it
reports a refusal as OSError and a connect that hangs as TimeoutError, and
it leaves no writer registered on the loop either way."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from agent import eventloop
from agent.tunnel.relay import connect, tcp_socket

T = TypeVar("T")

LOOPS = [
    pytest.param(name, id=name)
    for name in eventloop.CHOICES
    if eventloop.loop_factory(name)[0] == name  # uvloop only where installed
]


def _run(loop_name: str, coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return eventloop.run(coro_fn(), loop_name)


def _client() -> socket.socket:
    s = tcp_socket(socket.AF_INET)
    s.setblocking(False)
    return s


@pytest.mark.parametrize("loop_name", LOOPS)
def test_connects_and_carries_bytes(loop_name: str) -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    addr = srv.getsockname()

    async def main() -> bytes:
        c = _client()
        try:
            await connect(c, addr, 5.0)
            peer, _ = srv.accept()
            with peer:
                c.sendall(b"ping")
                peer.settimeout(5)
                got = peer.recv(4)
            # the writer that waited for the connect is gone: a new one can be added
            loop = asyncio.get_running_loop()
            assert not loop.remove_writer(c.fileno())
            return got
        finally:
            c.close()

    try:
        assert _run(loop_name, main) == b"ping"
    finally:
        srv.close()


@pytest.mark.parametrize("loop_name", LOOPS)
def test_refused_is_oserror(loop_name: str) -> None:
    probe = socket.create_server(("127.0.0.1", 0))
    addr = probe.getsockname()
    probe.close()  # nothing listens there now

    async def main() -> None:
        c = _client()
        try:
            with pytest.raises(OSError) as e:
                await connect(c, addr, 5.0)
            assert not isinstance(e.value, TimeoutError)
            assert not asyncio.get_running_loop().remove_writer(c.fileno())
        finally:
            c.close()

    _run(loop_name, main)


@pytest.mark.parametrize("loop_name", LOOPS)
def test_hanging_connect_times_out(loop_name: str) -> None:
    """A listener whose accept queue is full drops SYNs: the connect hangs
    (the kernel retransmits) until our timeout ends it."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    addr = srv.getsockname()
    fillers = []
    for _ in range(8):  # listen(0) holds one or two; the rest stay in SYN_SENT
        f = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        f.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            f.connect(addr)
        fillers.append(f)

    async def main() -> None:
        c = _client()
        try:
            with pytest.raises(TimeoutError, match="timed out"):
                await connect(c, addr, 0.3)
            assert not asyncio.get_running_loop().remove_writer(c.fileno())
        finally:
            c.close()

    try:
        _run(loop_name, main)
    finally:
        for f in fillers:
            f.close()
        srv.close()
