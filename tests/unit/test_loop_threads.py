"""agent.tunnelLoops (agent/tunnel/loops.py): extra event loops on threads,
what each runs where, and the shared pieces every loop's connections use
(admission counts, the connection table, a pod's listeners) staying exact
across threads.  Real threads, real loopback sockets, no root."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.model.settings import MAX_TUNNEL_LOOPS
from agent.sources.localfile import ConfigError, _agent_settings
from agent.state.state import ProxyState
from agent.tunnel import pod as podmod
from agent.tunnel.conns import ConnTable
from agent.tunnel.context import PodRef, Ports, Tunnel
from agent.tunnel.limits import HboneLimits
from agent.tunnel.loops import Loops, call_on, configured, run_on


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads as often as CPython will: lost updates show at once."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(interval)


def test_configured_takes_the_environment_over_the_setting(monkeypatch: Any) -> None:
    monkeypatch.delenv("TETHER_TUNNEL_LOOPS", raising=False)
    assert configured(1) == 1
    monkeypatch.setenv("TETHER_TUNNEL_LOOPS", "2")
    assert configured(1) == 2
    for bad in ("0", "-1", "two", str(MAX_TUNNEL_LOOPS + 1), "1.5"):
        monkeypatch.setenv("TETHER_TUNNEL_LOOPS", bad)
        assert configured(3) == 3, bad


def test_the_setting_is_checked_with_a_message_that_says_what_it_wants() -> None:
    assert _agent_settings({"tunnelLoops": 2}).tunnel_loops == 2
    assert _agent_settings({}).tunnel_loops == 1
    for bad in (0, MAX_TUNNEL_LOOPS + 1, "2", True, 1.5, None):
        with pytest.raises(ConfigError, match=r"agent\.tunnelLoops: expected a whole number"):
            _agent_settings({"tunnelLoops": bad})


def test_each_on_main_call_on_and_run_on_run_where_they_say() -> None:
    async def main() -> None:
        loops = Loops(3)
        loops.start()
        try:
            me = threading.get_ident()

            async def where() -> tuple[int, asyncio.AbstractEventLoop]:
                return threading.get_ident(), asyncio.get_running_loop()

            got = await loops.each(where)
            assert [lp for _, lp in got] == loops.all()
            assert got[0][0] == me and len({t for t, _ in got}) == 3

            # a coroutine of the main loop's objects, awaited from an extra loop
            async def on_main_thread() -> int:
                return threading.get_ident()

            via = loops.on_main(on_main_thread)
            extra = loops.extra[0].loop
            assert await run_on(extra, via()) == me
            assert (await run_on(extra, where()))[1] is extra

            seen: list[int] = []
            done = asyncio.Event()
            here = asyncio.get_running_loop()

            def record() -> None:
                seen.append(threading.get_ident())
                here.call_soon_threadsafe(done.set)

            call_on(extra, record)
            await asyncio.wait_for(done.wait(), 5)
            assert seen == [loops.extra[0].thread.ident]
            call_on(here, lambda: seen.append(-1))  # this loop: at once
            assert seen[-1] == -1
        finally:
            loops.stop()
        assert all(not lt.thread.is_alive() for lt in loops.extra)

    asyncio.run(main())


def test_stop_cancels_what_is_left_on_an_extra_loop_and_runs_its_cleanup() -> None:
    async def main() -> list[str]:
        loops = Loops(2)
        loops.start()
        lt = loops.extra[0]
        events: list[str] = []

        async def forever() -> None:
            try:
                await asyncio.sleep(3600)
            finally:
                events.append("cleaned up")

        def start() -> None:
            asyncio.get_running_loop().create_task(forever())

        await run_on(lt.loop, asyncio.sleep(0))
        lt.loop.call_soon_threadsafe(start)
        await run_on(lt.loop, asyncio.sleep(0.01))
        loops.stop()
        assert not lt.thread.is_alive()
        return events

    assert asyncio.run(main()) == ["cleaned up"]


def test_admission_counts_stay_exact_with_every_loop_admitting(fast_switching: None) -> None:
    """Four threads admit and release as fast as they can; a lost update
    would leave a count behind (a source shut out for good) or let one past
    its limit."""
    lim = HboneLimits(per_source=3, per_pod=1000, per_agent=1000)
    over: list[int] = []

    def churn() -> None:
        for _ in range(3000):
            if lim.admit("ns/db", "10.0.0.1"):
                n = lim.pods["ns/db"].by_source["10.0.0.1"] if "ns/db" in lim.pods else 0
                if n > 3:
                    over.append(n)
                lim.release("ns/db", "10.0.0.1")

    threads = [threading.Thread(target=churn) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert over == []
    assert lim.pods == {} and lim.agent.count == 0 and not lim.agent.by_source


def test_a_connection_ended_by_two_threads_is_ended_once(fast_switching: None) -> None:
    table = ConnTable()
    ended: list[int] = []
    table.on_close.append(lambda c: ended.append(c.id))
    conns = [
        table.add("ns/p", "inbound", ("10.0.0.1", i), ("10.0.0.2", 80), "hbone")
        for i in range(2000)
    ]

    def end_all() -> None:
        for c in conns:
            table.end(c, None)

    threads = [threading.Thread(target=end_all) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ended) == sorted(c.id for c in conns)
    assert table.open == {}


def _serve_three_loops(
    monkeypatch: Any, hold: float, count: int, burst: bool = False
) -> dict[int, int]:
    """A pod's 15006 listener on three tunnel loops; `count` clients one
    after another (`burst`: all connected before the loop gets to any), each
    connection held `hold` seconds by its handler.  Returns how many
    connections each thread served."""
    handled: dict[int, int] = {}
    lock = threading.Lock()

    async def handler(t: Tunnel, pod: PodRef, sock: socket.socket) -> None:
        with lock:
            handled[threading.get_ident()] = handled.get(threading.get_ident(), 0) + 1
        await asyncio.sleep(hold)  # in hand: this loop's count stays up meanwhile
        sock.close()

    monkeypatch.setattr(podmod, "inbound_plain", handler)

    async def main() -> None:
        loops = Loops(3)
        loops.start()
        try:
            t = Tunnel(ProxyState("n1", "cluster.local"), _NoBypass(), ConnTable())
            t.loop_tunnels = [(lt.loop, t) for lt in loops.extra]
            proxy = podmod.PodProxy(PodRef("ns/p", "/proc/self/ns/net", ()), Ports(), t)
            lsock = socket.socket()
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(128)
            lsock.setblocking(False)
            proxy.adopt({"in4": lsock})
            clients = []
            if burst:  # queued in the kernel before anything accepts
                clients = [socket.create_connection(lsock.getsockname()) for _ in range(count)]
            proxy.serve()
            for _ in range(0 if burst else count):
                clients.append(socket.create_connection(lsock.getsockname()))
                deadline = time.monotonic() + 5
                while sum(handled.values()) < len(clients) and time.monotonic() < deadline:
                    await asyncio.sleep(0.002)
            deadline = time.monotonic() + 10
            while sum(handled.values()) < count and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            proxy.release()
            assert lsock.fileno() < 0
            for c in clients:
                c.close()
        finally:
            loops.stop()

    asyncio.run(main())
    assert sum(handled.values()) == count, handled
    return handled


def test_connections_in_hand_spread_over_the_loops(monkeypatch: Any) -> None:
    """Held connections: once the main loop has two more in hand than
    another loop, the next goes there; all three loops end up serving."""
    handled = _serve_three_loops(monkeypatch, hold=2.0, count=12)
    assert len(handled) == 3, handled
    assert max(handled.values()) - min(handled.values()) <= 2, handled


def test_a_burst_of_connections_is_placed_evenly(monkeypatch: Any) -> None:
    """Connections waiting in the accept queue at once are counted where they
    are placed, before their loop has started them: no loop gets the burst."""
    handled = _serve_three_loops(monkeypatch, hold=2.0, count=30, burst=True)
    assert len(handled) == 3, handled
    assert max(handled.values()) - min(handled.values()) <= 2, handled


def test_one_connection_at_a_time_stays_on_the_main_loop(monkeypatch: Any) -> None:
    """Connections that end before the next arrives never wake another
    loop's thread."""
    handled = _serve_three_loops(monkeypatch, hold=0.0, count=20)
    assert list(handled) == [threading.get_ident()], handled


