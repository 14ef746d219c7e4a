"""Hand the running agent's sockets to its successor, so a restart (a DaemonSet
rollout, an upgrade) drops no connection.

The kernel side survives restarts by itself (pinned links and maps).  What
does not are the agent's sockets: the listeners in every pod and both ends of
every relayed connection.  The old agent serves a unix socket in the state
directory; a new agent connects to it first thing, the old one freezes its
relays at a clean point (reads paused, buffers flushed), sends every socket
with SCM_RIGHTS, and exits.  No byte is read twice or lost: what the old agent
read it also wrote, and what it did not read waits in the kernel for the new
one.  If the old agent is gone (a crash), the new one starts fresh and the
pinned kernel state is still adopted.

Versions.  The successor asks `HANDOFF <version>`; the bundle's layout is
that version's.  A predecessor that does not speak the version asked for
(an upgrade or downgrade across a format change) does not guess: it
*releases* instead, answering `RELEASED
<reason>` after closing its listeners, and keeps serving every connection it
has (plain relays too) until they end; the successor binds fresh listeners
and serves new connections.  Either way no established connection drops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SOCKET_NAME = "handoff.sock"
FDS_PER_MESSAGE = 200  # below SCM_MAX_FD (253)
VERSION = 1  # the bundle layout below; bump on any change to it
SUPPORTED = frozenset({VERSION})
# pod key -> {"listeners": {name: socket}, "connections": [{"info", "a", "b"}]}
Bundle = dict[str, dict[str, Any]]


def _flatten(bundle: Bundle) -> tuple[dict[str, Any], list[socket.socket]]:
    socks: list[socket.socket] = []
    header: dict[str, Any] = {}
    for key, pod in bundle.items():
        h: dict[str, Any] = {"listeners": {}, "connections": []}
        for name, s in pod["listeners"].items():
            h["listeners"][name] = len(socks)
            socks.append(s)
        for c in pod["connections"]:
            h["connections"].append({"info": c["info"], "a": len(socks), "b": len(socks) + 1})
            socks += [c["a"], c["b"]]
        header[key] = h
    return header, socks


def parse_request(line: bytes) -> int | None:
    """`HANDOFF <n>` -> n; anything else (including a bare `HANDOFF`) -> None."""
    parts = line.split()
    if len(parts) == 2 and parts[0] == b"HANDOFF" and parts[1].isdigit():
        return int(parts[1])
    return None


async def serve(
    state_dir: str,
    give: Callable[[], Awaitable[Bundle]],
    release: Callable[[], Awaitable[None]],
    stop: asyncio.Event,
) -> asyncio.AbstractServer:
    """Answer one successor: give it our sockets (a version we speak) or
    release our listeners to it (any other).  Either way `stop` is set."""
    path = Path(state_dir) / SOCKET_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            line = (await asyncio.wait_for(r.readline(), 5)).strip()
            if not line.startswith(b"HANDOFF"):
                return  # not a successor
            version = parse_request(line)
            if version not in SUPPORTED:
                why = (
                    f"successor asked for handoff version {line[8:].decode(errors='replace')!r}"
                    f", this agent speaks {sorted(SUPPORTED)}"
                )
                log.warning(
                    "%s: releasing the listeners instead; open connections stay "
                    "here until they end",
                    why,
                )
                await release()
                w.write(f"RELEASED {why}\n".encode())
                await w.drain()
                stop.set()
                return
            log.info("successor asked for a handoff (version %d): freezing", version)
            bundle = await give()
            header, socks = _flatten(bundle)
            raw: socket.socket = w.get_extra_info("socket")
            sock = socket.socket(fileno=os.dup(raw.fileno()))
            sock.setblocking(True)
            try:
                sock.sendall(f"SOCKETS {version}\n".encode())
                body = json.dumps({"version": version, "pods": header, "fds": len(socks)}).encode()
                sock.sendall(len(body).to_bytes(4, "big") + body)
                for i in range(0, len(socks), FDS_PER_MESSAGE):
                    chunk = socks[i : i + FDS_PER_MESSAGE]
                    socket.send_fds(sock, [b"F"], [s.fileno() for s in chunk])
                sock.settimeout(10)
                ack = sock.recv(16)
            finally:
                sock.close()
            for s in socks:
                s.close()
            log.info("handed off %d sockets (%s); stopping", len(socks), ack.decode().strip())
            stop.set()
        finally:
            w.close()

    return await asyncio.start_unix_server(on_conn, path=str(path))


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("predecessor closed the handoff early")
        buf += chunk
    return buf


def _recv_line(sock: socket.socket, limit: int = 4096) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        if len(buf) >= limit:
            raise ConnectionError("handoff answer line too long")
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("predecessor closed the handoff early")
        buf += chunk
    return buf.strip()


def _receive_blocking(path: Path, version: int = VERSION) -> Bundle | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    try:
        try:
            s.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("no running predecessor at %s: starting fresh", path)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return None
        s.sendall(f"HANDOFF {version}\n".encode())
        answer = _recv_line(s)
        if answer.startswith(b"RELEASED"):
            log.warning(
                "predecessor released its listeners instead of handing them over "
                "(%s); its open connections end there, new ones are served here",
                answer[9:].decode(errors="replace"),
            )
            return None
        if answer != f"SOCKETS {version}".encode():
            raise ConnectionError(f"unexpected handoff answer {answer[:80]!r}")
        size = int.from_bytes(_recv_exact(s, 4), "big")
        header = json.loads(_recv_exact(s, size))
        fds: list[int] = []
        while len(fds) < header["fds"]:
            _, got, _, _ = socket.recv_fds(s, 1, FDS_PER_MESSAGE)
            if not got:
                raise ConnectionError("predecessor closed the handoff early")
            fds += got
        s.sendall(b"OK\n")
    finally:
        s.close()
    socks = [socket.socket(fileno=fd) for fd in fds]
    for x in socks:
        x.setblocking(False)
    bundle: Bundle = {}
    for key, h in header["pods"].items():
        bundle[key] = {
            "listeners": {n: socks[i] for n, i in h["listeners"].items()},
            "connections": [
                {"info": c["info"], "a": socks[c["a"]], "b": socks[c["b"]]}
                for c in h["connections"]
            ],
        }
    log.info("took over %d sockets of %d pods from the predecessor", len(socks), len(bundle))
    return bundle


async def receive(state_dir: str, version: int = VERSION) -> Bundle | None:
    """Take over from a running predecessor: its sockets (a bundle), or None
    when there is none or it released its listeners instead."""
    path = Path(state_dir) / SOCKET_NAME
    if not path.exists():
        return None
    return await asyncio.get_running_loop().run_in_executor(None, _receive_blocking, path, version)


__all__ = ["VERSION", "Bundle", "receive", "serve"]
