"""`tether bench loops`: what agent.tunnelLoops gives when the process has
the cores (agent/tunnel/loops.py), measured apart from the two-node bench.

`tether bench tunnel` runs both agents, iperf3 and its server on one
machine: on two cores the machine is full before one agent could use a
second core, so it cannot show whether an agent can.  Here one process
relays `CONNS` HBONE connections at once, each the whole path of the
tunnel: an app socket, the client agent's bridge and H2Conn, mutual TLS
over loopback, the server agent's H2Conn and bridge, the destination's
socket, all on one loop; connection k runs on loop k mod N.  The same
process with 1 loop and with N, alternating, medians of `runs`:

- MB/s: all connections' bytes over the wall time of the transfer;
- cores: the process's CPU seconds per second (1.0 is one core busy);
- CPU s/GB: the process's CPU per GB relayed (both agents' work and the two
  app ends', the check excluded); cores exclude it too.

Every connection's bytes are CRC-32 and length checked at its destination
(CRC-32, not SHA-256, so the check takes less of the loop's time; its CPU is
excluded either way).
"""

from __future__ import annotations

import asyncio
import os
import resource
import statistics
import threading
import time
import zlib
from typing import Any

from agent.bench_pingpong import open_path
from agent.tunnel.loops import Loops, run_on

CONNS = 4
BULK = 96 << 20  # per connection


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class _Hashing:
    """CPU spent hashing, on every thread (excluded from the relay's)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._lock = threading.Lock()

    def add(self, s: float) -> None:
        with self._lock:
            self.seconds += s


async def _relay(ctxs: Any, nbytes: int, hashing: _Hashing, start: asyncio.Event) -> bool:
    """One HBONE connection's whole relay on this loop; True if intact."""
    sctx, cctx = ctxs
    loop = asyncio.get_running_loop()
    path = await open_path(sctx, cctx)
    src_app, dst_app = path.src_app, path.dst_app
    try:
        chunk = os.urandom(256 * 1024)
        want = got = 0  # CRC-32 of what was sent and what arrived
        received = 0

        async def sink() -> None:
            nonlocal received, got
            buf = bytearray(256 * 1024)
            while received < nbytes:
                n = await loop.sock_recv_into(dst_app, buf)
                if not n:
                    raise ConnectionError(f"closed after {received} of {nbytes} bytes")
                t = time.thread_time()
                got = zlib.crc32(memoryview(buf)[:n], got)
                hashing.add(time.thread_time() - t)
                received += n

        reader = loop.create_task(sink())
        await start.wait()
        sent = 0
        while sent < nbytes:
            await loop.sock_sendall(src_app, chunk)
            t = time.thread_time()
            want = zlib.crc32(chunk, want)
            hashing.add(time.thread_time() - t)
            sent += len(chunk)
        await asyncio.wait_for(reader, 600)
        return received == sent and got == want
    finally:
        path.close()


async def _one(loops_n: int, conns: int, nbytes: int) -> dict[str, Any]:
    from agent.identity.ca import CertificateAuthority
    from agent.identity.embedded import EmbeddedCA
    from agent.identity.manager import CertificateManager
    from agent.identity.spiffe import SpiffeId

    mgr = CertificateManager(EmbeddedCA(CertificateAuthority.generate("cluster.local")))
    web, db = SpiffeId("cluster.local", "b", "web"), SpiffeId("cluster.local", "a", "db")
    ctxs = (await mgr.ssl_context_server(web), await mgr.ssl_context_client(db))
    loops = Loops(loops_n)
    loops.start()
    hashing = _Hashing()
    try:
        all_loops = loops.all()
        on = [all_loops[k % loops_n] for k in range(conns)]  # connection k's loop
        starts = [asyncio.Event() for _ in range(conns)]  # each set on its loop's thread
        tasks = [
            asyncio.ensure_future(run_on(lp, _relay(ctxs, nbytes, hashing, starts[k])))
            for k, lp in enumerate(on)
        ]
        await asyncio.sleep(1.0)  # every handshake done, every stream open
        cpu0, t0 = _cpu(), time.monotonic()
        hashed0 = hashing.seconds
        for k, lp in enumerate(on):
            lp.call_soon_threadsafe(starts[k].set)
        intact = await asyncio.wait_for(asyncio.gather(*tasks), 900)
        wall = time.monotonic() - t0
        cpu = _cpu() - cpu0 - (hashing.seconds - hashed0)
    finally:
        loops.stop()
        await mgr.close()
    total = conns * nbytes
    return {
        "mb_s": round(total / wall / 1e6),
        "cores": round(cpu / wall, 2),
        "cpu_s_per_gb": round(cpu / (total / 1e9), 3),
        "intact": all(intact),
    }


def run(loops_n: int = 2, runs: int = 3, conns: int = CONNS, nbytes: int = BULK) -> dict[str, Any]:
    from agent import eventloop

    variants = [1, loops_n]
    each: dict[int, list[dict[str, Any]]] = {v: [] for v in variants}
    load0 = os.getloadavg()
    for i in range(runs):
        for v in variants if i % 2 == 0 else list(reversed(variants)):
            each[v].append(eventloop.run(_one(v, conns, nbytes)))
    keys = ("mb_s", "cores", "cpu_s_per_gb")
    out: dict[str, Any] = {
        "loop": eventloop.loop_factory()[0],
        "runs": runs,
        "connections": conns,
        "bytes_per_connection": nbytes,
        "cpus": os.cpu_count(),
        "loadavg": [round(x, 2) for x in (*load0, *os.getloadavg())],
        "results": {},
    }
    for v, rs in each.items():
        row: dict[str, Any] = {k: statistics.median(r[k] for r in rs) for k in keys}
        row["intact"] = all(r["intact"] for r in rs)
        row["each"] = [{k: r[k] for k in keys} for r in rs]
        out["results"][f"{v} loop{'s' if v > 1 else ''}"] = row
    one, many = each[1], each[loops_n]
    out["ratio"] = {  # N loops / 1 loop, median of the runs' ratios
        k: round(statistics.median(m[k] / o[k] for o, m in zip(one, many, strict=True)), 3)
        for k in keys
    }
    return out


def render(r: dict[str, Any]) -> str:
    lines = [
        f"tether bench loops: {r['connections']} HBONE connections relayed at once in one "
        f"process ({r['loop']}, {r['cpus']} CPUs), {r['bytes_per_connection'] >> 20} MiB each, "
        f"both agents' relay and the app ends; medians of {r['runs']} alternating runs; "
        f"load {r['loadavg']}",
        f"{'tunnel loops':13} {'MB/s':>6} {'cores':>6} {'CPU s/GB':>9} {'intact':>7}",
    ]
    for name, x in r["results"].items():
        lines.append(
            f"{name:13} {x['mb_s']:>6} {x['cores']:>6} {x['cpu_s_per_gb']:>9} {x['intact']!s:>7}"
        )
    q = r["ratio"]
    lines.append(
        f"N loops / 1 loop: MB/s {q['mb_s']}x, cores {q['cores']}x, CPU/GB {q['cpu_s_per_gb']}x"
    )
    return "\n".join(lines)


def main(loops_n: int, runs: int, json_out: bool) -> int:
    import json

    r = run(loops_n=loops_n, runs=max(1, runs))
    print(json.dumps(r, indent=2) if json_out else render(r))
    ok = all(x["intact"] for x in r["results"].values())
    return 0 if ok else 1