class _NoBypass:
    def add(self, src: tuple[str, int], dst: tuple[str, int]) -> None: ...
    def remove(self, src: tuple[str, int], dst: tuple[str, int]) -> None: ...


def test_hbone_relays_on_two_loops_at_once_are_intact() -> None:
    """Four whole HBONE relays (bridge, H2Conn, mutual TLS, H2Conn, bridge)
    in one process, two on each loop's thread at the same time (connection k
    runs on loop k mod 2): every byte arrives, in order (CRC-32 and length)."""
    from agent import bench_loops, eventloop

    r = eventloop.run(bench_loops._one(2, 4, 8 << 20))
    assert r["intact"], r
    assert r["mb_s"] > 0


def test_tether_status_says_how_many_connections_each_loop_holds(
    monkeypatch: Any, capsys: Any
) -> None:
    import io
    import json
    import urllib.request

    from agent import cli

    dump = {
        "node": "n1",
        "ready": True,
        "datapath": {"skmsg": False, "pin_dir": "/p", "programs": {}, "pods": {}, "stats": {}},
        "pod_errors": {},
        "hbone_pool": [
            {
                "src": "a",
                "dst": "b",
                "address": "10.0.0.2:15008",
                "connections": 1,
                "streams": 3,
                "loop": 1,
            }
        ],
        "tunnel_loops": {"count": 2, "open_connections": [2, 3], "recent_connections": [9, 8]},
        "connections": {"open": [], "closed": []},
    }
    monkeypatch.setattr(
        urllib.request, "urlopen", lambda *_a, **_k: io.BytesIO(json.dumps(dump).encode())
    )
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "open connections: 0 (per tunnel loop: 2, 3)" in out
    assert "3 streams (loop 1)" in out


