"""The handoff protocol between a running agent and its successor, over a
real unix socket: a version both speak moves the sockets; any other version
(or a pre-versioning successor) makes the predecessor release its listeners
instead, and the successor starts fresh.  Never a guess at a foreign layout."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from agent import handoff


class Predecessor:
    def __init__(self) -> None:
        self.listener, self.peer = socket.socketpair()
        self.a, self.b = socket.socketpair()
        self.gave = self.released = 0

    async def give(self) -> handoff.Bundle:
        self.gave += 1
        return {
            "shop/a": {
                "listeners": {"outbound": self.listener},
                "connections": [{"info": {"path": "local"}, "a": self.a, "b": self.b}],
            }
        }

    async def release(self) -> None:
        self.released += 1


async def _run(tmp_path: Path, ask: bytes | None) -> tuple[Predecessor, object, bool]:
    old = Predecessor()
    stop = asyncio.Event()
    server = await handoff.serve(str(tmp_path), old.give, old.release, stop)
    try:
        if ask is None:
            got: object = await handoff.receive(str(tmp_path))
        else:

            def raw() -> bytes:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(5)
                    s.connect(str(tmp_path / handoff.SOCKET_NAME))
                    s.sendall(ask)
                    return s.recv(4096)

            got = await asyncio.get_running_loop().run_in_executor(None, raw)
        await asyncio.wait_for(stop.wait(), 5)
        return old, got, stop.is_set()
    finally:
        server.close()


def test_same_version_moves_listeners_and_connections(tmp_path: Path) -> None:
    old, bundle, stopped = asyncio.run(_run(tmp_path, None))
    assert stopped and old.gave == 1 and old.released == 0
    assert isinstance(bundle, dict)
    pod = bundle["shop/a"]
    assert pod["connections"][0]["info"] == {"path": "local"}
    # the received sockets are the same kernel objects: bytes written to the
    # predecessor's peer arrive on the successor's listener socket
    old.peer.sendall(b"ping")
    assert pod["listeners"]["outbound"].recv(4) == b"ping"
    old.b.close()  # the predecessor's copies were closed after sending
    for s in (pod["listeners"]["outbound"], pod["connections"][0]["a"], pod["connections"][0]["b"]):
        s.close()


@pytest.mark.parametrize("ask", [b"HANDOFF 2\n", b"HANDOFF\n", b"HANDOFF v1\n"])
def test_other_version_gets_a_release_not_sockets(tmp_path: Path, ask: bytes) -> None:
    old, answer, stopped = asyncio.run(_run(tmp_path, ask))
    assert stopped and old.gave == 0 and old.released == 1
    assert isinstance(answer, bytes) and answer.startswith(b"RELEASED ")
    assert b"speaks [1]" in answer


def test_successor_of_another_version_starts_fresh_after_a_release(tmp_path: Path) -> None:
    async def go() -> tuple[Predecessor, handoff.Bundle | None]:
        old = Predecessor()
        stop = asyncio.Event()
        server = await handoff.serve(str(tmp_path), old.give, old.release, stop)
        try:
            got = await handoff.receive(str(tmp_path), version=handoff.VERSION + 1)
            await asyncio.wait_for(stop.wait(), 5)
            return old, got
        finally:
            server.close()

    old, got = asyncio.run(go())
    assert got is None and old.released == 1 and old.gave == 0


def test_anything_but_a_successor_is_ignored(tmp_path: Path) -> None:
    async def go() -> tuple[Predecessor, bool]:
        old = Predecessor()
        stop = asyncio.Event()
        server = await handoff.serve(str(tmp_path), old.give, old.release, stop)
        try:
            r, w = await asyncio.open_unix_connection(str(tmp_path / handoff.SOCKET_NAME))
            w.write(b"GET / HTTP/1.0\r\n\r\n")
            await w.drain()
            assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
            return old, stop.is_set()
        finally:
            server.close()

    old, stopped = asyncio.run(go())
    assert not stopped and old.gave == 0 and old.released == 0


def test_no_predecessor_starts_fresh(tmp_path: Path) -> None:
    assert asyncio.run(handoff.receive(str(tmp_path))) is None
    with socket.socket(socket.AF_UNIX) as s:  # the stale socket file of a crashed agent
        s.bind(str(tmp_path / handoff.SOCKET_NAME))
    assert asyncio.run(handoff.receive(str(tmp_path))) is None
    assert not (tmp_path / handoff.SOCKET_NAME).exists()
