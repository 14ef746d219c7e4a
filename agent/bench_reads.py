"""`tether bench reads`: what reading into the loop's arenas
(agent/tunnel/reads.py) costs and saves, measured on its own.

The whole relay of one HBONE connection in one process, on the agent's loop:
an app socket, the client agent's bridge and H2Conn, mutual TLS over
loopback, the server agent's H2Conn and bridge, the destination's socket.
Two variants of the same code, alternating, `runs` each, medians:

- `arenas`: as the agent runs (H2Conn and the bridge's socket side are
  BufferedProtocols reading into the arenas);
- `copied`: the same classes made plain asyncio.Protocols, so the loop
  hands every read over as a new `bytes` (the agent before 2026-12-02).

Bulk: `BULK` bytes one way (SHA-256 and length checked at the destination,
hashing excluded from the CPU).  Messages: 1 KiB ping-pong, `MESSAGES` round
trips through both agents (each checked).  CPU is the process's, both agents
and the two app ends together: what the app ends do is the same in both
variants, so the ratio understates the relay's own change.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import resource
import statistics
import time
from typing import Any

from agent import eventloop
from agent.bench import loopback_tcp_pair
from agent.tunnel import tlssock
from agent.tunnel.bridge import Bridge, _SocketSide
from agent.tunnel.h2conn import H2Conn, H2Stream

BULK = 256 << 20
MESSAGES = 4000
MSG = 1024
CONNECT = [(":method", "CONNECT"), (":authority", "10.0.0.1:80")]


class _CopiedH2Conn(H2Conn, asyncio.Protocol):
    """H2Conn as an asyncio.Protocol: the loop's TLS hands over new bytes."""


class _CopiedSide(_SocketSide, asyncio.Protocol):
    """The bridge's socket side as an asyncio.Protocol."""


class _CopiedBridge(Bridge):
    socket_side = _CopiedSide


