"""H2Conn's read arenas (agent/tunnel/reads.py): a region handed to the
loop's TLS never overlaps a view still alive, an arena nothing refers to is
reused from its start instead of a new allocation, the pool is bounded;
a frame waiting for its end does not pin a read; and HBONE's H2Conn over the event
loop's real mTLS (asyncio's loop and uvloop) decrypts into them, every byte
unchanged (length and SHA-256, bulk and small messages, both directions)."""

from __future__ import annotations

import asyncio
import hashlib
import mmap
import os
import random

import pytest

from agent import eventloop
from agent.bench import loopback_tcp_pair
from agent.identity.ca import CertificateAuthority
from agent.identity.embedded import EmbeddedCA
from agent.identity.manager import CertificateManager
from agent.identity.spiffe import SpiffeId
from agent.tunnel import reads, tlssock
from agent.tunnel.h2conn import PIN_RATIO, H2Conn, H2Stream
from agent.tunnel.reads import ARENA_MAX, ARENA_MIN, POOL_KEEP, POOL_MAX, TAIL_MIN, ReadArenas

LOOPS = ["asyncio"] + (["uvloop"] if eventloop.loop_factory("uvloop")[0] == "uvloop" else [])
CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]


def _read(
    arenas: ReadArenas, hint: int, n: int, rnd: random.Random
) -> tuple[bytes | memoryview, bytes]:
    """What the loop does: a region, `n` decrypted bytes written into it."""
    region = arenas.get_buffer(hint)
    assert len(region) > 0 and not region.readonly
    n = min(n, len(region))
    data = rnd.randbytes(n)
    region[:n] = data
    return arenas.filled(n), data


def test_no_region_overlaps_a_view_that_is_still_alive() -> None:
    """Random reads of every size, random views kept (whole, or a slice as
    the frame parser keeps a payload), random ones dropped: after every read
    every kept view still holds what was written into it, so nothing was
    handed out twice while referenced; the pool stays within POOL_MAX."""
    rnd = random.Random(7)
    arenas = ReadArenas()
    kept: list[tuple[bytes | memoryview, bytes]] = []
    hints = [-1, 0, 1, 100, 1500, TAIL_MIN, 64 * 1024, ARENA_MAX + 256, 4 * ARENA_MAX]
    for step in range(3000):
        hint = rnd.choice(hints)
        view, data = _read(arenas, hint, rnd.randint(1, max(1, hint) + 256), rnd)
        assert bytes(view) == data
        if isinstance(view, memoryview):  # a large read: a view, read-only
            assert view.readonly and len(view) * PIN_RATIO >= len(view.obj)  # type: ignore[arg-type]
        else:  # a small one: a copy
            assert isinstance(view, bytes)
        if rnd.random() < 0.3:
            a = rnd.randrange(len(view))
            b = rnd.randint(a + 1, len(view))
            kept.append((view[a:b], data[a:b]))
        del view
        if kept and rnd.random() < 0.25:
            kept.pop(rnd.randrange(len(kept)))
        if step % 500 == 499:
            kept.clear()
        assert arenas.arenas <= POOL_MAX
        for v, want in kept:
            assert bytes(v) == want, f"step {step}: a kept view was overwritten"
    assert arenas.allocated > POOL_KEEP  # pinned arenas made new ones


def test_an_arena_nothing_refers_to_is_reused_from_its_start() -> None:
    rnd = random.Random(1)
    arenas = ReadArenas()
    for _ in range(1000):  # messages: small reads come as bytes, the arena stays free
        small, _ = _read(arenas, 1200, 1024, rnd)
        assert isinstance(small, bytes)
        kept = small  # a copy: pins nothing
    for _ in range(200):  # bulk: whole regions, views handed on and dropped
        view, _ = _read(arenas, ARENA_MAX + 256, ARENA_MAX, rnd)
        assert isinstance(view, memoryview)
        del view
    assert len(kept) == 1024
    # one arena for the messages, one when bulk needed more: both reused
    assert arenas.allocated == 2, arenas.allocated
    assert arenas.arenas == 2


