"""15008, inbound HBONE: mTLS as the destination pod's identity, then each
CONNECT stream is checked (agent.tunnel.hbone.check_request), authorized
with the peer's SPIFFE ID (L4 policy at the destination) and delivered to
the app.  A pod guarded by a waypoint takes CONNECTs only from its
waypoint's identity (agent.requireWaypoint)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from typing import Any

from agent.identity.spiffe import SpiffeId
from agent.identity.tls import peer_identity
from agent.model import plain
from agent.tunnel import limits, tlssock
from agent.tunnel.context import (
    PodRef,
    Tunnel,
    authorize,
    err,
    recheck,
    refuse,
    waypoint_bypass,
)
from agent.tunnel.delivery import deliver, run_bridge, undeliver
from agent.tunnel.h2conn import H2Conn, H2Stream
from agent.tunnel.hbone import HboneError, check_request
from agent.tunnel.limits import HboneLimits


class AdmissionSlot:
    """One admitted 15008 connection's place under HboneLimits, given back
    once (whichever of its ends comes first)."""

    def __init__(self, limits: HboneLimits, pod: str, source: str) -> None:
        self._limits = limits
        self._pod = pod
        self._source = source
        self._released = False
        self.taken = False  # InboundHbone.serve owns it (and releases it)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._limits.release(self._pod, self._source)


class InboundHbone:
    """The HBONE server of one pod."""

    def __init__(self, t: Tunnel, pod: PodRef) -> None:
        assert pod.identity is not None
        self.t = t
        self.pod = pod
        self.identity: SpiffeId = pod.identity

    def admit(self, sock: socket.socket) -> AdmissionSlot | None:
        """Take the connection's place under the admission limits, on the
        loop that accepted it, before it is placed on a loop (so a flood
        is refused at once, never queued for another loop's thread); None:
        refused (counted, logged, reset)."""
        source = plain(sock.getpeername())[0]
        if not self.t.limits.admit(self.pod.key, source):
            refuse(sock)
            return None
        return AdmissionSlot(self.t.limits, self.pod.key, source)

    async def serve(self, sock: socket.socket, slot: AdmissionSlot) -> None:
        """An admitted connection: TLS as the pod's identity, then HTTP/2;
        `slot` is released when the connection ends (or fails to start)."""
        slot.taken = True
        t = self.t
        server_context = t.server_context
        assert server_context is not None
        loop = asyncio.get_running_loop()
        peer = plain(sock.getpeername())
        local = plain(sock.getsockname())
        state: dict[str, Any] = {"addr": peer, "local": local}
        release = slot.release
        try:
            ctx = await server_context(self.identity)
            conn = H2Conn(
                client=False,
                on_request=self._on_connect,
                peer=state,
                idle_timeout=limits.IDLE_TIMEOUT,
            )
            conn.peer["tls"] = await tlssock.start_tls(
                loop, conn, sock, ctx, side="server", timeout=limits.HANDSHAKE_TIMEOUT
            )
            conn.closed.add_done_callback(lambda _f: release())
        except BaseException as e:
            release()
            if not isinstance(e, ssl.SSLError | OSError | TimeoutError | ConnectionError):
                raise
            self._refuse_tls(peer, local, f"TLS handshake failed: {err(e)}")
            sock.close()
            return
        assert conn.transport is not None
        try:
            conn.peer["identity"] = self._peer_identity(conn)
        except (ssl.SSLError, ValueError) as e:
            self._refuse_tls(peer, local, f"client certificate refused: {err(e)}")
            conn.close()

    def _refuse_tls(self, peer: tuple[str, int], local: tuple[str, int], why: str) -> None:
        c = self.t.conns.add(
            self.pod.key,
            "inbound",
            peer,
            local,
            "hbone",
            reporter="destination",
            dst_workload=self.pod.key,
            dst_identity=self.identity.uri,
        )
        self.t.conns.refuse(c, why, "TLS_FAILURE")

    def _peer_identity(self, conn: H2Conn) -> SpiffeId:
        """The client's SPIFFE ID, which must be in our trust domain."""
        assert conn.transport is not None
        ident = peer_identity(conn.transport.get_extra_info("ssl_object"))
        if ident.trust_domain != self.identity.trust_domain:
            raise ValueError(f"{ident.uri} is not in trust domain {self.identity.trust_domain}")
        return ident

    async def _on_connect(self, conn: H2Conn, stream: H2Stream) -> None:
        """One CONNECT request on an authenticated HBONE connection."""
        t = self.t
        peer: tuple[str, int] = conn.peer["addr"]
        local: tuple[str, int] = conn.peer["local"]
        ident: SpiffeId | None = conn.peer.get("identity")
        if ident is None and conn.transport is not None:
            # a request can arrive before accept() resumes after the handshake
            with contextlib.suppress(ssl.SSLError, ValueError):
                ident = conn.peer["identity"] = self._peer_identity(conn)
        c = t.conns.add(
            self.pod.key,
            "inbound",
            peer,
            local,
            "hbone",
            reporter="destination",
            security="mutual_tls",
            src_identity=ident.uri if ident else None,
            dst_identity=self.identity.uri,
            dst_workload=self.pod.key,
            src_workload=t.workload_key_at(peer[0]),
        )
        try:
            dst = check_request(stream.request_headers, local[0])
        except HboneError as e:
            conn.respond(stream, e.status or 400)
            t.conns.refuse(c, f"bad request: {err(e)}", "-")
            return
        c.dst = dst
        if ident is None:
            conn.respond(stream, 401)
            t.conns.refuse(c, "no peer identity", "DENY")
            return
        bypass = waypoint_bypass(t, self.pod, ident)
        if bypass is not None:
            conn.respond(stream, 401)
            t.conns.refuse(c, bypass, "DENY")
            return
        view = t.view
        decision = authorize(view, self.pod, peer[0], ident, dst)
        if not decision.allowed:
            conn.respond(stream, 401)
            t.conns.refuse(c, f"denied: {decision.reason}", "DENY")
            return
        try:
            app, delivered = await deliver(self.pod, t.bypass, peer[0], dst)
        except (OSError, TimeoutError) as e:
            conn.respond(stream, 503)
            t.conns.refuse(c, f"deliver to {dst[0]}:{dst[1]}: {err(e)}", "UF")
            return
        c.delivered_as = delivered
        if stream.closed:  # the client went away while we were connecting
            app.close()
            undeliver(t.bypass, c)
            t.conns.opened(c)
            t.conns.end(c, "client went away during delivery", "DC")
            return
        why = recheck(t, self.pod, peer[0], ident, dst, view)
        if why is not None:
            app.close()
            undeliver(t.bypass, c)
            conn.respond(stream, 401)
            t.conns.refuse(c, why, "DENY")
            return
        # from here to run_bridge's kill, nothing awaits (see recheck)
        conn.respond(stream, 200)
        t.conns.opened(c)
        await run_bridge(t.conns, t.bypass, c, app, stream, initiator="stream")
