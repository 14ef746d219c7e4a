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


async def serve(
    state_dir: str, give: Callable[[], Awaitable[Bundle]], stop: asyncio.Event
) -> asyncio.AbstractServer:
    path = Path(state_dir) / SOCKET_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            if (await asyncio.wait_for(r.readline(), 5)).strip() != b"HANDOFF":
                return
            log.info("successor asked for a handoff: freezing")
            bundle = await give()
            header, socks = _flatten(bundle)
            raw: socket.socket = w.get_extra_info("socket")
            sock = socket.socket(fileno=os.dup(raw.fileno()))
            sock.setblocking(True)
            try:
                body = json.dumps({"pods": header, "fds": len(socks)}).encode()
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


def _receive_blocking(path: Path) -> Bundle | None:
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
        s.sendall(b"HANDOFF\n")
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


async def receive(state_dir: str) -> Bundle | None:
    path = Path(state_dir) / SOCKET_NAME
    if not path.exists():
        return None
    return await asyncio.get_running_loop().run_in_executor(None, _receive_blocking, path)


__all__ = ["Bundle", "receive", "serve"]