def test_a_pinned_arena_hands_out_its_tail_then_another_arena() -> None:
    rnd = random.Random(2)
    arenas = ReadArenas()
    big = ARENA_MAX // PIN_RATIO + 1  # the smallest read that comes as a view
    first, _ = _read(arenas, ARENA_MAX + 256, big, rnd)
    small, _ = _read(arenas, 1200, 1000, rnd)  # a copy: the tail is not used up
    second, _ = _read(arenas, 1200, big, rnd)
    assert isinstance(first, memoryview) and isinstance(second, memoryview)
    assert isinstance(small, bytes)
    assert second.obj is first.obj  # the tail of the same arena, after the kept view
    left = ARENA_MAX - 2 * big  # then less than TAIL_MIN left: a new arena
    third, _ = _read(arenas, 1200, left - TAIL_MIN + mmap.PAGESIZE, rnd)
    fourth, _ = _read(arenas, ARENA_MAX + 256, big, rnd)
    assert isinstance(third, memoryview) and isinstance(fourth, memoryview)
    assert third.obj is first.obj and fourth.obj is not first.obj
    del first, second, third, fourth


def test_a_region_is_never_empty_and_filled_checks_its_count() -> None:
    arenas = ReadArenas()
    for hint in (-1, 0, 1):
        assert len(arenas.get_buffer(hint)) >= ARENA_MIN
    with pytest.raises(ValueError):
        arenas.filled(0)
    with pytest.raises(ValueError):
        arenas.filled(ARENA_MAX + 1)
    arenas.filled(1)
    with pytest.raises(ValueError):
        arenas.filled(1)  # no region handed out since


def test_the_pool_grows_for_what_waits_and_shrinks_back_when_it_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slow reader keeps many arenas pinned: the pool tracks them (no map
    and unmap per read once they are free again), and TRIM_DELAY later the
    free ones beyond POOL_KEEP are unmapped, on the loop's timer."""
    monkeypatch.setattr(reads, "TRIM_DELAY", 0.05)
    rnd = random.Random(4)

    async def main() -> None:
        arenas = ReadArenas()
        held = [_read(arenas, ARENA_MAX + 256, ARENA_MAX, rnd) for _ in range(20)]
        assert arenas.arenas == 20 and arenas.allocated == 20
        held.clear()  # the reader caught up
        for _ in range(20):
            v, _ = _read(arenas, ARENA_MAX + 256, ARENA_MAX, rnd)
            del v
        assert arenas.allocated == 20  # reused, none made
        pinned = _read(arenas, ARENA_MAX + 256, ARENA_MAX, rnd)
        await asyncio.sleep(0.2)
        assert arenas.arenas == POOL_KEEP  # the pinned one among them
        assert bytes(pinned[0]) == pinned[1]
        for _ in range(3 * POOL_MAX):  # past POOL_MAX: tracked arenas are replaced
            held.append(_read(arenas, ARENA_MAX + 256, ARENA_MAX, rnd))
        assert arenas.arenas == POOL_MAX
        assert all(bytes(v) == d for v, d in held)
        held.clear()
        await asyncio.sleep(0.2)
        assert arenas.arenas == POOL_KEEP

    eventloop.run(main(), "asyncio")


def test_the_free_count_matches_how_the_pool_reads_it() -> None:
    """The reuse test above fails if this drifts (another Python); this says why."""
    pool = [mmap.mmap(-1, mmap.PAGESIZE)]
    assert reads._refs(pool, 0) == reads._FREE
    v = memoryview(pool[0])[1:]
    assert reads._refs(pool, 0) > reads._FREE
    del v
    assert reads._refs(pool, 0) == reads._FREE


def test_a_frame_waiting_for_its_end_does_not_pin_its_read() -> None:
    """A read that ends inside a frame leaves its start waiting in the frame
    buffer; a few bytes of it must not keep a whole arena alive (one per
    HBONE connection a peer opens), a large part of it stays a view."""
    import h2.config
    import h2.connection
    import h2.events
    import h2.settings

    from agent.tunnel.h2conn import _H2Connection

    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    s = _H2Connection(h2.config.H2Configuration(client_side=False))
    c.initiate_connection()
    s.initiate_connection()
    s.update_settings(
        {
            h2.settings.SettingCodes.MAX_FRAME_SIZE: 1 << 20,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 1 << 20,
        }
    )
    s.increment_flow_control_window(1 << 20)
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    s.receive_data(c.data_to_send())
    c.send_headers(1, CONNECT)
    c.send_data(1, b"x" * 100)
    c.send_data(1, b"y" * 200_000)
    wire = c.data_to_send()
    arenas = ReadArenas()
    cut = len(wire) - 200_000 - 9 + 5  # 5 bytes of the last frame's header
    for part, tail_len in ((wire[:cut], 5), (wire[cut:-1000], 200_000 + 9 - 1000)):
        region = arenas.get_buffer(ARENA_MAX + 256)
        region[: len(part)] = part
        s.receive_data(arenas.filled(len(part)))
        chunks = list(s.incoming_buffer._chunks)  # type: ignore[attr-defined]
        assert sum(map(len, chunks)) == tail_len
        for ch in chunks:
            assert len(ch.obj) <= PIN_RATIO * len(ch), (len(ch), len(ch.obj))
    assert isinstance(chunks[-1].obj, mmap.mmap)  # the large part: still a view
    events = s.receive_data(wire[-1000:])
    got = b"".join(bytes(e.data) for e in events if isinstance(e, h2.events.DataReceived))
    assert got == b"y" * 200_000


