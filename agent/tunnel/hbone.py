"""HBONE: HTTP/2 CONNECT over mutual TLS to a pod's port 15008, as Istio's
ztunnel speaks it (facts in ../shared/ANCHORS.md).

- TLS 1.3 only, ALPN h2 both ways, no SNI, client certificate required.
- The client checks the server's SPIFFE ID against the expected identity.
- `:authority` is `ip:port` (`[v6]:port`) of the destination workload; the
  server refuses (400) an authority whose IP is not the address the
  connection was made to.
- Request headers: baggage, forwarded (`for="ip:port"`), traceparent.
- Answers: 200 connected, 400 bad request, 401 denied by policy, 503 the
  destination app refused.
- Connections are pooled per (source identity, destination identity,
  source netns, destination address), at most 100 streams each, closed
  after 5 minutes idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, cast

from hpack import NeverIndexedHeaderTuple

from agent import netns
from agent.identity.spiffe import SpiffeId
from agent.identity.tls import peer_identity
from agent.model import format_authority, norm_ip
from agent.tunnel import tlssock
from agent.tunnel.h2conn import H2Conn, H2Stream, StreamReset
from agent.tunnel.relay import connect, tcp_socket

log = logging.getLogger(__name__)

IDLE_TIMEOUT = 300.0
CONNECT_TIMEOUT = 10.0
KEEPALIVE_IDLE = 180

ContextFor = Callable[[SpiffeId], Awaitable[ssl.SSLContext]]


class HboneError(ConnectionError):
    """A CONNECT that did not give a stream; `flag` is the Istio response flag."""

    def __init__(self, message: str, status: int | None = None, flag: str = "CONNECT") -> None:
        super().__init__(message)
        self.status = status
        self.flag = flag


def parse_authority(value: str) -> tuple[str, int]:
    """`ip:port` or `[v6]:port` to (ip, port); ValueError names what is wrong."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"authority {value!r}: expected [ipv6]:port")
        port_s = rest[1:]
        ip = ipaddress.IPv6Address(host)
    else:
        host, sep, port_s = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"authority {value!r}: expected ip:port")
        ip4 = ipaddress.ip_address(host)
        if ip4.version != 4:
            raise ValueError(f"authority {value!r}: IPv6 must be in brackets")
        ip = ip4  # type: ignore[assignment]
    if not (port_s.isascii() and port_s.isdigit()) or not 0 < int(port_s) < 65536:
        raise ValueError(f"authority {value!r}: bad port")
    return str(ip), int(port_s)


def request_headers(
    authority: str,
    src: tuple[str, int],
    *,
    namespace: str = "",
    workload: str = "",
    service_host: str = "",
    cluster: str = "Kubernetes",
) -> list[tuple[str, str]]:
    trace = f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"
    baggage = ",".join(
        f"{k}={v}"
        for k, v in (
            ("k8s.cluster.name", cluster),
            ("k8s.namespace.name", namespace),
            ("k8s.deployment.name", workload),
            ("service.name", workload),
            ("service.version", "latest"),
        )
        if v
    )
    fwd = f'for="{format_authority(*src)}"' + (f";host={service_host}" if service_host else "")
    # new on every request: not added to the HPACK table, where each one
    # evicted the others (authority, baggage) that repeat and stay indexed
    return [
        (":method", "CONNECT"),
        (":authority", authority),
        ("baggage", baggage),
        cast(tuple[str, str], NeverIndexedHeaderTuple("forwarded", fwd)),
        cast(tuple[str, str], NeverIndexedHeaderTuple("traceparent", trace)),
    ]


def check_request(headers: list[tuple[str, str]], local_ip: str) -> tuple[str, int]:
    """Validate a CONNECT request arriving at local_ip; returns the target.
    Raises HboneError with status 400 for anything else."""
    h: dict[str, str] = {}
    for k, v in headers:
        if k in h and k.startswith(":"):
            raise HboneError(f"duplicate pseudo-header {k}", 400)
        h[k] = v
    if h.get(":method") != "CONNECT":
        raise HboneError(f"method {h.get(':method')!r} is not CONNECT", 400)
    if ":path" in h or ":scheme" in h:
        raise HboneError("CONNECT carries no :path or :scheme", 400)
    if ":authority" not in h:
        raise HboneError("missing :authority", 400)
    try:
        ip, port = parse_authority(h[":authority"])
    except ValueError as e:
        raise HboneError(str(e), 400) from None
    if norm_ip(ip) != norm_ip(local_ip):
        raise HboneError(f"authority {h[':authority']} is not this destination ({local_ip})", 400)
    return norm_ip(ip), port


@dataclasses.dataclass(frozen=True)
class PoolKey:
    src_identity: SpiffeId
    dst_identity: SpiffeId
    src_netns: str
    dst: tuple[str, int]


