"""The agent's listeners inside one enrolled pod's network namespace.

The agent lives in the node's network namespace but opens its listeners in
the pod's (enter the netns on this thread, socket/bind/listen, come back), as
ztunnel's in-pod mode does.  Sockets stay in the namespace they were made in,
so one event loop serves every pod.  Connections leave from the pod's
namespace too: on the wire they carry the pod's own IP, and the CNI, routing
and NetworkPolicy see ordinary pod traffic.

15001 goes to agent.tunnel.outbound, 15008 to agent.tunnel.inbound, 15006 to
agent.tunnel.plaintext.  This class owns the listeners, the accept loops and
the handoff of both to a successor agent.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import socket
import threading
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from agent import netns
from agent.tunnel import h2conn
from agent.tunnel.conns import parse_endpoint
from agent.tunnel.context import PodRef, Ports, Tunnel
from agent.tunnel.delivery import run_relay
from agent.tunnel.inbound import AdmissionSlot, InboundHbone
from agent.tunnel.loops import call_on, run_on
from agent.tunnel.outbound import outbound
from agent.tunnel.plaintext import inbound_plain
from agent.tunnel.relay import Relay, tcp_socket

log = logging.getLogger(__name__)

Handler = Callable[[socket.socket], Awaitable[None]]
# Connections each tunnel loop has in hand: counted when placed there (on
# the main loop's thread, so a burst of accepts sees its own placements) and
# uncounted when its task ends (on that loop's thread): under a lock.
_active: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = weakref.WeakKeyDictionary()
_active_lock = threading.Lock()


def _count(loop: asyncio.AbstractEventLoop, delta: int) -> None:
    with _active_lock:
        _active[loop] = _active.get(loop, 0) + delta


class PodProxy:
    """Listeners and connections of one enrolled pod."""

    LISTENERS = (
        ("out4", socket.AF_INET, "127.0.0.1", "outbound"),
        ("out6", socket.AF_INET6, "::1", "outbound"),
        ("in4", socket.AF_INET, "127.0.0.1", "inbound"),
        ("in6", socket.AF_INET6, "::1", "inbound"),
        ("hbone4", socket.AF_INET, "127.0.0.1", "hbone"),
        ("hbone6", socket.AF_INET6, "::1", "hbone"),
    )

    def __init__(self, pod: PodRef, ports: Ports, tunnel: Tunnel) -> None:
        self.pod = pod
        self.ports = ports
        self.t = tunnel
        self.listeners: dict[str, socket.socket] = {}
        self._accepting: list[asyncio.Task[None]] = []  # on the main loop
        self._on: dict[asyncio.AbstractEventLoop, dict[str, Handler]] = {}  # per tunnel loop
        # more than one loop: connections are placed, and counted per loop
        # for it (with one, nothing on the accept path is spent on that)
        self._multi = bool(tunnel.loop_tunnels)
        self._hbone: dict[asyncio.AbstractEventLoop, InboundHbone] = {}  # 15008, per tunnel loop
        self._stopped = False  # released or closed: a connection still on its way is closed
        self._handlers: set[asyncio.Task[None]] = set()  # strong refs until done

    # -- listeners -------------------------------------------------------------

    def open(self) -> dict[str, socket.socket]:
        """Create the listening sockets inside the pod's netns (not yet serving)."""
        with netns.entered(self.pod.netns):
            for name, fam, host, kind in self.LISTENERS:
                if kind == "hbone" and self.t.server_context is None:
                    continue
                s = tcp_socket(fam)  # accepted sockets inherit TCP_NODELAY
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if fam == socket.AF_INET6:
                        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    s.bind((host, getattr(self.ports, kind)))
                    s.listen(4096)
                    s.setblocking(False)
                except OSError as e:
                    s.close()
                    if fam == socket.AF_INET6 and e.errno in (
                        errno.EADDRNOTAVAIL,
                        errno.EAFNOSUPPORT,
                    ):
                        log.warning("pod %s has no IPv6 loopback: IPv6 not captured", self.pod.key)
                        continue
                    self.close()
                    raise
                self.listeners[name] = s
        return self.listeners

    def adopt(self, listeners: dict[str, socket.socket]) -> None:
        """Serve listening sockets handed over by a predecessor."""
        self.listeners = listeners

    def serve(self) -> None:
        """Accept on this (the main) loop; each connection is served on the
        tunnel loop `_place` picks (agent.tunnelLoops; one loop: here)."""
        loop = asyncio.get_running_loop()
        for lp, t in [(loop, self.t), *self.t.loop_tunnels]:
            self._on[lp] = self._handlers_with(t)
            if self.pod.identity is not None and t.server_context is not None:
                self._hbone[lp] = InboundHbone(t, self.pod)
        for name, sock in self.listeners.items():
            kind = name.rstrip("46")
            if kind not in self._on[loop] and not (kind == "hbone" and self._hbone):
                log.warning("pod %s: no handler for listener %s; closing it", self.pod.key, name)
                sock.close()
                continue
            self._accepting.append(loop.create_task(self._accept_loop(sock, kind)))

    def _handlers_with(self, t: Tunnel) -> dict[str, Handler]:
        """This pod's app-side handlers with one loop's Tunnel (its pool)."""
        pod = self.pod

        async def out(s: socket.socket) -> None:
            await outbound(t, pod, self.ports, s)

        async def plain_in(s: socket.socket) -> None:
            await inbound_plain(t, pod, s)

        return {"out": out, "in": plain_in}

    async def _accept_loop(self, listener: socket.socket, kind: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except OSError as e:
                if listener.fileno() < 0:
                    return
                log.warning("accept on %s failed: %s", self.pod.key, e)
                await asyncio.sleep(0.05)
                continue
            conn.setblocking(False)
            slot = None
            if kind == "hbone":  # admitted here, before it is queued anywhere
                slot = self._hbone[loop].admit(conn)
                if slot is None:
                    continue
            target = loop
            if self._multi:
                target = self._place(loop, kind)
                _count(target, 1)
            if target is loop:
                task = loop.create_task(self._guard(self._handler(loop, kind, slot), conn))
                self._track(task, counted=True, slot=slot)
                continue
            try:
                target.call_soon_threadsafe(self._start, kind, conn, slot)
            except RuntimeError:  # that loop has ended (shutdown)
                _count(target, -1)
                if slot is not None:
                    slot.release()
                conn.close()

    def _handler(
        self, loop: asyncio.AbstractEventLoop, kind: str, slot: AdmissionSlot | None
    ) -> Handler:
        if slot is not None:
            return functools.partial(self._hbone[loop].serve, slot=slot)
        return self._on[loop][kind]

    def _place(self, here: asyncio.AbstractEventLoop, kind: str) -> asyncio.AbstractEventLoop:
        """The loop a new connection is served on.  A 15008 connection goes
        to the loop with the fewest HBONE connections (and connections in
        hand), if it has fewer than this one: each carries a peer's pooled
        streams for minutes.  An app
        connection (15001, 15006) stays here unless another loop has at
        least two fewer connections in hand (`_active`): one at a time they
        never leave this loop (no other thread is woken), many spread out."""
        loops = list(self._on)
        if kind == "hbone":  # its HBONE connections and those still on their way to it

            def hbone(lp: asyncio.AbstractEventLoop) -> int:
                return h2conn.live_count(lp) + _active.get(lp, 0)

            fewest = min(loops, key=hbone)
            return fewest if hbone(fewest) < hbone(here) else here
        fewest = min(loops, key=lambda lp: _active.get(lp, 0))
        return fewest if _active.get(fewest, 0) + 2 <= _active.get(here, 0) else here

    def _start(self, kind: str, conn: socket.socket, slot: AdmissionSlot | None) -> None:
        """A connection placed on this loop by the main loop (counted there)."""
        loop = asyncio.get_running_loop()
        if self._stopped:
            _count(loop, -1)
            if slot is not None:
                slot.release()
            conn.close()
            return
        task = loop.create_task(self._guard(self._handler(loop, kind, slot), conn))
        self._track(task, counted=True, slot=slot)

    async def _guard(self, handler: Handler, conn: socket.socket) -> None:
        """One bad connection is logged and closed; nothing else is touched."""
        try:
            await handler(conn)
        except Exception as e:
            log.info("connection in %s failed: %s", self.pod.key, e)
            conn.close()

    # -- handoff -------------------------------------------------------------------

    async def freeze(self) -> dict[str, Any]:
        """Stop accepting and freeze every plain relay of this pod; give back
        the listeners and those connections' sockets for a successor
        (agent.handoff).  HBONE connections cannot move (their TLS state is in
        this process): they keep running here until they end.  A relay on
        another tunnel loop is frozen there."""
        listeners = {
            n: socket.socket(fileno=socket.dup(s.fileno())) for n, s in self.listeners.items()
        }
        self.release()
        conns = []
        for c in [c for c in list(self.t.conns.open.values()) if c.pod == self.pod.key]:
            if not isinstance(c.relay, Relay):
                continue  # HBONE, or still connecting: drains here
            socks = await run_on(c.loop, c.relay.freeze())
            if socks is not None:
                info = c.record()
                info["src"], info["dst"] = list(c.src), list(c.dst)
                conns.append({"info": info, "a": socks[0], "b": socks[1]})
                self.t.conns.end(c, None)
        return {"listeners": listeners, "connections": conns}

    def release(self) -> None:
        """Stop accepting and close the listeners (a successor binds its own);
        every open connection of the pod carries on here until it ends."""
        self._stopped = True
        for t in self._accepting:
            t.cancel()
        self._accepting.clear()
        for s in self.listeners.values():
            s.close()
        self.listeners.clear()

    def resume(self, handed: dict[str, Any]) -> None:
        """Carry on relaying a connection a predecessor froze."""
        info = handed["info"]
        c = self.t.conns.add(
            self.pod.key,
            info["direction"],
            tuple(info["src"]),
            tuple(info["dst"]),
            info["path"],
            inherited=True,
            sent_base=info.get("bytes_sent", 0),
            received_base=info.get("bytes_received", 0),
        )
        if info.get("delivered_as"):
            c.delivered_as = parse_endpoint(info["delivered_as"])
        coro = run_relay(self.t.conns, self.t.bypass, c, handed["a"], handed["b"])
        self._track(asyncio.get_running_loop().create_task(coro))

    def _track(
        self, task: asyncio.Task[None], counted: bool = False, slot: AdmissionSlot | None = None
    ) -> None:
        """Keep a connection's task (on its own loop); it is in hand there
        until it ends (`counted`: already counted when placed).  An admitted
        15008 connection whose task never ran (cancelled first) gives its
        admission back here."""
        if self._multi and not counted:
            _count(task.get_loop(), 1)
        self._handlers.add(task)
        task.add_done_callback(functools.partial(self._untrack, slot))

    def _untrack(self, slot: AdmissionSlot | None, task: asyncio.Task[None]) -> None:
        if self._multi:
            _count(task.get_loop(), -1)
        self._handlers.discard(task)
        if slot is not None and not slot.taken:
            slot.release()

    def close(self) -> None:
        self._stopped = True
        for t in [*self._accepting, *self._handlers]:
            call_on(t.get_loop(), t.cancel)
        self._accepting.clear()
        for s in self.listeners.values():
            s.close()
        self.listeners.clear()
