"""The outbound decision: where a captured connection goes, as a plain value.

A pure function of the state view, the source workload and the original
destination (ztunnel's `build_request()` in proxy/outbound.rs): no sockets,
no clock, no randomness (the endpoint index comes in as `pick`), so table
tests cover every case without root.  The tunnel executes the request.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress

from agent.identity.spiffe import SpiffeId
from agent.model import (
    HBONE_PORT,
    Service,
    ServicePort,
    Workload,
    format_authority,
    norm_ip,
    same_family,
)
from agent.state.state import StateView


class Route(enum.Enum):
    HBONE = "hbone"  # mTLS CONNECT to the endpoint's node (its pod's 15008)
    LOCAL = "local"  # the endpoint is an enrolled pod on this node: authorize, deliver
    PASSTHROUGH = "passthrough"  # outside the mesh (or no identity): plain TCP
    # WAYPOINT: to come (HBONE to the destination's waypoint, service authority)


@dataclasses.dataclass(frozen=True)
class Request:
    route: Route
    original: tuple[str, int]  # what the app dialled
    target: tuple[str, int]  # the endpoint to reach (pod IP:targetPort, or the original)
    reason: str  # why this route, for logs and tests
    src_identity: SpiffeId | None = None
    dst_identity: SpiffeId | None = None  # expected peer identity (HBONE, LOCAL)
    dst_workload: Workload | None = None
    dst_service: Service | None = None

    @property
    def authority(self) -> str:
        """HBONE's `:authority`: the endpoint's ip:port."""
        return format_authority(*self.target)

    @property
    def hbone_address(self) -> tuple[str, int]:
        return (self.target[0], HBONE_PORT)


def decide(
    view: StateView,
    source: Workload | None,
    dst: tuple[str, int],
    *,
    tls: bool,
    pick: int = 0,
) -> Request:
    """source: the enrolled pod that connected (None: unknown, passthrough);
    tls: this node can originate mTLS (it has a certificate source);
    pick: which endpoint of a service (the caller's round robin)."""
    try:
        ip = norm_ip(dst[0])
    except ValueError:
        return Request(Route.PASSTHROUGH, dst, dst, "destination is no IP address")
    original = (ip, dst[1])
    svc = view.vips.get(original)
    if svc is not None:
        service, sport = svc
        target, w, why = _endpoint(view, service, sport, ip, pick)
        if w is None:
            return Request(Route.PASSTHROUGH, original, target, why, dst_service=service)
        return _to_workload(view, source, original, target, w, service, tls)
    w = view.workload_by_ip(ip)
    if w is None:
        return Request(Route.PASSTHROUGH, original, original, "no workload or service at " + ip)
    return _to_workload(view, source, original, original, w, None, tls)


def _endpoint(
    view: StateView, service: Service, sport: ServicePort, vip: str, pick: int
) -> tuple[tuple[str, int], Workload | None, str]:
    """A service VIP load-balances over its endpoints of the VIP's family."""
    if service.endpoints is not None:  # EndpointSlices (Kubernetes)
        want = ipaddress.ip_address(vip).version
        ready = [e for e in service.endpoints if ipaddress.ip_address(e.address).version == want]
        if not ready:
            return (vip, sport.port), None, f"service {service.key} has no ready endpoint"
        ep = ready[pick % len(ready)]
        target = (norm_ip(ep.address), ep.ports.get(sport.name, sport.target_port))
        w = view.workload_by_ip(ep.address)
        if w is None:
            return target, None, f"endpoint {ep.address} of {service.key} is no known workload"
        return target, w, ""
    selected = view.endpoints(service)
    if not selected:
        return (vip, sport.port), None, f"service {service.key} selects no workload"
    chosen = selected[pick % len(selected)]
    return (norm_ip(same_family(chosen.addresses, vip)), sport.target_port), chosen, ""


def _to_workload(
    view: StateView,
    source: Workload | None,
    original: tuple[str, int],
    target: tuple[str, int],
    w: Workload,
    service: Service | None,
    tls: bool,
) -> Request:
    def req(route: Route, why: str, mesh: bool = False) -> Request:
        return Request(
            route,
            original,
            target,
            why,
            src_identity=view.identity_of(source) if mesh and source else None,
            dst_identity=view.identity_of(w) if mesh else None,
            dst_workload=w,
            dst_service=service,
        )

    if not view.captured(w):
        return req(Route.PASSTHROUGH, f"{w.key} is not in the mesh")
    if target[1] in w.exclude_inbound_ports:
        return req(Route.PASSTHROUGH, f"{w.key} excludes port {target[1]} from inbound capture")
    if source is None:
        return req(Route.PASSTHROUGH, "source has no identity")
    if w.node == view.node:
        return req(Route.LOCAL, f"{w.key} is on this node", mesh=True)
    if not tls:
        return req(
            Route.PASSTHROUGH, "this node has no identity source (no caDir/caAddress): plaintext"
        )
    return req(Route.HBONE, f"{w.key} is in the mesh on node {w.node}", mesh=True)
