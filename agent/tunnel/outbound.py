"""15001, outbound: a connection the pod's cgroup/connect hooks redirected.
Decide where it goes (agent.state.outbound.decide, a pure function) and
carry out the request: HBONE to the endpoint's node, HBONE to the
destination's waypoint, same-node delivery, plain TCP passthrough, or a
reset (a waypoint that cannot be reached: never sent around it)."""

from __future__ import annotations

import itertools
import logging
import socket

from agent import netns
from agent.model import family, plain
from agent.state.outbound import Request, Route, decide
from agent.tunnel.conns import Connection
from agent.tunnel.context import (
    PodRef,
    Ports,
    Tunnel,
    authorize,
    err,
    original_dst,
    recheck,
    refuse,
    waypoint_bypass,
)
from agent.tunnel.delivery import deliver, run_bridge, run_relay, undeliver
from agent.tunnel.hbone import CONNECT_TIMEOUT, HboneError, PoolKey, request_headers
from agent.tunnel.relay import connect, tcp_socket

log = logging.getLogger(__name__)

_round_robin = itertools.count()  # endpoint choice across the node's connections


async def outbound(t: Tunnel, pod: PodRef, ports: Ports, app: socket.socket) -> None:
    src = plain(app.getpeername())
    try:
        dst = original_dst(app)
    except OSError as e:
        log.warning("%s: no original destination for %s (%s); closing", pod.key, src, e)
        refuse(app)
        return
    req = decide(
        t.view,
        pod.workload,
        dst,
        tls=t.hbone is not None and pod.identity is not None,
        pick=next(_round_robin),
        require_waypoint=t.require_waypoint,
    )
    common = {
        "spliced": t.splicing,
        "src_workload": pod.key,
        "src_identity": pod.identity.uri if pod.identity else None,
        "dst_workload": req.dst_workload.key if req.dst_workload else None,
        "dst_service": req.dst_service.hostname if req.dst_service else None,
    }
    if req.route is Route.REFUSE:
        c = t.conns.add(pod.key, "outbound", src, dst, "refused", **common)
        refuse(app)
        t.conns.refuse(c, req.reason, "NR")
        return
    if req.route in (Route.LOCAL, Route.HBONE, Route.WAYPOINT):
        c = t.conns.add(
            pod.key,
            "outbound",
            src,
            dst,
            req.route.value,
            dst_identity=req.dst_identity.uri if req.dst_identity else None,
            security="mutual_tls",
            **common,
        )
        if req.route is Route.LOCAL:
            await _same_node(t, pod, app, src, req, c)
        else:
            await _hbone(t, pod, ports, app, src, req, c)
    else:
        c = t.conns.add(pod.key, "outbound", src, dst, "passthrough", **common)
        await _passthrough(t, pod, app, req, c)


async def _hbone(
    t: Tunnel,
    pod: PodRef,
    ports: Ports,
    app: socket.socket,
    src: tuple[str, int],
    req: Request,
    c: Connection,
) -> None:
    assert t.hbone is not None and req.src_identity is not None
    assert req.dst_identity is not None
    w = pod.workload
    headers = request_headers(
        req.authority,
        (pod.ips[0] if pod.ips else src[0], src[1]),
        namespace=w.namespace if w else "",
        workload=w.name if w else "",
        service_host=req.dst_service.hostname if req.dst_service else "",
    )
    # through a waypoint: to its address (Envoy's 15008), :authority the
    # service VIP:port (or the pod's ip:port), its identity expected
    where = req.hbone_address if req.route is Route.WAYPOINT else (req.target[0], ports.hbone)
    key = PoolKey(req.src_identity, req.dst_identity, pod.netns, where)
    try:
        early = already_sent(app)
    except OSError as e:  # reset before it was served: nothing to open
        refuse(app)
        t.conns.refuse(c, f"downstream: {err(e)}", "DC")
        return
    try:
        stream = await t.hbone.open(key, headers, early)
    except HboneError as e:
        refuse(app)
        t.conns.refuse(c, str(e), e.flag)
        return
    t.conns.opened(c)
    await run_bridge(t.conns, t.bypass, c, app, stream, initiator="socket", sent=len(early))