def test_an_admitted_15008_connection_that_never_starts_gives_its_place_back() -> None:
    """Admission is taken on the accepting loop before a connection is placed;
    if it is never served (its pod released meanwhile, its task cancelled
    before it ran) the place must come back, or the source stays shut out."""
    from agent.tunnel.inbound import AdmissionSlot

    async def main() -> None:
        t = Tunnel(ProxyState("n1", "cluster.local"), _NoBypass(), ConnTable())
        proxy = podmod.PodProxy(PodRef("ns/p", "/proc/self/ns/net", ()), Ports(), t)
        loop = asyncio.get_running_loop()

        def admitted() -> AdmissionSlot:
            assert t.limits.admit("ns/p", "10.0.0.9")
            return AdmissionSlot(t.limits, "ns/p", "10.0.0.9")

        # released while on its way to its loop
        a, b = socket.socketpair()
        podmod._count(loop, 1)
        proxy._stopped = True
        proxy._start("hbone", a, admitted())
        assert a.fileno() < 0 and t.limits.agent.count == 0
        b.close()
        # its task cancelled before it ran
        slot = admitted()

        async def never() -> None:
            raise AssertionError("cancelled before it ran")

        task = loop.create_task(never())
        proxy._track(task, slot=slot)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
        assert t.limits.agent.count == 0 and not t.limits.pods
        # one that was served keeps its place until it ends (serve releases it)
        slot = admitted()
        slot.taken = True
        done = loop.create_task(asyncio.sleep(0))
        proxy._track(done, slot=slot)
        await done
        await asyncio.sleep(0)
        assert t.limits.agent.count == 1
        slot.release()
        slot.release()  # once only
        assert t.limits.agent.count == 0

    asyncio.run(main())