class HboneClient:
    """Opens CONNECT streams, reusing pooled mTLS connections."""

    def __init__(self, client_context: ContextFor) -> None:
        self.client_context = client_context
        self.pool: dict[PoolKey, list[H2Conn]] = {}
        self._locks: dict[PoolKey, asyncio.Lock] = {}
        self._sweeper: asyncio.Task[None] | None = None

    async def open(
        self, key: PoolKey, headers: list[tuple[str, str]], early: bytes = b""
    ) -> H2Stream:
        """A CONNECT stream answered 200.  `early`, the app's first bytes,
        is sent with the request (one round trip less than waiting for the
        answer); a retry after a GOAWAY sends it again, as the refused
        stream was never processed (RFC 9113 §6.8)."""
        for attempt in (1, 2):
            conn = await self._connection(key)
            try:
                stream = conn.open_stream(headers, early)
            except StreamReset:  # the connection started draining since
                continue
            try:
                resp = await asyncio.wait_for(stream.response, CONNECT_TIMEOUT)
                break
            except (StreamReset, TimeoutError) as e:
                stream.reset()
                refused = conn.goaway_received is not None and stream.id > conn.goaway_received
                if attempt == 1 and refused:
                    continue  # never processed by the peer (RFC 9113 §6.8): retry anew
                raise HboneError(f"CONNECT to {key.dst[0]} failed: {e or type(e).__name__}") from e
        else:
            raise HboneError(f"CONNECT to {key.dst[0]} failed: every connection draining")
        status = dict(resp).get(":status", "")
        if status != "200":
            # a refusal ends the server's side; ours ends here, or the stream
            # stays half-closed on the pooled connection (a peer that does
            # not reset it after its answer would leak one per refusal)
            stream.reset()
            flag = "DENY" if status == "401" else "CONNECT"
            raise HboneError(f"CONNECT answered {status}", int(status or 0), flag)
        return stream

    async def _connection(self, key: PoolKey) -> H2Conn:
        for c in self.pool.get(key, []):
            if c.available():
                return c
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            for c in self.pool.get(key, []):
                if c.available():
                    return c
            c = await self._dial(key)
            self.pool.setdefault(key, []).append(c)
            c.closed.add_done_callback(functools.partial(self._forget_cb, key, c))
            # a peer's GOAWAY: in-flight streams finish there, new ones go to a fresh connection
            c.on_goaway.append(functools.partial(self._forget, key, c))
            if self._sweeper is None:
                self._sweeper = asyncio.get_running_loop().create_task(self._sweep())
            return c

    async def _dial(self, key: PoolKey) -> H2Conn:
        loop = asyncio.get_running_loop()
        host, port = key.dst
        with netns.entered(key.src_netns):
            sock = tcp_socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
        try:
            await connect(sock, (host, port), CONNECT_TIMEOUT)
            ctx = await self.client_context(key.src_identity)
            conn = H2Conn(client=True, peer={"addr": key.dst})
            conn.peer["tls"] = await tlssock.start_tls(
                loop, conn, sock, ctx, side="client", timeout=CONNECT_TIMEOUT
            )
        except ssl.SSLError as e:
            sock.close()
            raise HboneError(f"TLS with {host}:{port} failed: {e}", flag="TLS_FAILURE") from e
        except (OSError, TimeoutError) as e:
            sock.close()
            raise HboneError(f"connect to {host}:{port} failed: {e}") from e
        assert conn.transport is not None
        sslobj = conn.transport.get_extra_info("ssl_object")
        try:
            got = peer_identity(sslobj)
        except (ssl.SSLError, ValueError) as e:
            conn.close()
            raise HboneError(
                f"{host}:{port} presented no SPIFFE identity: {e}", flag="TLS_FAILURE"
            ) from e
        if got != key.dst_identity:
            conn.close()
            raise HboneError(
                f"{host}:{port} is {got.uri}, expected {key.dst_identity.uri}", flag="TLS_FAILURE"
            )
        await asyncio.wait_for(conn.ready, CONNECT_TIMEOUT)
        conn.peer["identity"] = got
        return conn

    def _forget_cb(self, key: PoolKey, c: H2Conn, _f: asyncio.Future[None]) -> None:
        self._forget(key, c)

    def _forget(self, key: PoolKey, c: H2Conn) -> None:
        conns = self.pool.get(key, [])
        if c in conns:
            conns.remove(c)
        if not conns:
            self.pool.pop(key, None)

    async def _sweep(self) -> None:
        """Close pooled connections idle for IDLE_TIMEOUT (bounded loop per tick)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(IDLE_TIMEOUT / 10, 30))
            now = loop.time()
            for conns in list(self.pool.values()):
                for c in list(conns):
                    if not c.streams and now - c.last_used > IDLE_TIMEOUT:
                        c.close()

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "src": k.src_identity.uri,
                "dst": k.dst_identity.uri,
                "address": format_authority(*k.dst),
                "connections": len(v),
                "streams": sum(len(c.streams) for c in v),
                "tls": sorted({str(c.peer.get("tls")) for c in v}),
            }
            for k, v in list(self.pool.items())  # one step: the admin may read another loop's
        ]

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conns in list(self.pool.values()):
            for c in list(conns):
                with contextlib.suppress(Exception):
                    c.close()
