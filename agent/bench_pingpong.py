"""`tether bench pingpong`: the CPU one 1 KiB request and its reply cost on
the whole HBONE path, in one process, with no other process in the way.

One connection, the path `tether bench tunnel` measures between two nodes,
on one event loop (the agent's, uvloop where installed): an app socket,
the source agent's bridge and H2Conn, mutual TLS 1.3 over loopback (the
agent's TLS path, `TETHER_TLS`), the destination agent's H2Conn and
bridge, the destination app's socket, which echoes.  The client sends 1 KiB
and waits for it back, `MESSAGES` times; the figure is the process's CPU
per round trip, in µs (user and system, the app ends included: they are
the same in every row).  Every reply is checked against what was sent.

Why: on a shared 2-core machine `tether bench tunnel` moves 10-40 % between
rows of the same code (README, A/A runs), so a change of a few µs per
message cannot be seen there.  Here nothing but this process runs the
path, and CPU time, not wall time, is measured.

`--variant NAME:K=V` adds a row run in a child process under that
environment (`PYTHONPATH=<tree>`: another tree's code, which the child
reports and the bench checks).  Rows alternate, `--runs` times (at least
3), each run a fresh child; medians, and the median of the paired ratios.
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import os
import pstats
import resource
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

MESSAGES = 5000
CONNECTIONS = 2000
WARMUP = 300
SIZE = 1024
# the connections workload: what `bench tunnel`'s conn/s client and server
# send (one byte each way there), with a CONNECT as the source agent makes it
CONN_REQUEST = b"x"
CONN_REPLY = b"y"
CONN_DST = ("10.0.0.2", 8080)
CONN_SRC = ("10.0.0.1", 40000)
CONN_SERVICE = "web.b.svc.cluster.local"
CALLS_TOP = 25
CALLS_N = 1000  # round trips or connections of the counted run (under cProfile)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class HbonePath:
    """One HBONE connection's whole path on the running loop: `src_app` and
    `dst_app` are the two applications' ends, everything between them the
    agents' (bridges, H2Conns, mutual TLS over loopback).  Also used by
    `tether bench loops`."""

    def __init__(self) -> None:
        self.src_app: Any = None
        self.dst_app: Any = None
        self.tls: list[str] = []
        self.bridges: list[Any] = []
        self.conns: list[Any] = []
        self.socks: list[Any] = []
        self.tasks: list[asyncio.Task[None]] = []

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for b in self.bridges:
            b.close()
        for c in self.conns:
            c.close()
        for sock in self.socks:
            sock.close()


async def open_conns(path: HbonePath, sctx: Any, cctx: Any, on_request: Any) -> tuple[Any, Any]:
    """The two agents' H2Conns over mutual TLS on loopback (the agent's TLS
    path), the client's SETTINGS answered; kept in `path` to close."""
    from agent.bench import loopback_tcp_pair
    from agent.tunnel import tlssock
    from agent.tunnel.h2conn import H2Conn

    loop = asyncio.get_running_loop()
    s, c = await loopback_tcp_pair()
    path.socks += [s, c]
    for sock in (s, c):  # as the agent's (agent.tunnel.relay.tcp_socket)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    server = H2Conn(client=False, on_request=on_request)
    client = H2Conn(client=True)
    path.conns += [client, server]
    paths = await asyncio.gather(
        tlssock.start_tls(loop, server, s, sctx, side="server", timeout=30),
        tlssock.start_tls(loop, client, c, cctx, side="client", timeout=30),
    )
    path.tls = sorted({str(p) for p in paths})
    await asyncio.wait_for(client.ready, 30)
    return client, server