VARIANTS: dict[str, tuple[type[H2Conn], type[Bridge]]] = {
    "arenas": (H2Conn, Bridge),
    "copied": (_CopiedH2Conn, _CopiedBridge),
}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _read_exactly(loop: asyncio.AbstractEventLoop, sock: Any, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = await loop.sock_recv(sock, n - len(out))
        if not got:
            raise ConnectionError(f"closed after {len(out)} of {n} bytes")
        out += got
    return bytes(out)


async def _one(variant: str, nbytes: int, messages: int) -> dict[str, Any]:
    from agent.identity.ca import CertificateAuthority
    from agent.identity.embedded import EmbeddedCA
    from agent.identity.manager import CertificateManager
    from agent.identity.spiffe import SpiffeId

    conn_cls, bridge_cls = VARIANTS[variant]
    loop = asyncio.get_running_loop()
    mgr = CertificateManager(EmbeddedCA(CertificateAuthority.generate("cluster.local")))
    web, db = SpiffeId("cluster.local", "b", "web"), SpiffeId("cluster.local", "a", "db")
    sctx, cctx = await mgr.ssl_context_server(web), await mgr.ssl_context_client(db)
    dst_agent, dst_app = await loopback_tcp_pair()  # the server agent's delivery socket
    src_agent, src_app = await loopback_tcp_pair()  # the captured app connection
    bridges: list[Bridge] = []

    async def on_request(conn: H2Conn, stream: H2Stream) -> None:
        conn.respond(stream, 200)
        b = bridge_cls(stream, initiator="stream")
        bridges.append(b)
        await b.start(dst_agent)
        await b.done

    s, c = await loopback_tcp_pair()
    server = conn_cls(client=False, on_request=on_request)
    client = conn_cls(client=True)
    try:
        await asyncio.gather(
            tlssock.start_tls(loop, server, s, sctx, side="server", timeout=30),
            tlssock.start_tls(loop, client, c, cctx, side="client", timeout=30),
        )
        await asyncio.wait_for(client.ready, 30)
        stream = client.open_stream(CONNECT)
        await asyncio.wait_for(stream.response, 30)
        b = bridge_cls(stream)
        bridges.append(b)
        await b.start(src_agent)

        # bulk, one way
        chunk = os.urandom(256 * 1024)
        want, got = hashlib.sha256(), hashlib.sha256()
        hashing = 0.0
        received = 0

        async def sink() -> None:
            nonlocal hashing, received
            buf = bytearray(256 * 1024)
            while received < nbytes:
                n = await loop.sock_recv_into(dst_app, buf)
                if not n:
                    raise ConnectionError(f"closed after {received} of {nbytes} bytes")
                t = time.thread_time()
                got.update(memoryview(buf)[:n])
                hashing += time.thread_time() - t
                received += n

        reader = loop.create_task(sink())
        cpu0, t0 = _cpu(), time.monotonic()
        sent = 0
        while sent < nbytes:
            await loop.sock_sendall(src_app, chunk)
            want.update(chunk)
            sent += len(chunk)
        await asyncio.wait_for(reader, 600)
        wall = time.monotonic() - t0
        bulk_cpu = _cpu() - cpu0 - hashing
        intact = received == sent and got.hexdigest() == want.hexdigest()

        # 1 KiB ping-pong through both agents
        cpu0 = _cpu()
        for i in range(messages):
            msg = i.to_bytes(4, "big") * (MSG // 4)
            await loop.sock_sendall(src_app, msg)
            intact = intact and await _read_exactly(loop, dst_app, MSG) == msg
            await loop.sock_sendall(dst_app, msg)
            intact = intact and await _read_exactly(loop, src_app, MSG) == msg
        msg_cpu = _cpu() - cpu0
        return {
            "mb_s": round(sent / wall / 1e6),
            "cpu_s_per_gb": round(bulk_cpu / (sent / 1e9), 3),
            "cpu_us_per_round_trip": round(msg_cpu / messages * 1e6, 1),
            "intact": intact,
        }
    finally:
        for b in bridges:
            b.close()
        client.close()
        server.close()
        for sock in (src_app, dst_app, src_agent, dst_agent):
            sock.close()
        await mgr.close()


def run(runs: int = 3, nbytes: int = BULK, messages: int = MESSAGES) -> dict[str, Any]:
    each: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for i in range(runs):
        order = list(VARIANTS) if i % 2 == 0 else list(reversed(VARIANTS))
        for v in order:
            each[v].append(eventloop.run(_one(v, nbytes, messages)))
    out: dict[str, Any] = {
        "loop": eventloop.loop_factory()[0],
        "runs": runs,
        "bulk_bytes": nbytes,
        "messages": messages,
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }
    keys = ("mb_s", "cpu_s_per_gb", "cpu_us_per_round_trip")
    for v, rs in each.items():
        out[v] = {k: statistics.median(r[k] for r in rs) for k in keys}
        out[v]["intact"] = all(r["intact"] for r in rs)
        out[v]["each"] = [{k: r[k] for k in keys} for r in rs]
    out["ratio"] = {  # arenas / copied, median of the runs' ratios
        k: round(
            statistics.median(
                a[k] / c[k] for a, c in zip(each["arenas"], each["copied"], strict=True)
            ),
            3,
        )
        for k in keys
    }
    return out


def render(r: dict[str, Any]) -> str:
    lines = [
        f"tether bench reads: one HBONE connection's relay in one process ({r['loop']}), "
        f"{r['bulk_bytes'] >> 20} MiB one way, {r['messages']} 1 KiB round trips; "
        f"medians of {r['runs']} alternating runs; load {r['loadavg']}",
        f"{'variant':8} {'MB/s':>6} {'CPU s/GB':>9} {'CPU us/round trip':>18} {'intact':>7}",
    ]
    for v in VARIANTS:
        x = r[v]
        lines.append(
            f"{v:8} {x['mb_s']:>6} {x['cpu_s_per_gb']:>9} "
            f"{x['cpu_us_per_round_trip']:>18} {x['intact']!s:>7}"
        )
    q = r["ratio"]
    lines.append(
        f"arenas / copied: MB/s {q['mb_s']}x, CPU/GB {q['cpu_s_per_gb']}x, "
        f"CPU per round trip {q['cpu_us_per_round_trip']}x"
    )
    return "\n".join(lines)
