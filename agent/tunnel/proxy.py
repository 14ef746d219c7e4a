"""The agent's listeners inside each enrolled pod's network namespace.

The agent lives in the node's network namespace but opens its listeners in
the pod's (enter the netns on this thread, socket/bind/listen, come back), as
ztunnel's in-pod mode does.  Sockets stay in the namespace they were made in,
so one event loop serves every pod.  Connections leave from the pod's
namespace too: on the wire they carry the pod's own IP, and the CNI, routing
and NetworkPolicy see ordinary pod traffic.

- 15001 outbound (loopback; connect4/6 redirect here): original destination
  from SO_ORIGINAL_DST, endpoint from the state, then HBONE to the endpoint's
  15008 if a mesh node captures it, plain TCP otherwise.
- 15008 inbound HBONE (sk_lookup steers here): mTLS as the pod's identity,
  CONNECT checked and authorized, delivered to the app.
- 15006 inbound plaintext (sk_lookup steers here): refused under STRICT
  PeerAuthentication, authorized without identity under PERMISSIVE.

Delivery to the app keeps the client's source IP (IP_TRANSPARENT + SO_MARK,
routed back by agent.datapath.podnet).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import ipaddress
import logging
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from agent import netns
from agent.config import Workload
from agent.identity.spiffe import SpiffeId
from agent.identity.tls import peer_identity
from agent.state.store import Store
from agent.tunnel import limits
from agent.tunnel.bridge import Bridge
from agent.tunnel.conns import Connection, ConnTable, parse_endpoint
from agent.tunnel.h2conn import H2Conn, H2Stream
from agent.tunnel.hbone import (
    HBONE_PORT,
    HboneClient,
    HboneError,
    PoolKey,
    check_request,
    request_headers,
)
from agent.tunnel.limits import HboneLimits
from agent.tunnel.relay import Relay, tcp_socket

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


@dataclasses.dataclass(frozen=True)
class AuthzRequest:
    """An inbound connection as the destination's policy sees it."""

    src_ip: str
    src_identity: SpiffeId | None  # None: plaintext
    dst_ip: str
    dst_port: int
    workload: Workload


@dataclasses.dataclass(frozen=True)
class AuthzResult:
    allowed: bool
    reason: str
    policy: str | None = None


class Policy(Protocol):
    def authorize(self, req: AuthzRequest) -> AuthzResult: ...
    def plaintext_allowed(self, workload: Workload, port: int) -> bool: ...


@dataclasses.dataclass
class Tunnel:
    """Everything a pod's listeners share on a node."""

    capture: Capture
    store: Store
    conns: ConnTable
    policy: Policy
    hbone: HboneClient | None = None  # None: no identity yet, plaintext only
    server_context: Callable[[SpiffeId], Awaitable[ssl.SSLContext]] | None = None
    splicing: bool = False  # sk_msg splices the loopback hops (kernel-side)
    local: dict[str, PodProxy] = dataclasses.field(default_factory=dict)  # this node's pods
    limits: HboneLimits = dataclasses.field(default_factory=HboneLimits)  # inbound 15008


@dataclasses.dataclass(frozen=True)
class PodRef:
    key: str
    netns: str
    ips: tuple[str, ...]
    workload: Workload | None = None
    identity: SpiffeId | None = None


@dataclasses.dataclass
class Ports:
    outbound: int = 15001
    inbound: int = 15006
    hbone: int = HBONE_PORT


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


class _Mirror:
    """Byte counts of another connection's relay (the destination's record of
    a same-node connection shares the source's relay)."""

    def __init__(self, c: Connection) -> None:
        self.c = c

    @property
    def bytes_a_to_b(self) -> int:
        return self.c.relay.bytes_a_to_b if self.c.relay else 0

    @property
    def bytes_b_to_a(self) -> int:
        return self.c.relay.bytes_b_to_a if self.c.relay else 0

    @property
    def abort_flag(self) -> str | None:
        return getattr(self.c.relay, "abort_flag", None)


