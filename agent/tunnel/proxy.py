"""The agent's listeners inside each enrolled pod's network namespace, and the
plaintext passthrough behind them.

The agent lives in the node's network namespace but opens its listeners in
the pod's (enter the netns on this thread, socket/bind/listen, come back), as
ztunnel's in-pod mode does.  Sockets stay in the namespace they were made in,
so one event loop serves every pod.  Upstream connections are made from the
pod's namespace too: on the wire they carry the pod's own IP, and the CNI,
routing and NetworkPolicy see ordinary pod traffic.

- outbound (15001, loopback): original destination by SO_ORIGINAL_DST, then a
  connection to it from the pod.  (The HBONE tunnel slots in here.)
- inbound (15006, steered by sk_lookup): original destination is the accepted
  socket's own address; delivery to the app keeps the client's source IP
  (IP_TRANSPARENT + SO_MARK, routed back by agent.datapath.podnet).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import ipaddress
import itertools
import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, Protocol

from agent import netns
from agent.tunnel.relay import Relay

log = logging.getLogger(__name__)

SO_ORIGINAL_DST = 80  # SOL_IP and SOL_IPV6 (IP6T_SO_ORIGINAL_DST) alike
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
DELIVERY_MARK = 0x539  # agent.datapath.podnet.DELIVERY_MARK
CONNECT_TIMEOUT = 10.0


class Capture(Protocol):
    """What the proxy needs from the datapath (narrowed; the proxy never sees
    maps or programs)."""

    def bypass(self, src: tuple[str, int], dst: tuple[str, int]) -> None: ...
    def unbypass(self, src: tuple[str, int], dst: tuple[str, int]) -> None: ...
    def splice(self, sock: socket.socket) -> bool: ...


@dataclasses.dataclass(frozen=True)
class PodRef:
    key: str
    netns: str
    ips: tuple[str, ...]


@dataclasses.dataclass
class Ports:
    outbound: int = 15001
    inbound: int = 15006
    hbone: int = 15008


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """SO_ORIGINAL_DST of a redirected connection, answered by the datapath's
    cgroup/getsockopt program (or by netfilter where a node has it)."""
    if sock.family == socket.AF_INET:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, addr = struct.unpack_from("!H4s", raw, 2)
        return socket.inet_ntop(socket.AF_INET, addr), port
    raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    port = struct.unpack_from("!H", raw, 2)[0]
    a = ipaddress.IPv6Address(raw[8:24])
    return (str(a.ipv4_mapped) if a.ipv4_mapped else str(a)), port


def _plain(addr: tuple[Any, ...]) -> tuple[str, int]:
    """(host, port) with IPv4-mapped IPv6 shown as IPv4."""
    host = str(addr[0])
    with contextlib.suppress(ValueError):
        a = ipaddress.ip_address(host)
        if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped:
            host = str(a.ipv4_mapped)
    return host, int(addr[1])


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


@dataclasses.dataclass
class Connection:
    """One relayed connection, for status, access logs and the demo."""

    id: int
    pod: str
    direction: str  # outbound | inbound
    src: tuple[str, int]
    dst: tuple[str, int]
    path: str  # relay | sk_msg
    started: float
    relay: Relay | None = None
    ended: float | None = None
    error: str | None = None
    inherited: bool = False  # taken over from a predecessor agent
    delivered_as: tuple[str, int] | None = None  # inbound: the source the app sees

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pod": self.pod,
            "direction": self.direction,
            "src": f"{self.src[0]}:{self.src[1]}",
            "dst": f"{self.dst[0]}:{self.dst[1]}",
            "path": self.path,
            "bytes_sent": self.relay.bytes_a_to_b if self.relay else 0,
            "bytes_received": self.relay.bytes_b_to_a if self.relay else 0,
            "duration_s": round((self.ended or time.monotonic()) - self.started, 6),
            "open": self.ended is None,
            "error": self.error,
            "inherited": self.inherited,
            "delivered_as": f"{self.delivered_as[0]}:{self.delivered_as[1]}"
            if self.delivered_as else None,
        }


class PodProxy:
    """Listeners and connections of one enrolled pod."""

    def __init__(self, pod: PodRef, ports: Ports, capture: Capture, conns: ConnTable) -> None:
        self.pod = pod
        self.ports = ports
        self.capture = capture
        self.conns = conns
        self.listeners: dict[str, socket.socket] = {}
        self._accepting: list[asyncio.Task[None]] = []
        self._handlers: set[asyncio.Task[None]] = set()  # strong refs until done

    def open(self) -> dict[str, socket.socket]:
        """Create the listening sockets inside the pod's netns (not yet serving).
        Keys: out4, out6, in4, in6."""
        specs = [
            ("out4", socket.AF_INET, "127.0.0.1", self.ports.outbound),
            ("out6", socket.AF_INET6, "::1", self.ports.outbound),
            ("in4", socket.AF_INET, "127.0.0.1", self.ports.inbound),
            ("in6", socket.AF_INET6, "::1", self.ports.inbound),
        ]
        with netns.entered(self.pod.netns):
            for name, fam, host, port in specs:
                s = socket.socket(fam, socket.SOCK_STREAM)
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if fam == socket.AF_INET6:
                        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    s.bind((host, port))
                    s.listen(4096)
                    s.setblocking(False)
                except OSError as e:
                    s.close()
                    if fam == socket.AF_INET6 and e.errno in (errno.EADDRNOTAVAIL,
                                                              errno.EAFNOSUPPORT):
                        log.warning("pod %s has no IPv6 loopback: IPv6 not captured",
                                    self.pod.key)
                        continue
                    self.close()
                    raise
                self.listeners[name] = s
        return self.listeners

    def adopt(self, listeners: dict[str, socket.socket]) -> None:
        """Serve listening sockets handed over by a predecessor."""
        self.listeners = listeners

    def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for name, sock in self.listeners.items():
            handler = self._outbound if name.startswith("out") else self._inbound
            self._accepting.append(loop.create_task(self._accept_loop(sock, handler)))

    async def _accept_loop(
        self, listener: socket.socket, handler: Callable[[socket.socket], Any]
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(listener)
            except asyncio.CancelledError:
                raise
            except OSError as e:
                if listener.fileno() < 0:
                    return
                log.warning("accept on %s failed: %s", self.pod.key, e)
                await asyncio.sleep(0.05)
                continue
            conn.setblocking(False)
            self._track(loop.create_task(self._guard(handler, conn)))

    async def _guard(self, handler: Callable[[socket.socket], Any], conn: socket.socket) -> None:
        """One bad connection is logged and closed; nothing else is touched."""
        try:
            await handler(conn)
        except Exception as e:
            log.info("connection in %s failed: %s", self.pod.key, e)
            conn.close()

    async def _outbound(self, app: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        src = _plain(app.getpeername())
        try:
            dst = original_dst(app)
        except OSError as e:
            log.warning("%s: no original destination for %s (%s); closing", self.pod.key, src, e)
            app.close()
            return
        spliced = self.capture.splice(app)
        c = self.conns.add(self.pod.key, "outbound", src, dst, "sk_msg" if spliced else "relay")
        with netns.entered(self.pod.netns):
            up = socket.socket(_family(dst[0]), socket.SOCK_STREAM)
        up.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(up, dst), CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as e:
            up.close()
            app.close()
            self.conns.end(c, f"connect {dst[0]}:{dst[1]}: {e}")
            return
        await self._relay(c, app, up)

    async def _inbound(self, client: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        src = _plain(client.getpeername())
        dst = _plain(client.getsockname())  # sk_lookup kept the dialled address
        c = self.conns.add(self.pod.key, "inbound", src, dst, "relay")
        fam = _family(dst[0])
        with netns.entered(self.pod.netns):
            app = socket.socket(fam, socket.SOCK_STREAM)
        try:
            app.setblocking(False)
            if fam == socket.AF_INET:
                app.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            else:
                app.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            app.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, DELIVERY_MARK)
            app.bind((src[0], 0))
            local = _plain(app.getsockname())
            c.delivered_as = local
            self.capture.bypass(local, dst)
            try:
                await asyncio.wait_for(loop.sock_connect(app, dst), CONNECT_TIMEOUT)
            finally:
                self.capture.unbypass(local, dst)
        except (OSError, TimeoutError) as e:
            app.close()
            client.close()
            self.conns.end(c, f"deliver to {dst[0]}:{dst[1]}: {e}")
            return
        await self._relay(c, client, app)

    async def _relay(self, c: Connection, a: socket.socket, b: socket.socket) -> None:
        r = Relay(c.record())
        c.relay = r
        try:
            await r.start(a, b)
            await r.done
        finally:
            if not r.frozen:
                self.conns.end(c, None)

    async def freeze(self) -> dict[str, Any]:
        """Stop accepting and freeze every relay of this pod; give back the
        listeners and connection sockets for a successor (agent.handoff)."""
        for t in self._accepting:
            t.cancel()
        self._accepting.clear()
        listeners = {n: socket.socket(fileno=socket.dup(s.fileno())) for n, s in
                     self.listeners.items()}
        for s in self.listeners.values():
            s.close()
        self.listeners.clear()
        conns = []
        for c in [c for c in self.conns.open.values() if c.pod == self.pod.key]:
            if c.relay is None:
                continue  # still connecting: it fails over to a client retry
            socks = await c.relay.freeze()
            if socks is not None:
                info = c.record()
                info["src"], info["dst"] = list(c.src), list(c.dst)
                conns.append({"info": info, "a": socks[0], "b": socks[1]})
        return {"listeners": listeners, "connections": conns}

    def resume(self, handed: dict[str, Any]) -> None:
        """Carry on relaying a connection a predecessor froze."""
        info = handed["info"]
        c = self.conns.add(self.pod.key, info["direction"], tuple(info["src"]),
                           tuple(info["dst"]), info["path"])
        c.inherited = True
        self._track(asyncio.get_running_loop().create_task(
            self._relay(c, handed["a"], handed["b"])))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    def close(self) -> None:
        for t in [*self._accepting, *self._handlers]:
            t.cancel()
        self._accepting.clear()
        for s in self.listeners.values():
            s.close()
        self.listeners.clear()


class ConnTable:
    """Open and recently closed connections (bounded), for status and the demo."""

    def __init__(self, keep_closed: int = 1000) -> None:
        self._ids = itertools.count(1)
        self.open: dict[int, Connection] = {}
        self.closed: list[Connection] = []
        self.keep_closed = keep_closed
        self.on_close: list[Callable[[Connection], None]] = []

    def add(self, pod: str, direction: str, src: tuple[str, int], dst: tuple[str, int],
            path: str) -> Connection:
        c = Connection(next(self._ids), pod, direction, src, dst, path, time.monotonic())
        self.open[c.id] = c
        return c

    def end(self, c: Connection, error: str | None) -> None:
        if c.id not in self.open:
            return
        del self.open[c.id]
        c.ended = time.monotonic()
        c.error = error
        self.closed.append(c)
        del self.closed[: -self.keep_closed]
        for cb in self.on_close:
            cb(c)