# -- H2Conn over the loop's real TLS -------------------------------------------------


async def _hbone_pair(
    on_request: object,
) -> tuple[H2Conn, H2Conn, CertificateManager]:
    mgr = CertificateManager(EmbeddedCA(CertificateAuthority.generate("cluster.local")))
    web = SpiffeId("cluster.local", "shop", "web")
    sctx, cctx = await mgr.ssl_context_server(web), await mgr.ssl_context_client(web)
    loop = asyncio.get_running_loop()
    s, c = await loopback_tcp_pair()
    server = H2Conn(client=False, on_request=on_request)  # type: ignore[arg-type]
    client = H2Conn(client=True)
    paths = await asyncio.gather(
        tlssock.start_tls(loop, server, s, sctx, side="server", timeout=10),
        tlssock.start_tls(loop, client, c, cctx, side="client", timeout=10),
    )
    assert list(paths) == ["loop", "loop"]
    await asyncio.wait_for(client.ready, 10)
    return server, client, mgr


@pytest.mark.parametrize("loop_name", LOOPS)
def test_hbone_over_the_loops_tls_reads_into_arenas_bytes_unchanged(
    loop_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An echo over H2Conn: 24 MiB in writes of every size, then 300 small
    messages each answered before the next; what comes back is what went,
    and the payloads the server got were views of its read arenas (the
    buffered path ran), none pinning more than PIN_RATIO times its size."""
    monkeypatch.setenv("TETHER_TLS", "loop")
    rnd = random.Random(11)
    bulk = [rnd.randbytes(rnd.choice([1, 700, 16384, 65536, 300_000, 1 << 20])) for _ in range(60)]
    while sum(map(len, bulk)) < 24 << 20:
        bulk.append(os.urandom(1 << 20))

    async def main() -> None:
        views: list[int] = []

        async def echo(c: H2Conn, s: H2Stream) -> None:
            c.respond(s, 200)

            def on_data(d: bytes) -> None:
                if isinstance(d, memoryview) and isinstance(d.obj, mmap.mmap):
                    views.append(len(d.obj) // max(1, len(d)))
                s.write(bytes(d))

            def on_pieces(ps: list[memoryview]) -> None:
                for p in ps:
                    on_data(p)  # type: ignore[arg-type]

            s.attach(on_data, s.write_eof, lambda e: None, on_pieces)

        server, client, mgr = await _hbone_pair(echo)
        try:
            stream = client.open_stream(CONNECT)
            await asyncio.wait_for(stream.response, 10)
            got = hashlib.sha256()
            n = 0
            arrived = asyncio.Event()

            def on_back(d: bytes) -> None:
                nonlocal n
                got.update(d)
                n += len(d)
                arrived.set()

            stream.attach(on_back, lambda: None, lambda e: None)
            sent = hashlib.sha256()
            total = 0
            for chunk in bulk:
                stream.write(chunk)
                sent.update(chunk)
                total += len(chunk)
                await stream.drain()
            for _ in range(600):
                if n >= total:
                    break
                await asyncio.sleep(0.05)
            assert (n, got.hexdigest()) == (total, sent.hexdigest())
            for i in range(300):  # ping-pong: each message its own read
                msg = rnd.randbytes(1 + i * 7)
                arrived.clear()
                stream.write(msg)
                sent.update(msg)
                total += len(msg)
                while n < total:
                    await asyncio.wait_for(arrived.wait(), 10)
                    arrived.clear()
            assert (n, got.hexdigest()) == (total, sent.hexdigest())
            assert server._reads.allocated >= 1 and client._reads.allocated >= 1
            assert views, "no payload was a view of a read arena"
            assert max(views) <= PIN_RATIO
            assert server._reads.arenas <= POOL_MAX
        finally:
            client.close()
            server.close()
            await mgr.close()

    eventloop.run(asyncio.wait_for(main(), 120), loop_name)