EARLY_DATA_MAX = 16 * 1024  # one TLS record


def already_sent(app: socket.socket) -> bytes:
    """What the app sent before its connection was served, read without
    waiting (a client's request usually is there by now): it goes out with
    the CONNECT, a round trip earlier than after the answer.  b"" if nothing
    is there yet, or on EOF (which the bridge then reads again).  A reset
    raises (recv reports it once: the bridge would then read a clean EOF)."""
    try:
        return app.recv(EARLY_DATA_MAX, socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return b""


async def _passthrough(
    t: Tunnel, pod: PodRef, app: socket.socket, req: Request, c: Connection
) -> None:
    with netns.entered(pod.netns):
        up = tcp_socket(family(req.target[0]))
    up.setblocking(False)
    try:
        await connect(up, req.target, CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as e:
        up.close()
        refuse(app)
        t.conns.refuse(c, f"connect {req.authority}: {err(e)}", "UF")
        return
    t.conns.opened(c)
    await run_relay(t.conns, t.bypass, c, app, up)


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


async def _same_node(
    t: Tunnel,
    pod: PodRef,
    app: socket.socket,
    src: tuple[str, int],
    req: Request,
    out: Connection,
) -> None:
    """Both pods are on this node: the agent captured the source itself, so
    it knows the source identity first-hand.  Authorize as the destination
    would, deliver, relay; no TLS round trip through the node's own veth.
    Both ends are recorded, as two ztunnels would record them."""
    assert req.dst_workload is not None and req.src_identity is not None
    proxy = t.local.get(req.dst_workload.key)
    target = req.target
    if proxy is None:  # enrolled by the state, but its listeners are not up (failed)
        refuse(app)
        t.conns.refuse(out, f"{req.dst_workload.key} is not served on this node", "UF")
        return
    peer = proxy.pod
    src_ip = next(
        (ip for ip in pod.ips if family(ip) == family(target[0])),
        pod.ips[0] if pod.ips else src[0],
    )
    inn = t.conns.add(
        peer.key,
        "inbound",
        (src_ip, src[1]),
        target,
        "local",
        reporter="destination",
        security="mutual_tls",
        src_identity=req.src_identity.uri,
        dst_identity=peer.identity.uri if peer.identity else None,
        src_workload=pod.key,
        dst_workload=peer.key,
        spliced=t.splicing,
    )
    bypass = waypoint_bypass(t, peer, req.src_identity)
    if bypass is not None:
        refuse(app)
        for c in (out, inn):
            t.conns.refuse(c, bypass, "DENY")
        return
    view = t.view
    decision = authorize(view, peer, src_ip, req.src_identity, target)
    if not decision.allowed:
        refuse(app)
        for c in (out, inn):
            t.conns.refuse(c, f"denied: {decision.reason}", "DENY")
        return
    try:
        up, delivered = await deliver(peer, t.bypass, src_ip, target)
    except (OSError, TimeoutError) as e:
        refuse(app)
        for c in (out, inn):
            t.conns.refuse(c, f"deliver to {req.authority}: {err(e)}", "UF")
        return
    inn.delivered_as = delivered
    why = recheck(t, peer, src_ip, req.src_identity, target, view)
    if why is not None:
        up.close()
        undeliver(t.bypass, inn)
        refuse(app)
        for c in (out, inn):
            t.conns.refuse(c, why, "DENY")
        return
    # from here to run_relay's kill, nothing awaits (see recheck)
    for c in (out, inn):
        t.conns.opened(c)
    inn.relay = _Mirror(out)
    inn.kill = lambda: out.kill() if out.kill else None
    try:
        await run_relay(t.conns, t.bypass, out, app, up)
    finally:
        undeliver(t.bypass, inn)
        t.conns.end(inn, out.error)
