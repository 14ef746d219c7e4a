"""15006, inbound plaintext: a connection to an enrolled pod that did not
come through HBONE (sk_lookup steered it here).  Refused under STRICT
PeerAuthentication; under PERMISSIVE authorized without an identity.
Refused for a pod guarded by a waypoint (agent.requireWaypoint): plaintext
never comes from the waypoint."""

from __future__ import annotations

import socket

from agent.model import plain
from agent.tunnel.context import (
    PodRef,
    Tunnel,
    authorize,
    err,
    recheck,
    refuse,
    waypoint_bypass,
)
from agent.tunnel.delivery import deliver, run_relay, undeliver


async def inbound_plain(t: Tunnel, pod: PodRef, client: socket.socket) -> None:
    src = plain(client.getpeername())
    dst = plain(client.getsockname())  # sk_lookup kept the dialled address
    view = t.view
    c = t.conns.add(
        pod.key,
        "inbound",
        src,
        dst,
        "plaintext",
        reporter="destination",
        dst_workload=pod.key,
        dst_identity=pod.identity.uri if pod.identity else None,
        src_workload=t.workload_key_at(src[0]),
    )
    if pod.workload is not None and not view.policies.plaintext_allowed(pod.workload, dst[1]):
        refuse(client)
        t.conns.refuse(c, "plaintext refused: PeerAuthentication STRICT", "DENY")
        return
    bypass = waypoint_bypass(t, pod, None)
    if bypass is not None:
        refuse(client)
        t.conns.refuse(c, bypass, "DENY")
        return
    decision = authorize(view, pod, src[0], None, dst)
    if not decision.allowed:
        refuse(client)
        t.conns.refuse(c, f"denied: {decision.reason}", "DENY")
        return
    try:
        app, local = await deliver(pod, t.bypass, src[0], dst)
    except (OSError, TimeoutError) as e:
        refuse(client)
        t.conns.refuse(c, f"deliver to {dst[0]}:{dst[1]}: {err(e)}", "UF")
        return
    c.delivered_as = local
    why = recheck(t, pod, src[0], None, dst, view, plaintext=True)
    if why is not None:
        app.close()
        undeliver(t.bypass, c)
        refuse(client)
        t.conns.refuse(c, why, "DENY")
        return
    # from here to run_relay's kill, nothing awaits (see recheck)
    t.conns.opened(c)
    await run_relay(t.conns, t.bypass, c, client, app)