async def open_path(sctx: Any, cctx: Any) -> HbonePath:
    """An HbonePath with its CONNECT answered and both bridges started."""
    from agent.bench import loopback_tcp_pair
    from agent.tunnel.bridge import Bridge
    from agent.tunnel.h2conn import H2Conn, H2Stream

    path = HbonePath()
    dst_agent, path.dst_app = await loopback_tcp_pair()
    src_agent, path.src_app = await loopback_tcp_pair()
    path.socks = [path.src_app, path.dst_app, src_agent, dst_agent]

    async def on_request(conn: H2Conn, stream: H2Stream) -> None:
        conn.respond(stream, 200)
        b = Bridge(stream, initiator="stream")
        path.bridges.append(b)
        await b.start(dst_agent)
        await b.done

    try:
        client, _server = await open_conns(path, sctx, cctx, on_request)
        stream = client.open_stream([(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
        await asyncio.wait_for(stream.response, 30)
        b = Bridge(stream)
        path.bridges.append(b)
        await b.start(src_agent)
    except BaseException:
        path.close()
        raise
    return path


Rounds = Callable[[int], Awaitable[bool]]


async def _message_rounds(sctx: Any, cctx: Any) -> tuple[HbonePath, Rounds]:
    """One path, and `n` 1 KiB round trips over it (True: every reply intact)."""
    loop = asyncio.get_running_loop()
    path = await open_path(sctx, cctx)
    src_app, dst_app = path.src_app, path.dst_app

    async def echo_app() -> None:
        while data := await loop.sock_recv(dst_app, 65536):
            await loop.sock_sendall(dst_app, data)

    path.tasks.append(loop.create_task(echo_app()))
    msg = os.urandom(SIZE)

    async def rounds(n: int) -> bool:
        intact = True
        for _ in range(n):
            await loop.sock_sendall(src_app, msg)
            got = b""
            while len(got) < SIZE:
                part = await loop.sock_recv(src_app, 65536)
                if not part:
                    raise ConnectionError("the path closed mid-message")
                got += part
            intact = intact and got == msg
        return intact

    return path, rounds


def _socket_pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    return a, b


async def _connection_rounds(sctx: Any, cctx: Any) -> tuple[HbonePath, Rounds]:
    """Two agents' H2Conns (one pooled HBONE connection), and `n` new
    connections over it, one at a time, each as `bench tunnel`'s conn/s
    client makes them: the app's request is there before the source agent
    serves it (early data, sent with the CONNECT), the destination agent
    checks the request, answers 200 and bridges to its app, which replies
    and closes once the client has; the round is over when both bridges
    are done.  The apps' ends are socketpairs (the agents' own work is the
    same; a loopback TCP pair would add a listen and accept per connection)."""
    from agent.tunnel.bridge import Bridge
    from agent.tunnel.h2conn import H2Conn, H2Stream
    from agent.tunnel.hbone import check_request, request_headers
    from agent.tunnel.outbound import already_sent

    loop = asyncio.get_running_loop()
    path = HbonePath()
    served: asyncio.Queue[bool] = asyncio.Queue()
    authority = f"{CONN_DST[0]}:{CONN_DST[1]}"

    async def serve(conn: H2Conn, stream: H2Stream) -> bool:
        ok = check_request(stream.request_headers, CONN_DST[0]) == CONN_DST
        agent_end, app = _socket_pair()
        try:
            conn.respond(stream, 200)
            if stream.closed:  # answered otherwise (a test's refusal)
                agent_end.close()
                return False
            b = Bridge(stream, initiator="stream")
            await b.start(agent_end)
            ok = ok and await loop.sock_recv(app, 65536) == CONN_REQUEST
            await loop.sock_sendall(app, CONN_REPLY)
            while await loop.sock_recv(app, 65536):  # until the client's end
                pass
        finally:
            app.close()
        await b.done
        return ok and b.error is None

    async def on_request(conn: H2Conn, stream: H2Stream) -> None:
        ok = False
        try:
            ok = await serve(conn, stream)
        finally:  # whatever happened there, the client's round hears of it
            served.put_nowait(ok)

    try:
        client, _server = await open_conns(path, sctx, cctx, on_request)
    except BaseException:
        path.close()
        raise

    async def one() -> bool:
        app, agent_end = _socket_pair()
        try:
            app.send(CONN_REQUEST)
            early = already_sent(agent_end)
            headers = request_headers(
                authority, CONN_SRC, namespace="a", workload="db", service_host=CONN_SERVICE
            )
            stream = client.open_stream(headers, early)
            status = dict(await stream.response).get(":status")
            if status != "200":
                agent_end.close()
                stream.reset()
                await served.get()  # the destination's side is done as well
                return False
            b = Bridge(stream)
            b.from_socket = len(early)
            await b.start(agent_end)
            got = b""
            while len(got) < len(CONN_REPLY):
                part = await loop.sock_recv(app, 65536)
                if not part:
                    raise ConnectionError("the path closed before the reply")
                got += part
        finally:
            app.close()
        await b.done
        return await served.get() and status == "200" and got == CONN_REPLY and b.error is None

    async def rounds(n: int) -> bool:
        intact = True
        for _ in range(n):
            intact = await one() and intact
        return intact

    return path, rounds


async def _pingpong(n: int, calls: bool = False, workload: str = "messages") -> dict[str, Any]:
    from agent.identity.ca import CertificateAuthority
    from agent.identity.embedded import EmbeddedCA
    from agent.identity.manager import CertificateManager
    from agent.identity.spiffe import SpiffeId

    mgr = CertificateManager(EmbeddedCA(CertificateAuthority.generate("cluster.local")))
    web, db = SpiffeId("cluster.local", "b", "web"), SpiffeId("cluster.local", "a", "db")
    sctx, cctx = await mgr.ssl_context_server(web), await mgr.ssl_context_client(db)
    path: HbonePath | None = None
    try:
        opener = _connection_rounds if workload == "connections" else _message_rounds
        path, rounds = await opener(sctx, cctx)
        intact = await rounds(WARMUP)
        prof = cProfile.Profile() if calls else None
        cpu0, t0 = _cpu(), time.monotonic()
        if prof is not None:
            prof.enable()
        intact = await asyncio.wait_for(rounds(n), 300) and intact
        if prof is not None:
            prof.disable()
        cpu, wall = _cpu() - cpu0, time.monotonic() - t0
        out: dict[str, Any] = {
            "workload": workload,
            "cpu_us": round(1e6 * cpu / n, 1),
            "wall_us": round(1e6 * wall / n, 1),
            "intact": intact,
            "tls": path.tls,
        }
        if prof is not None:
            out.update(_calls(prof, n))
        return out
    finally:
        if path is not None:
            path.close()
        await mgr.close()


def _calls(prof: cProfile.Profile, n: int) -> dict[str, Any]:
    """Function calls per round trip or connection (`n` of them; Python
    functions and the C functions they call), all of them and the most
    called: a count, which no load moves, of what the interpreter does."""
    stats: dict[Any, Any] = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    per: dict[str, float] = {}
    for (path, line, name), (_cc, ncalls, *_rest) in stats.items():
        where = f"{path.rsplit('site-packages/', 1)[-1].rsplit('/agent/', 1)[-1]}:{line}({name})"
        per[where] = per.get(where, 0) + ncalls / n
    top = sorted(per.items(), key=lambda kv: -kv[1])[:CALLS_TOP]
    return {
        "calls": round(sum(per.values()), 1),
        "top_calls": {k: round(v, 2) for k, v in top},
    }


def measure(n: int = MESSAGES, calls: bool = False, workload: str = "messages") -> dict[str, Any]:
    """One measurement in this process, on the agent's event loop: `n` round
    trips (workload messages) or new connections (connections); `calls`:
    under cProfile, counting function calls (its CPU figures are then
    cProfile's, not the path's)."""
    import agent
    from agent import eventloop

    r = eventloop.run(_pingpong(n, calls, workload))
    r["loop"] = eventloop.loop_factory()[0]
    r["code"] = str(Path(agent.__file__).resolve().parent)  # the tree measured
    return r


def _child(
    env: dict[str, str], n: int, calls: bool = False, workload: str = "messages"
) -> dict[str, Any]:
    """measure() in a fresh interpreter under `env` (another tree, or a
    switch).  This file is run by path, so an older tree without it can be
    measured: the harness is this one, the agent code it drives the tree's."""
    from agent.bench import _variant_env, variant_code  # the parent's tree only

    full = {**os.environ, **_variant_env(env)}
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import json, runpy; m = runpy.run_path({str(Path(__file__).resolve())!r}); "
            f"print(json.dumps(m['measure']({n}, {calls}, {workload!r})))",
        ],
        env=full,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(f"pingpong child failed ({env}):\n{out.stderr[-1500:]}")
    r: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    want = variant_code(env)
    if want is not None and r["code"] != want:
        raise RuntimeError(f"the child ran {r['code']}, not {want}")
    return r


def run(
    runs: int = 3,
    variants: dict[str, dict[str, str]] | None = None,
    n: int | None = None,
    workload: str = "messages",
) -> dict[str, Any]:
    conns = workload == "connections"
    n = n or (CONNECTIONS if conns else MESSAGES)
    rows = {"as is": {}, **(variants or {})}
    each: dict[str, list[dict[str, Any]]] = {name: [] for name in rows}
    load0 = os.getloadavg()
    for i in range(max(3, runs)):
        order = list(rows) if i % 2 == 0 else list(reversed(rows))
        for name in order:
            each[name].append(_child(rows[name], n, workload=workload))
    counted = {
        name: _child(env, CALLS_N, calls=True, workload=workload) for name, env in rows.items()
    }
    out: dict[str, Any] = {
        "workload": workload,
        "n": n,
        "unit": "connection" if conns else "round trip",
        "size": len(CONN_REQUEST) if conns else SIZE,
        "runs": max(3, runs),
        "loadavg": [round(x, 2) for x in (*load0, *os.getloadavg())],
        "variants": variants or {},
        "results": {},
    }
    base = each["as is"]
    for name, rs in each.items():
        row: dict[str, Any] = {
            "cpu_us": round(statistics.median(r["cpu_us"] for r in rs), 1),
            "wall_us": round(statistics.median(r["wall_us"] for r in rs), 1),
            "each_cpu_us": [r["cpu_us"] for r in rs],
            "intact": all(r["intact"] for r in rs),
            "tls": sorted({t for r in rs for t in r["tls"]}),
            "loop": rs[0]["loop"],
            "code": rs[0]["code"],
            "calls": counted[name]["calls"],
            "top_calls": counted[name]["top_calls"],
        }
        if name != "as is":
            row["calls_x_as_is"] = round(row["calls"] / counted["as is"]["calls"], 3)
            row["cpu_x_as_is"] = round(
                statistics.median(v["cpu_us"] / a["cpu_us"] for a, v in zip(base, rs, strict=True)),
                3,
            )
        out["results"][name] = row
    return out


def render(r: dict[str, Any]) -> str:
    unit = r["unit"]
    what = (
        f"{r['n']} new connections, one at a time, over one pooled HBONE connection (CONNECT "
        f"with the app's first {r['size']} byte, 200, one byte back, both ends closed)"
        if r["workload"] == "connections"
        else f"{r['n']} round trips of {r['size']} bytes"
    )
    lines = [
        f"tether bench pingpong: {what} through the whole HBONE path in one process (both "
        f"agents and the app ends); CPU µs per {unit}, medians of {r['runs']} alternating "
        f"runs, each a fresh process; load {r['loadavg']}",
        f"calls: function calls per {unit}, counted under cProfile in one more run per row",
        f"{'row':14} {'CPU µs':>7} {'x as is':>8} {'wall µs':>8} {'calls':>7} {'x as is':>8}  "
        f"{'intact':6} tls / loop / code",
    ]
    for name, x in r["results"].items():
        lines.append(
            f"{name:14} {x['cpu_us']:>7} {x.get('cpu_x_as_is', 1.0):>8} {x['wall_us']:>8} "
            f"{x['calls']:>7} {x.get('calls_x_as_is', 1.0):>8}  {x['intact']!s:6} "
            f"{','.join(x['tls'])} / {x['loop']} / {x['code']}"
        )
        lines.append(f"{'':14} CPU µs each run: {x['each_cpu_us']}")
    for name, x in r["results"].items():
        top = ", ".join(f"{k} {v:g}" for k, v in list(x["top_calls"].items())[:12])
        lines.append(f"most called per {unit} [{name}]: {top}")
    return "\n".join(lines)


def main(
    runs: int, variants: dict[str, dict[str, str]], json_out: bool, workload: str = "messages"
) -> int:
    r = run(runs=runs, variants=variants, workload=workload)
    print(json.dumps(r, indent=1) if json_out else render(r))
    return 0 if all(x["intact"] for x in r["results"].values()) else 1