def _err(e: BaseException) -> str:
    """An error for a log line: TimeoutError and friends have no message."""
    return str(e) or type(e).__name__


def _refuse(sock: socket.socket) -> None:
    """Close with RST, as a refused connection looks to the client."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


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
        self._accepting: list[asyncio.Task[None]] = []
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
        loop = asyncio.get_running_loop()
        handlers: dict[str, Callable[[socket.socket], Awaitable[None]]] = {
            "out": self._outbound,
            "in": self._inbound_plain,
            "hbone": self._inbound_hbone,
        }
        for name, sock in self.listeners.items():
            handler = handlers[name.rstrip("46")]
            self._accepting.append(loop.create_task(self._accept_loop(sock, handler)))

    async def _accept_loop(
        self, listener: socket.socket, handler: Callable[[socket.socket], Awaitable[None]]
    ) -> None:
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
            self._track(loop.create_task(self._guard(handler, conn)))

    async def _guard(
        self, handler: Callable[[socket.socket], Awaitable[None]], conn: socket.socket
    ) -> None:
        """One bad connection is logged and closed; nothing else is touched."""
        try:
            await handler(conn)
        except Exception as e:
            log.info("connection in %s failed: %s", self.pod.key, e)
            conn.close()

    # -- outbound ---------------------------------------------------------------

    async def _outbound(self, app: socket.socket) -> None:
        src = _plain(app.getpeername())
        try:
            dst = original_dst(app)
        except OSError as e:
            log.warning("%s: no original destination for %s (%s); closing", self.pod.key, src, e)
            _refuse(app)
            return
        target = self.t.store.resolve(dst)
        w = self.pod.workload
        common = {
            "spliced": self.t.splicing,
            "src_workload": self.pod.key,
            "src_identity": self.pod.identity.uri if self.pod.identity else None,
            "dst_workload": target.workload.key if target.workload else None,
            "dst_service": target.service.hostname if target.service else None,
        }
        peer_proxy = self.t.local.get(target.workload.key) if target.workload else None
        if target.hbone and peer_proxy is not None and self.pod.identity is not None:
            await self._same_node(app, src, dst, target.address, peer_proxy, common)
            return
        if target.hbone and self.t.hbone is not None and self.pod.identity is not None:
            assert target.identity is not None
            c = self.t.conns.add(
                self.pod.key,
                "outbound",
                src,
                dst,
                "hbone",
                dst_identity=target.identity.uri,
                security="mutual_tls",
                **common,
            )
            headers = request_headers(
                target.authority,
                (self.pod.ips[0] if self.pod.ips else src[0], src[1]),
                namespace=w.namespace if w else "",
                workload=w.name if w else "",
                service_host=target.service.hostname if target.service else "",
            )
            key = PoolKey(
                self.pod.identity,
                target.identity,
                self.pod.netns,
                (target.address[0], self.ports.hbone),
            )
            try:
                stream = await self.t.hbone.open(key, headers)
            except HboneError as e:
                _refuse(app)
                self.t.conns.refuse(c, str(e), e.flag)
                return
            self.t.conns.opened(c)
            await self._bridge(c, app, stream, initiator="socket")
            return
        c = self.t.conns.add(self.pod.key, "outbound", src, dst, "passthrough", **common)
        with netns.entered(self.pod.netns):
            up = tcp_socket(_family(target.address[0]))
        up.setblocking(False)
        try:
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(up, target.address), CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as e:
            up.close()
            _refuse(app)
            self.t.conns.refuse(c, f"connect {target.authority}: {_err(e)}", "UF")
            return
        self.t.conns.opened(c)
        await self._relay(c, app, up)

    async def _same_node(
        self,
        app: socket.socket,
        src: tuple[str, int],
        dst: tuple[str, int],
        target: tuple[str, int],
        peer: PodProxy,
        common: dict[str, Any],
    ) -> None:
        """Both pods are on this node: the agent captured the source itself, so
        it knows the source identity first-hand.  Authorize as the destination
        would, deliver, relay; no TLS round trip through the node's own veth.
        Both ends are recorded, as two ztunnels would record them."""
        assert self.pod.identity is not None and peer.pod.identity is not None
        src_ip = next(
            (ip for ip in self.pod.ips if _family(ip) == _family(target[0])),
            self.pod.ips[0] if self.pod.ips else src[0],
        )
        out = self.t.conns.add(
            self.pod.key,
            "outbound",
            src,
            dst,
            "local",
            dst_identity=peer.pod.identity.uri,
            security="mutual_tls",
            **common,
        )
        inn = self.t.conns.add(
            peer.pod.key,
            "inbound",
            (src_ip, src[1]),
            target,
            "local",
            reporter="destination",
            security="mutual_tls",
            src_identity=self.pod.identity.uri,
            dst_identity=peer.pod.identity.uri,
            src_workload=self.pod.key,
            dst_workload=peer.pod.key,
            spliced=self.t.splicing,
        )
        decision = peer._authorize(inn, src_ip, self.pod.identity, target)
        if not decision.allowed:
            _refuse(app)
            for c in (out, inn):
                self.t.conns.refuse(c, f"denied: {decision.reason}", "DENY")
            return
        try:
            up, delivered = await peer._deliver(src_ip, target)
        except (OSError, TimeoutError) as e:
            _refuse(app)
            for c in (out, inn):
                self.t.conns.refuse(c, f"deliver to {target[0]}:{target[1]}: {_err(e)}", "UF")
            return
        inn.delivered_as = delivered
        for c in (out, inn):
            self.t.conns.opened(c)
        inn.relay = _Mirror(out)
        inn.kill = lambda: out.kill() if out.kill else None
        try:
            await self._relay(out, app, up)
        finally:
            peer._undeliver(inn)
            self.t.conns.end(inn, out.error)

    # -- inbound ------------------------------------------------------------------

    def _authorize(
        self, c: Connection, src_ip: str, ident: SpiffeId | None, dst: tuple[str, int]
    ) -> AuthzResult:
        w = self.pod.workload
        if w is None:
            return AuthzResult(True, "no workload record: no policy applies")
        return self.t.policy.authorize(AuthzRequest(src_ip, ident, dst[0], dst[1], w))

    async def _deliver(
        self, src_ip: str, dst: tuple[str, int]
    ) -> tuple[socket.socket, tuple[str, int]]:
        """Connect to the app from inside the pod, with the client's source IP."""
        fam = _family(dst[0])
        with netns.entered(self.pod.netns):
            app = tcp_socket(fam)
        try:
            app.setblocking(False)
            if fam == socket.AF_INET:
                app.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
            else:
                app.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
            app.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, DELIVERY_MARK)
            if _family(src_ip) != fam:  # an IPv4 client reaching an IPv6 target
                src_ip = f"::ffff:{src_ip}" if fam == socket.AF_INET6 else dst[0]
            app.bind((src_ip, 0))
            local = _plain(app.getsockname())
            # Stays until the connection ends (undeliver): the datapath also
            # uses it to recognise this hop for sk_msg when it is established.
            self.t.capture.bypass(local, dst)
            try:
                await asyncio.wait_for(
                    asyncio.get_running_loop().sock_connect(app, dst), CONNECT_TIMEOUT
                )
            except BaseException:
                self.t.capture.unbypass(local, dst)
                raise
        except BaseException:
            app.close()
            raise
        return app, local

    def _undeliver(self, c: Connection) -> None:
        if c.delivered_as is not None:
            with contextlib.suppress(OSError):
                self.t.capture.unbypass(c.delivered_as, c.dst)

    async def _inbound_plain(self, client: socket.socket) -> None:
        src = _plain(client.getpeername())
        dst = _plain(client.getsockname())  # sk_lookup kept the dialled address
        w = self.pod.workload
        c = self.t.conns.add(
            self.pod.key,
            "inbound",
            src,
            dst,
            "plaintext",
            reporter="destination",
            dst_workload=self.pod.key,
            dst_identity=self.pod.identity.uri if self.pod.identity else None,
            src_workload=self._workload_at(src[0]),
        )
        if w is not None and not self.t.policy.plaintext_allowed(w, dst[1]):
            _refuse(client)
            self.t.conns.refuse(c, "plaintext refused: PeerAuthentication STRICT", "DENY")
            return
        decision = self._authorize(c, src[0], None, dst)
        if not decision.allowed:
            _refuse(client)
            self.t.conns.refuse(c, f"denied: {decision.reason}", "DENY")
            return
        try:
            app, local = await self._deliver(src[0], dst)
        except (OSError, TimeoutError) as e:
            _refuse(client)
            self.t.conns.refuse(c, f"deliver to {dst[0]}:{dst[1]}: {_err(e)}", "UF")
            return
        c.delivered_as = local
        self.t.conns.opened(c)
        await self._relay(c, client, app)

    async def _inbound_hbone(self, sock: socket.socket) -> None:
        assert self.t.server_context is not None and self.pod.identity is not None
        loop = asyncio.get_running_loop()
        peer = _plain(sock.getpeername())
        local = _plain(sock.getsockname())
        if not self.t.limits.admit(self.pod.key, peer[0]):
            _refuse(sock)
            return
        release = functools.partial(self.t.limits.release, self.pod.key, peer[0])
        try:
            ctx = await self.t.server_context(self.pod.identity)
            _, conn = await loop.connect_accepted_socket(
                lambda: H2Conn(
                    client=False,
                    on_request=self._on_connect,
                    peer={"addr": peer, "local": local},
                    idle_timeout=limits.IDLE_TIMEOUT,
                ),
                sock,
                ssl=ctx,
                ssl_handshake_timeout=limits.HANDSHAKE_TIMEOUT,
                ssl_shutdown_timeout=limits.SHUTDOWN_TIMEOUT,
            )
            conn.closed.add_done_callback(lambda _f: release())
        except BaseException as e:
            release()
            if not isinstance(e, (ssl.SSLError, OSError, TimeoutError, ConnectionError)):
                raise
            c = self.t.conns.add(
                self.pod.key,
                "inbound",
                peer,
                local,
                "hbone",
                reporter="destination",
                dst_workload=self.pod.key,
                dst_identity=self.pod.identity.uri,
            )
            self.t.conns.refuse(c, f"TLS handshake failed: {_err(e)}", "TLS_FAILURE")
            sock.close()
            return
        assert conn.transport is not None
        try:
            ident = peer_identity(conn.transport.get_extra_info("ssl_object"))
            if ident.trust_domain != self.pod.identity.trust_domain:
                raise ValueError(
                    f"{ident.uri} is not in trust domain {self.pod.identity.trust_domain}"
                )
            conn.peer["identity"] = ident
        except (ssl.SSLError, ValueError) as e:
            c = self.t.conns.add(
                self.pod.key,
                "inbound",
                peer,
                local,
                "hbone",
                reporter="destination",
                dst_workload=self.pod.key,
            )
            self.t.conns.refuse(c, f"client certificate refused: {_err(e)}", "TLS_FAILURE")
            conn.close()

    async def _on_connect(self, conn: H2Conn, stream: H2Stream) -> None:
        """One CONNECT request on an authenticated HBONE connection."""
        assert self.pod.identity is not None
        peer: tuple[str, int] = conn.peer["addr"]
        local: tuple[str, int] = conn.peer["local"]
        ident: SpiffeId | None = conn.peer.get("identity")
        if ident is None and conn.transport is not None:
            # a request can arrive before _inbound_hbone resumes after the handshake
            with contextlib.suppress(ssl.SSLError, ValueError):
                got = peer_identity(conn.transport.get_extra_info("ssl_object"))
                if got.trust_domain == self.pod.identity.trust_domain:
                    ident = conn.peer["identity"] = got
        c = self.t.conns.add(
            self.pod.key,
            "inbound",
            peer,
            local,
            "hbone",
            reporter="destination",
            security="mutual_tls",
            src_identity=ident.uri if ident else None,
            dst_identity=self.pod.identity.uri,
            dst_workload=self.pod.key,
            src_workload=self._workload_at(peer[0]),
        )
        try:
            dst = check_request(stream.request_headers, local[0])
        except HboneError as e:
            conn.respond(stream, e.status or 400)
            self.t.conns.refuse(c, f"bad request: {_err(e)}", "-")
            return
        c.dst = dst
        if ident is None:
            conn.respond(stream, 401)
            self.t.conns.refuse(c, "no peer identity", "DENY")
            return
        decision = self._authorize(c, peer[0], ident, dst)
        if not decision.allowed:
            conn.respond(stream, 401)
            self.t.conns.refuse(c, f"denied: {decision.reason}", "DENY")
            return
        try:
            app, delivered = await self._deliver(peer[0], dst)
        except (OSError, TimeoutError) as e:
            conn.respond(stream, 503)
            self.t.conns.refuse(c, f"deliver to {dst[0]}:{dst[1]}: {_err(e)}", "UF")
            return
        c.delivered_as = delivered
        if stream.closed:  # the client went away while we were connecting
            app.close()
            self._undeliver(c)
            self.t.conns.opened(c)
            self.t.conns.end(c, "client went away during delivery", "DC")
            return
        conn.respond(stream, 200)
        self.t.conns.opened(c)
        await self._bridge(c, app, stream, initiator="stream")

    def revalidate(self) -> int:
        """Policy changed: close this pod's inbound connections that the new
        policy denies (ztunnel does the same); others are untouched."""
        closed = 0
        for c in [
            c
            for c in self.t.conns.open.values()
            if c.pod == self.pod.key and c.direction == "inbound" and c.kill
        ]:
            ident = SpiffeId.parse(c.src_identity) if c.src_identity else None
            decision = self._authorize(c, c.src[0], ident, c.dst)
            if not decision.allowed:
                c.flag = "DENY"
                c.error = f"closed by policy change: {decision.reason}"
                assert c.kill is not None
                c.kill()
                closed += 1
        return closed

    def _workload_at(self, ip: str) -> str | None:
        w = self.t.store.workload_by_ip(ip)
        return w.key if w else None

    # -- relaying ----------------------------------------------------------------

    async def _relay(self, c: Connection, a: socket.socket, b: socket.socket) -> None:
        r = Relay(c.record())
        c.relay = r
        c.kill = r.kill
        try:
            await r.start(a, b)
            await r.done
        finally:
            if not r.frozen:
                self._undeliver(c)
                self.t.conns.end(c, None)

    async def _bridge(
        self, c: Connection, sock: socket.socket, stream: H2Stream, initiator: str
    ) -> None:
        b = Bridge(stream, initiator=initiator)
        c.relay = b
        c.kill = b.close
        try:
            await b.start(sock)
            await b.done
        finally:
            self._undeliver(c)
            self.t.conns.end(c, str(b.error) if b.error else None)

    # -- handoff -------------------------------------------------------------------

    async def freeze(self) -> dict[str, Any]:
        """Stop accepting and freeze every plain relay of this pod; give back
        the listeners and those connections' sockets for a successor
        (agent.handoff).  HBONE connections cannot move (their TLS state is in
        this process): they keep running here until they end."""
        listeners = {
            n: socket.socket(fileno=socket.dup(s.fileno())) for n, s in self.listeners.items()
        }
        self.release()
        conns = []
        for c in [c for c in self.t.conns.open.values() if c.pod == self.pod.key]:
            if not isinstance(c.relay, Relay):
                continue  # HBONE, or still connecting: drains here
            socks = await c.relay.freeze()
            if socks is not None:
                info = c.record()
                info["src"], info["dst"] = list(c.src), list(c.dst)
                conns.append({"info": info, "a": socks[0], "b": socks[1]})
                self.t.conns.end(c, None)
        return {"listeners": listeners, "connections": conns}

    def release(self) -> None:
        """Stop accepting and close the listeners (a successor binds its own);
        every open connection of the pod carries on here until it ends."""
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
        self._track(
            asyncio.get_running_loop().create_task(self._relay(c, handed["a"], handed["b"]))
        )

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
