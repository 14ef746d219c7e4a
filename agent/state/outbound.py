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
    Waypoint,
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
    # HBONE to the destination's waypoint (its address:15008), `:authority` =
    # what the app dialled (service VIP:port, or pod ip:port)
    WAYPOINT = "waypoint"
    # fail closed: the connection is reset, the reason recorded (traffic that
    # must go through a waypoint is never sent around it)
    REFUSE = "refuse"


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
    waypoint: Waypoint | None = None  # WAYPOINT (and REFUSE because of one)
    via: str | None = None  # WAYPOINT: the waypoint address chosen

    @property
    def authority(self) -> str:
        """HBONE's `:authority`: the endpoint's ip:port; through a waypoint,
        what the app dialled (the service VIP:port or the pod's ip:port)."""
        return format_authority(*self.target)

    @property
    def hbone_address(self) -> tuple[str, int]:
        """Where the HBONE connection goes: the waypoint, else the endpoint."""
        return (self.via or self.target[0], HBONE_PORT)


def decide(
    view: StateView,
    source: Workload | None,
    dst: tuple[str, int],
    *,
    tls: bool,
    pick: int = 0,
    require_waypoint: bool = True,
) -> Request:
    """source: the enrolled pod that connected (None: unknown, passthrough);
    tls: this node can originate mTLS (it has a certificate source);
    pick: which endpoint of a service (the caller's round robin);
    require_waypoint: agent.requireWaypoint (see below)."""
    try:
        ip = norm_ip(dst[0])
    except ValueError:
        return Request(Route.PASSTHROUGH, dst, dst, "destination is no IP address")
    original = (ip, dst[1])
    svc = view.vips.get(original)
    if svc is not None:
        service, sport = svc
        wp = view.service_waypoint.get(service.key)
        if wp is not None:
            req = _via_waypoint(view, source, original, original, wp, tls, pick, None, service)
            if req is not None:
                return req
        target, w, why = _endpoint(view, service, sport, ip, pick)
        if w is None:
            req = Request(Route.PASSTHROUGH, original, target, why, dst_service=service)
        else:
            # The endpoint's own waypoint (for workload traffic), authority the
            # endpoint's ip:port.  ztunnel sends service-addressed traffic
            # direct here; with requireWaypoint the endpoint takes traffic only
            # from its waypoint, so it goes through it (never refused for
            # skipping a waypoint it was never sent to).
            wpw = view.workload_waypoint.get(w.key) if require_waypoint else None
            if wpw is not None and target[1] not in w.exclude_inbound_ports:
                req_w = _via_waypoint(view, source, original, target, wpw, tls, pick, w, service)
                if req_w is not None:
                    return req_w
            req = _to_workload(view, source, original, target, w, service, tls)
        return _note_missing(view, req, f"service {service.key}")
    w = view.workload_by_ip(ip)
    if w is None:
        return Request(Route.PASSTHROUGH, original, original, "no workload or service at " + ip)
    wp = view.workload_waypoint.get(w.key)
    if wp is not None and original[1] not in w.exclude_inbound_ports:
        req = _via_waypoint(view, source, original, original, wp, tls, pick, w, None)
        if req is not None:
            return req
    return _note_missing(
        view, _to_workload(view, source, original, original, w, None, tls), f"workload {w.key}"
    )


def _note_missing(view: StateView, req: Request, what: str) -> Request:
    """A use-waypoint label naming a Gateway that does not exist: the
    traffic goes direct (Istio does the same), and the reason says so."""
    ref = view.missing_waypoint.get(what)
    if ref is None:
        return req
    return dataclasses.replace(
        req, reason=f"{req.reason}; {what} names no such waypoint {ref}: direct"
    )


def _via_waypoint(
    view: StateView,
    source: Workload | None,
    original: tuple[str, int],
    target: tuple[str, int],
    wp: Waypoint,
    tls: bool,
    pick: int,
    w: Workload | None,
    service: Service | None,
) -> Request | None:
    """To the destination's waypoint, `target` as the authority (the service
    VIP:port, or the pod's ip:port); None: this source does not go through
    it (unknown source, or the source is a waypoint's own pod)."""
    if source is None or view.is_waypoint(source):
        return None
    what = f"workload {w.key}" if w else f"service {service.key if service else '?'}"

    def req(route: Route, why: str, via: str | None = None) -> Request:
        return Request(
            route,
            original,
            target,
            why,
            src_identity=view.identity_of(source) if route is Route.WAYPOINT else None,
            dst_identity=view.identity_of_waypoint(wp) if route is Route.WAYPOINT else None,
            dst_workload=w,
            dst_service=service,
            waypoint=wp,
            via=via,
        )

    if not tls:
        return req(
            Route.REFUSE,
            f"{what} uses waypoint {wp.key}, and this node has no identity source "
            "(no caDir/caAddress) to reach it: refused, never sent around it",
        )
    if not wp.addresses:
        return req(
            Route.REFUSE,
            f"{what} uses waypoint {wp.key}, which has no address yet: refused, "
            "never sent around it",
        )
    want = ipaddress.ip_address(target[0]).version
    addrs = [a for a in wp.addresses if ipaddress.ip_address(a).version == want]
    if not addrs:
        return req(
            Route.REFUSE,
            f"{what} uses waypoint {wp.key}, which has no IPv{want} address: refused",
        )
    via = norm_ip(addrs[pick % len(addrs)])
    return req(Route.WAYPOINT, f"{what} uses waypoint {wp.key} at {via}", via)


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
