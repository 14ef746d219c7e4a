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
import logging
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from agent import netns
from agent.tunnel import h2conn
from agent.tunnel.conns import parse_endpoint
from agent.tunnel.context import PodRef, Ports, Tunnel
from agent.tunnel.delivery import run_relay
from agent.tunnel.inbound import InboundHbone
from agent.tunnel.loops import call_on, run_on
from agent.tunnel.outbound import outbound
from agent.tunnel.plaintext import inbound_plain
from agent.tunnel.relay import Relay, tcp_socket

log = logging.getLogger(__name__)

Handler = Callable[[socket.socket], Awaitable[None]]


def _dup_all(listeners: dict[str, socket.socket]) -> dict[str, socket.socket]:
    dups = {}
    for n, s in listeners.items():
        d = dups[n] = socket.socket(fileno=socket.dup(s.fileno()))
        d.setblocking(False)
    return dups


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
        self._accepting: list[asyncio.Task[None]] = []  # every loop's (see serve)
        self._lock = threading.Lock()  # _accepting and _stopped, across loops
        self._stopped = False  # released or closed: an extra loop starting late serves nothing
        self._hbone_on: dict[asyncio.AbstractEventLoop, Handler] = {}  # each loop's 15008 handler
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
        """Accept on every tunnel loop: this one, and each extra loop of
        agent.tunnelLoops on a duplicate of each listener that the loop owns
        and closes itself (a socket is never closed under another thread's
        poller).  Call on the main loop."""
        extra = [(loop, t, _dup_all(self.listeners)) for loop, t in self.t.loop_tunnels]
        self._serve_on(self.t, dict(self.listeners), owned=False)
        for loop, t, dups in extra:
            loop.call_soon_threadsafe(self._serve_on, t, dups, True)

    def _serve_on(self, t: Tunnel, listeners: dict[str, socket.socket], owned: bool) -> None:
        loop = asyncio.get_running_loop()
        pod = self.pod

        async def out(s: socket.socket) -> None:
            await outbound(t, pod, self.ports, s)

        async def plain_in(s: socket.socket) -> None:
            await inbound_plain(t, pod, s)

        handlers: dict[str, Handler] = {"out": out, "in": plain_in}
        if pod.identity is not None and t.server_context is not None:
            handlers["hbone"] = InboundHbone(t, pod).accept
        for name, sock in listeners.items():
            handler = handlers.get(name.rstrip("46"))
            if handler is None:
                if not owned:
                    log.warning("pod %s: no handler for listener %s; closing it", pod.key, name)
                sock.close()
                continue
            if name.startswith("hbone"):
                self._hbone_on[loop] = handler
            with self._lock:
                if not self._stopped:
                    self._accepting.append(
                        loop.create_task(self._accept_loop(sock, handler, owned))
                    )
                    continue
            if owned:  # released while this loop was getting to it
                sock.close()

    async def _accept_loop(self, listener: socket.socket, handler: Handler, owned: bool) -> None:
        loop = asyncio.get_running_loop()
        try:
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
                target = self._balance(loop, handler)
                if target is None:
                    self._track(loop.create_task(self._guard(handler, conn)))
                else:
                    try:
                        target[0].call_soon_threadsafe(self._start, target[1], conn)
                    except RuntimeError:  # that loop has stopped (shutdown)
                        conn.close()
        finally:
            if owned:
                listener.close()

    def _balance(
        self, here: asyncio.AbstractEventLoop, handler: Handler
    ) -> tuple[asyncio.AbstractEventLoop, Handler] | None:
        """Where an accepted 15008 connection is served: the loop with the
        fewest HBONE connections, if it has fewer than this one (None: here).
        Each carries a peer's pooled streams for minutes, and which loop's
        accept wins is a race, so without this two peers' connections could
        share one loop while another idles.  App connections (15001, 15006)
        stay where they were accepted: the loop free to accept is the one
        not busy."""
        if len(self._hbone_on) < 2 or self._hbone_on.get(here) is not handler:
            return None
        # a copy in one step: another loop may be adding its handler
        fewest = min(list(self._hbone_on), key=h2conn.live_count)
        if h2conn.live_count(fewest) >= h2conn.live_count(here):
            return None
        return fewest, self._hbone_on[fewest]

    def _start(self, handler: Handler, conn: socket.socket) -> None:
        if self._stopped:
            conn.close()
            return
        self._track(asyncio.get_running_loop().create_task(self._guard(handler, conn)))

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
        listeners = _dup_all(self.listeners)
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
        for t in self._stop_accepting():
            call_on(t.get_loop(), t.cancel)  # an extra loop's task closes its own duplicate
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

    def _track(self, task: asyncio.Task[None]) -> None:
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    def _stop_accepting(self) -> list[asyncio.Task[None]]:
        with self._lock:
            self._stopped = True
            tasks, self._accepting = self._accepting, []
        return tasks

    def close(self) -> None:
        for t in [*self._stop_accepting(), *self._handlers]:
            call_on(t.get_loop(), t.cancel)
        for s in self.listeners.values():
            s.close()
        self.listeners.clear()
