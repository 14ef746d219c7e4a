"""What every pod's listeners on a node share, and the small helpers all
connection paths use (refuse, authorize, the original destination)."""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from agent.identity.spiffe import SpiffeId
from agent.model import HBONE_PORT, Workload, norm_ip
from agent.policy import Conn, Decision
from agent.state.state import ProxyState, StateView
from agent.tunnel.conns import ConnTable
from agent.tunnel.hbone import HboneClient
from agent.tunnel.limits import HboneLimits

if TYPE_CHECKING:
    from agent.tunnel.pod import PodProxy

SO_ORIGINAL_DST = 80  # SOL_IP and SOL_IPV6 (IP6T_SO_ORIGINAL_DST) alike


class DeliveryBypass(Protocol):
    """The one kernel map the tunnel writes per connection (the datapath's
    `delivery_bypass()`): the 4-tuple of the agent's delivery connection to
    an app, so the destination pod's sk_lookup lets it through instead of
    steering it back to the agent.  Added before connect, removed when the
    connection ends."""

    def add(self, src: tuple[str, int], dst: tuple[str, int]) -> None: ...
    def remove(self, src: tuple[str, int], dst: tuple[str, int]) -> None: ...


@dataclasses.dataclass(frozen=True)
class PodRef:
    """An enrolled pod as the tunnel sees it."""

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


@dataclasses.dataclass
class Tunnel:
    """Everything a node's pod listeners share.  The state is read, never
    written, from here."""

    state: ProxyState
    bypass: DeliveryBypass
    conns: ConnTable
    hbone: HboneClient | None = None  # None: no identity source, plaintext only
    server_context: Callable[[SpiffeId], Awaitable[ssl.SSLContext]] | None = None
    splicing: bool = False  # sk_msg splices the loopback hops (kernel-side)
    local: dict[str, PodProxy] = dataclasses.field(default_factory=dict)  # this node's pods
    limits: HboneLimits = dataclasses.field(default_factory=HboneLimits)  # inbound 15008
    require_waypoint: bool = True  # agent.requireWaypoint: refuse traffic that skipped one
    # agent.tunnelLoops > 1 (agent/tunnel/loops.py): each extra loop and the
    # Tunnel it serves with (the same state, table, limits and pods; its own
    # HBONE pool and certificate getters); on the main loop's Tunnel only
    loop_tunnels: list[tuple[Any, Tunnel]] = dataclasses.field(default_factory=list)

    @property
    def view(self) -> StateView:
        return self.state.view

    def workload_key_at(self, ip: str) -> str | None:
        w = self.state.view.workload_by_ip(ip)
        return w.key if w else None


AUTHZ_CACHE_MAX = 4096


def authorize(
    view: StateView, pod: PodRef, src_ip: str, ident: SpiffeId | None, dst: tuple[str, int]
) -> Decision:
    """L4 authorization at the destination pod (ztunnel's inbound check).

    Decisions are cached on the view they were made with (`authz_cache`): a
    pure function of (view, source IP, source identity, destination, the
    pod's workload record), so a repeat connection skips parsing and
    evaluation.  A new view (any policy or workload change) has an empty
    cache, and a decision made with an older view can never land in a newer
    view's cache, whichever loop's thread made it (agent/tunnel/loops.py)."""
    if pod.workload is None:
        return Decision(True, None, "no workload record: no policy applies")
    cache = view.authz_cache
    key = (src_ip, ident, dst, pod.key)
    hit = cache.get(key)
    if hit is not None and hit[0] is pod.workload:
        return hit[1]
    decision = view.policies.evaluate(Conn.make(src_ip, ident, dst[0], dst[1], pod.workload))
    if len(cache) >= AUTHZ_CACHE_MAX:
        cache.clear()
    cache[key] = (pod.workload, decision)
    return decision


def waypoint_bypass(t: Tunnel, pod: PodRef, ident: SpiffeId | None) -> str | None:
    """Why this pod refuses mesh traffic from `ident` (None: it does not):
    a workload guarded by a waypoint accepts only its waypoint's identity
    (agent.requireWaypoint; the waypoint is where L7 policy is enforced)."""
    if not t.require_waypoint or pod.workload is None:
        return None
    view = t.view
    guards = view.guarded_by(pod.workload)
    if not guards:
        return None
    allowed = [view.identity_of_waypoint(wp) for wp in guards]
    if ident is not None and ident in allowed:
        return None
    names = ", ".join(f"{wp.key} ({i.uri})" for wp, i in zip(guards, allowed, strict=True))
    who = ident.uri if ident is not None else "a peer without identity"
    return (
        f"waypoint bypass: {pod.key} takes mesh traffic only through waypoint {names}; "
        f"{who} is not it"
    )


def why_denied(
    t: Tunnel,
    pod: PodRef,
    src_ip: str,
    ident: SpiffeId | None,
    dst: tuple[str, int],
    view: StateView,
) -> str | None:
    """Why `view` refuses an inbound connection to `pod` (None: it allows
    it): the waypoint guard, then L4 policy.  What the policy watcher and
    `recheck` ask of a connection already authorized once."""
    bypass = waypoint_bypass(t, pod, ident)
    if bypass is not None:
        return bypass
    decision = authorize(view, pod, src_ip, ident, dst)
    return None if decision.allowed else decision.reason


def recheck(
    t: Tunnel,
    pod: PodRef,
    src_ip: str,
    ident: SpiffeId | None,
    dst: tuple[str, int],
    view: StateView,
    plaintext: bool = False,
) -> str | None:
    """Why a connection authorized with `view` may no longer go live (None:
    it may).  A path calls this after its last await before the connection
    is live, in the same step that makes it live (sets `Connection.kill`):
    a policy change while it was connecting to the app swapped the view and
    revalidated the live connections, and this one was not live yet.  The
    same checks as `watcher.revalidate`, with the view now in force, and for
    `plaintext` (15006) PeerAuthentication's as well."""
    now = t.view
    if now is view:
        return None
    current = t.local.get(pod.key)
    if current is not None:
        pod = current.pod  # its workload record as the new state has it
    if (
        plaintext
        and pod.workload is not None
        and not now.policies.plaintext_allowed(pod.workload, dst[1])
    ):
        return "plaintext refused after a policy change: PeerAuthentication STRICT"
    why = why_denied(t, pod, src_ip, ident, dst, now)
    return None if why is None else f"denied after a policy change: {why}"


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """SO_ORIGINAL_DST of a redirected connection, answered by the datapath's
    cgroup/getsockopt program (or by netfilter where a node has it)."""
    if sock.family == socket.AF_INET:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port, addr = struct.unpack_from("!H4s", raw, 2)
        return socket.inet_ntop(socket.AF_INET, addr), port
    raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    port = struct.unpack_from("!H", raw, 2)[0]
    return norm_ip(str(ipaddress.IPv6Address(raw[8:24]))), port


def err(e: BaseException) -> str:
    """An error for a log line: TimeoutError and friends have no message."""
    return str(e) or type(e).__name__


def refuse(sock: socket.socket) -> None:
    """Close with RST, as a refused connection looks to the client."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
