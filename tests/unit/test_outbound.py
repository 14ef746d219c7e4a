"""The outbound decision as a table, without root or sockets (ztunnel keeps
the same kind of table for build_request()): given the state, the source pod
and what the app dialled, where does the connection go?"""

from __future__ import annotations

from typing import Any

import pytest

from agent.model import Endpoint, Service, ServicePort, Snapshot, Waypoint, Workload
from agent.state.outbound import Request, Route, decide
from agent.state.state import ProxyState

TD = "cluster.local"
AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def wl(name: str, ns: str, node: str, *addrs: str, **kw: Any) -> Workload:
    labels = kw.pop("labels", {"app": name})
    return Workload(name, ns, kw.pop("sa", name), node, addrs, labels, **kw)


SRC = wl("client", "shop", "n1", "10.1.0.2", "fd00:1::2")
WORKLOADS = (
    SRC,
    wl("local-db", "shop", "n1", "10.1.0.3", "fd00:1::3", sa="db"),
    wl("remote-a", "shop", "n2", "10.2.0.4", "fd00:2::4", labels={"app": "backend"}),
    wl("remote-b", "shop", "n3", "10.3.0.5", "fd00:3::5", labels={"app": "backend"}),
    wl("legacy", "legacy", "n2", "10.2.0.9"),
    wl("opted-out", "shop", "n2", "10.2.0.7", labels={"istio.io/dataplane-mode": "none"}),
    wl("opted-in", "legacy", "n2", "10.2.0.8", labels=AMBIENT),
    wl("excl", "shop", "n2", "10.2.0.6", exclude_inbound_ports=(9090,)),
)
SERVICES = (
    Service(
        "backend",
        "shop",
        ("10.96.0.10", "fd00:96::10"),
        (ServicePort(80, 8080),),
        {"app": "backend"},
    ),
    Service("empty", "shop", ("10.96.0.11",), (ServicePort(80, 8080),), {"app": "nobody"}),
    Service(
        "sliced",
        "shop",
        ("10.96.0.12", "fd00:96::12"),
        (ServicePort(443, 8443, "https"),),
        {},
        endpoints=(
            Endpoint("10.2.0.4", {"https": 9443}),
            Endpoint("10.9.9.9", {"https": 9443}),  # no known workload
        ),
    ),
    Service("dbsvc", "shop", ("10.96.0.13",), (ServicePort(5432, 5432),), {"app": "local-db"}),
)
SNAP = Snapshot(
    "n1",
    {"shop": dict(AMBIENT), "legacy": {}},
    WORKLOADS,
    SERVICES,
)
VIEW = ProxyState("n1", TD)
VIEW.apply(SNAP)


def sid(ns: str, sa: str) -> str:
    return f"spiffe://{TD}/ns/{ns}/sa/{sa}"


# (case, dst, pick, tls, route, target, dst identity, reason contains)
TABLE: list[tuple[str, tuple[str, int], int, bool, Route, tuple[str, int], str | None, str]] = [
    ("remote pod ip", ("10.2.0.4", 8080), 0, True, Route.HBONE, ("10.2.0.4", 8080),
     sid("shop", "remote-a"), "node n2"),
    ("remote pod ipv6", ("fd00:2::4", 8080), 0, True, Route.HBONE, ("fd00:2::4", 8080),
     sid("shop", "remote-a"), "mesh"),
    ("same-node pod", ("10.1.0.3", 5432), 0, True, Route.LOCAL, ("10.1.0.3", 5432),
     sid("shop", "db"), "this node"),
    ("same-node without tls is still local", ("10.1.0.3", 5432), 0, False, Route.LOCAL,
     ("10.1.0.3", 5432), sid("shop", "db"), "this node"),
    ("remote without tls", ("10.2.0.4", 8080), 0, False, Route.PASSTHROUGH,
     ("10.2.0.4", 8080), None, "no identity source"),
    ("namespace not enrolled", ("10.2.0.9", 80), 0, True, Route.PASSTHROUGH,
     ("10.2.0.9", 80), None, "not in the mesh"),
    ("pod opted out", ("10.2.0.7", 80), 0, True, Route.PASSTHROUGH, ("10.2.0.7", 80),
     None, "not in the mesh"),
    ("pod opted in, namespace not", ("10.2.0.8", 80), 0, True, Route.HBONE,
     ("10.2.0.8", 80), sid("legacy", "opted-in"), "mesh"),
    ("unknown address", ("192.0.2.1", 443), 0, True, Route.PASSTHROUGH, ("192.0.2.1", 443),
     None, "no workload or service"),
    ("excluded inbound port", ("10.2.0.6", 9090), 0, True, Route.PASSTHROUGH,
     ("10.2.0.6", 9090), None, "excludes port 9090"),
    ("other port of that pod", ("10.2.0.6", 9091), 0, True, Route.HBONE, ("10.2.0.6", 9091),
     sid("shop", "excl"), "mesh"),
    ("vip, first endpoint", ("10.96.0.10", 80), 0, True, Route.HBONE, ("10.2.0.4", 8080),
     sid("shop", "remote-a"), "mesh"),
    ("vip, second endpoint", ("10.96.0.10", 80), 1, True, Route.HBONE, ("10.3.0.5", 8080),
     sid("shop", "remote-b"), "node n3"),
    ("vip ipv6 picks the ipv6 endpoint", ("fd00:96::10", 80), 1, True, Route.HBONE,
     ("fd00:3::5", 8080), sid("shop", "remote-b"), "mesh"),
    ("vip on an unserved port", ("10.96.0.10", 81), 0, True, Route.PASSTHROUGH,
     ("10.96.0.10", 81), None, "no workload or service"),
    ("vip selecting nothing", ("10.96.0.11", 80), 0, True, Route.PASSTHROUGH,
     ("10.96.0.11", 80), None, "selects no workload"),
    ("slices, named port", ("10.96.0.12", 443), 0, True, Route.HBONE, ("10.2.0.4", 9443),
     sid("shop", "remote-a"), "mesh"),
    ("slices, endpoint outside the mesh", ("10.96.0.12", 443), 1, True, Route.PASSTHROUGH,
     ("10.9.9.9", 9443), None, "no known workload"),
    ("slices, no endpoint of the vip's family", ("fd00:96::12", 443), 0, True,
     Route.PASSTHROUGH, ("fd00:96::12", 443), None, "no ready endpoint"),
    ("vip of a same-node pod", ("10.96.0.13", 5432), 0, True, Route.LOCAL,
     ("10.1.0.3", 5432), sid("shop", "db"), "this node"),
    ("ipv4-mapped destination", ("::ffff:10.2.0.4", 8080), 0, True, Route.HBONE,
     ("10.2.0.4", 8080), sid("shop", "remote-a"), "mesh"),
    ("not an address", ("nonsense", 1), 0, True, Route.PASSTHROUGH, ("nonsense", 1), None,
     "no IP address"),
]  # fmt: skip


@pytest.mark.parametrize(
    "case,dst,pick,tls,route,target,ident,why", TABLE, ids=[row[0] for row in TABLE]
)
def test_decision(
    case: str,
    dst: tuple[str, int],
    pick: int,
    tls: bool,
    route: Route,
    target: tuple[str, int],
    ident: str | None,
    why: str,
) -> None:
    req = decide(VIEW.view, SRC, dst, tls=tls, pick=pick)
    assert req.route is route, req.reason
    assert req.target == target
    assert (req.dst_identity.uri if req.dst_identity else None) == ident
    assert why in req.reason
    if route is not Route.PASSTHROUGH:
        assert req.src_identity is not None and req.src_identity.uri == sid("shop", "client")


def test_unknown_source_never_gets_an_identity() -> None:
    req = decide(VIEW.view, None, ("10.2.0.4", 8080), tls=True)
    assert req.route is Route.PASSTHROUGH and req.src_identity is None
    assert "source has no identity" in req.reason


def test_hbone_request_names_authority_port_and_service() -> None:
    req = decide(VIEW.view, SRC, ("fd00:96::10", 80), tls=True, pick=0)
    assert req.authority == "[fd00:2::4]:8080"
    assert req.hbone_address == ("fd00:2::4", 15008)
    assert req.dst_service is not None and req.dst_service.hostname == (
        "backend.shop.svc.cluster.local"
    )
    assert req.original == ("fd00:96::10", 80)


def test_round_robin_covers_every_endpoint() -> None:
    seen = {decide(VIEW.view, SRC, ("10.96.0.10", 80), tls=True, pick=i).target for i in range(4)}
    assert seen == {("10.2.0.4", 8080), ("10.3.0.5", 8080)}


def test_decision_follows_a_new_snapshot() -> None:
    """The decision reads whatever view it is given: unenrolling the
    namespace turns HBONE into passthrough, with no other state."""
    state = ProxyState("n1", TD)
    state.apply(SNAP)
    before = decide(state.view, SRC, ("10.2.0.4", 8080), tls=True)
    state.apply(Snapshot("n1", {"shop": {}}, WORKLOADS, SERVICES))
    after = decide(state.view, SRC, ("10.2.0.4", 8080), tls=True)
    assert (before.route, after.route) == (Route.HBONE, Route.PASSTHROUGH)


def test_request_is_a_plain_value() -> None:
    a = decide(VIEW.view, SRC, ("10.2.0.4", 8080), tls=True)
    b = decide(VIEW.view, SRC, ("10.2.0.4", 8080), tls=True)
    assert a == b and isinstance(a, Request)


# -- waypoints ------------------------------------------------------------------

UW = "istio.io/use-waypoint"


def uw(name: str, app: str, **extra: str) -> dict[str, str]:
    return {UW: name, "app": app, **extra}


WAYPOINTS = (
    Waypoint("wp", "shop", ("10.5.0.1", "10.5.0.2", "fd00:5::1"), "n3", "wp-sa"),
    Waypoint("wp-workload", "shop", ("10.5.0.3",), "n3", traffic_for="workload"),
    Waypoint("wp-all", "shop", ("10.5.0.4", "fd00:5::4"), "n3", traffic_for="all"),
    Waypoint("wp-none", "shop", ("10.5.0.5",), "n3", traffic_for="none"),
    Waypoint("wp-noaddr", "shop", (), "n3"),
    Waypoint("wp-v4only", "shop", ("10.5.0.6",), "n3"),
    Waypoint("shared", "infra", ("10.6.0.1",), "n3", "shared-sa"),
    Waypoint("ns-wp", "nsd", ("10.7.0.1",), "n3", traffic_for="all"),
)
WP_POD = wl(
    "wp-7f9",
    "shop",
    "n1",
    "10.5.0.1",
    sa="wp-sa",
    labels={"gateway.networking.k8s.io/gateway-name": "wp", "istio.io/dataplane-mode": "none"},
)
WP_WORKLOADS = (
    SRC,
    WP_POD,
    wl("web", "shop", "n2", "10.2.0.10", "fd00:2::10"),
    wl("local-web", "shop", "n1", "10.1.0.10"),
    wl("wl-pod", "shop", "n2", "10.2.0.11", labels=uw("wp-workload", "wl-pod")),
    wl("all-pod", "shop", "n2", "10.2.0.12", labels=uw("wp-all", "all-pod")),
    wl("none-pod", "shop", "n2", "10.2.0.13", labels=uw("wp-none", "none-pod")),
    wl("svc-only-pod", "shop", "n2", "10.2.0.14", labels=uw("wp", "svc-only-pod")),
    wl("ghost-pod", "shop", "n2", "10.2.0.15", labels=uw("ghost", "ghost-pod")),
    wl("local-wl", "shop", "n1", "10.1.0.16", labels=uw("wp-workload", "local-wl")),
    wl("nsd-pod", "nsd", "n2", "10.2.0.17"),
    wl("nsd-optout", "nsd", "n2", "10.2.0.18", labels=uw("none", "nsd-optout")),
    wl("backend", "shop", "n2", "10.2.0.19"),
)


def svc(name: str, vips: tuple[str, ...], app: str, ns: str = "shop", **labels: str) -> Service:
    return Service(name, ns, vips, (ServicePort(80, 8080),), {"app": app}, labels=dict(labels))


WP_SERVICES = (
    svc("websvc", ("10.96.1.1", "fd00:96::1:1"), "web", **{UW: "wp"}),
    svc("v6only", ("fd00:96::1:2",), "backend", **{UW: "wp-v4only"}),
    svc("wl-svc", ("10.96.1.3",), "backend", **{UW: "wp-workload"}),
    svc("all-svc", ("10.96.1.4",), "backend", **{UW: "wp-all"}),
    svc("none-svc", ("10.96.1.5",), "backend", **{UW: "wp-none"}),
    svc("xns", ("10.96.1.6",), "backend",
        **{UW: "shared", "istio.io/use-waypoint-namespace": "infra"}),
    svc("ghost-svc", ("10.96.1.7",), "backend", **{UW: "ghost"}),
    svc("noaddr", ("10.96.1.8",), "backend", **{UW: "wp-noaddr"}),
    svc("local-svc", ("10.96.1.9",), "local-web", **{UW: "wp"}),
    svc("nsd-svc", ("10.96.1.10",), "nsd-pod", ns="nsd"),
    # opted out, and so is its pod (else the pod's own, namespace's, waypoint applies)
    svc("nsd-optout", ("10.96.1.11",), "nsd-optout", ns="nsd", **{UW: "none"}),
    svc("plain", ("10.96.1.12",), "backend"),
    svc("to-wl-pod", ("10.96.1.13",), "wl-pod"),
)  # fmt: skip
WP_SNAP = Snapshot(
    "n1",
    {"shop": dict(AMBIENT), "nsd": {**AMBIENT, UW: "ns-wp"}, "infra": {}},
    WP_WORKLOADS,
    WP_SERVICES,
    waypoints=WAYPOINTS,
)
WP_STATE = ProxyState("n1", TD)
WP_STATE.apply(WP_SNAP)

# (case, dst, pick, tls, route, authority, hbone address | None, dst identity, reason contains)
WP_TABLE: list[
    tuple[str, tuple[str, int], int, bool, Route, str, tuple[str, int] | None, str | None, str]
] = [
    ("service via its waypoint", ("10.96.1.1", 80), 0, True, Route.WAYPOINT, "10.96.1.1:80",
     ("10.5.0.1", 15008), sid("shop", "wp-sa"), "service shop/websvc uses waypoint shop/wp"),
    ("service picks among waypoint addresses", ("10.96.1.1", 80), 1, True, Route.WAYPOINT,
     "10.96.1.1:80", ("10.5.0.2", 15008), sid("shop", "wp-sa"), "at 10.5.0.2"),
    ("ipv6 vip goes to the waypoint's ipv6 address", ("fd00:96::1:1", 80), 1, True,
     Route.WAYPOINT, "[fd00:96::1:1]:80", ("fd00:5::1", 15008), sid("shop", "wp-sa"), "wp"),
    ("ipv6 vip, waypoint without ipv6: refused", ("fd00:96::1:2", 80), 0, True, Route.REFUSE,
     "[fd00:96::1:2]:80", None, None, "no IPv6 address"),
    ("pod via its waypoint (for workload)", ("10.2.0.11", 8080), 0, True, Route.WAYPOINT,
     "10.2.0.11:8080", ("10.5.0.3", 15008), sid("shop", "wp-workload"),
     "workload shop/wl-pod uses waypoint shop/wp-workload"),
    ("pod via its waypoint (for all)", ("10.2.0.12", 8080), 0, True, Route.WAYPOINT,
     "10.2.0.12:8080", ("10.5.0.4", 15008), sid("shop", "wp-all"), "wp-all"),
    ("pod, waypoint for none: direct", ("10.2.0.13", 8080), 0, True, Route.HBONE,
     "10.2.0.13:8080", ("10.2.0.13", 15008), sid("shop", "none-pod"), "mesh"),
    ("pod, waypoint for service only: direct", ("10.2.0.14", 8080), 0, True, Route.HBONE,
     "10.2.0.14:8080", ("10.2.0.14", 15008), sid("shop", "svc-only-pod"), "mesh"),
    ("service, waypoint for workload only: direct", ("10.96.1.3", 80), 0, True, Route.HBONE,
     "10.2.0.19:8080", ("10.2.0.19", 15008), sid("shop", "backend"), "mesh"),
    ("service, waypoint for all", ("10.96.1.4", 80), 0, True, Route.WAYPOINT, "10.96.1.4:80",
     ("10.5.0.4", 15008), sid("shop", "wp-all"), "wp-all"),
    ("service, waypoint for none: direct", ("10.96.1.5", 80), 0, True, Route.HBONE,
     "10.2.0.19:8080", ("10.2.0.19", 15008), sid("shop", "backend"), "mesh"),
    ("use-waypoint-namespace", ("10.96.1.6", 80), 0, True, Route.WAYPOINT, "10.96.1.6:80",
     ("10.6.0.1", 15008), sid("infra", "shared-sa"), "waypoint infra/shared"),
    ("namespace label, service", ("10.96.1.10", 80), 0, True, Route.WAYPOINT, "10.96.1.10:80",
     ("10.7.0.1", 15008), sid("nsd", "ns-wp"), "waypoint nsd/ns-wp"),
    ("namespace label, pod", ("10.2.0.17", 8080), 0, True, Route.WAYPOINT, "10.2.0.17:8080",
     ("10.7.0.1", 15008), sid("nsd", "ns-wp"), "waypoint nsd/ns-wp"),
    ("service opts out with none", ("10.96.1.11", 80), 0, True, Route.HBONE, "10.2.0.18:8080",
     ("10.2.0.18", 15008), sid("nsd", "nsd-optout"), "mesh"),
    ("pod opts out with none", ("10.2.0.18", 8080), 0, True, Route.HBONE, "10.2.0.18:8080",
     ("10.2.0.18", 15008), sid("nsd", "nsd-optout"), "mesh"),
    ("service names no such waypoint: direct", ("10.96.1.7", 80), 0, True, Route.HBONE,
     "10.2.0.19:8080", ("10.2.0.19", 15008), sid("shop", "backend"),
     "service shop/ghost-svc names no such waypoint shop/ghost: direct"),
    ("pod names no such waypoint: direct", ("10.2.0.15", 8080), 0, True, Route.HBONE,
     "10.2.0.15:8080", ("10.2.0.15", 15008), sid("shop", "ghost-pod"),
     "workload shop/ghost-pod names no such waypoint shop/ghost: direct"),
    ("waypoint without an address: refused", ("10.96.1.8", 80), 0, True, Route.REFUSE,
     "10.96.1.8:80", None, None, "no address yet: refused"),
    ("no identity source: refused, not sent around", ("10.96.1.1", 80), 0, False,
     Route.REFUSE, "10.96.1.1:80", None, None, "no identity source"),
    ("same-node service endpoint: still the waypoint", ("10.96.1.9", 80), 0, True,
     Route.WAYPOINT, "10.96.1.9:80", ("10.5.0.1", 15008), sid("shop", "wp-sa"), "wp"),
    ("same-node pod with a waypoint: still the waypoint", ("10.1.0.16", 8080), 0, True,
     Route.WAYPOINT, "10.1.0.16:8080", ("10.5.0.3", 15008), sid("shop", "wp-workload"),
     "wp-workload"),
    ("service without one, endpoint with its own (requireWaypoint)", ("10.96.1.13", 80), 0, True,
     Route.WAYPOINT, "10.2.0.11:8080", ("10.5.0.3", 15008), sid("shop", "wp-workload"),
     "workload shop/wl-pod uses waypoint shop/wp-workload"),
    ("no waypoint anywhere: unchanged", ("10.96.1.12", 80), 0, True, Route.HBONE,
     "10.2.0.19:8080", ("10.2.0.19", 15008), sid("shop", "backend"), "mesh"),
]  # fmt: skip


@pytest.mark.parametrize(
    "case,dst,pick,tls,route,authority,hbone,ident,why", WP_TABLE, ids=[r[0] for r in WP_TABLE]
)
def test_waypoint_decision(
    case: str,
    dst: tuple[str, int],
    pick: int,
    tls: bool,
    route: Route,
    authority: str,
    hbone: tuple[str, int] | None,
    ident: str | None,
    why: str,
) -> None:
    req = decide(WP_STATE.view, SRC, dst, tls=tls, pick=pick)
    assert req.route is route, req.reason
    assert req.authority == authority
    if hbone is not None:
        assert req.hbone_address == hbone
    assert (req.dst_identity.uri if req.dst_identity else None) == ident
    assert why in req.reason, req.reason
    if route in (Route.WAYPOINT, Route.HBONE):
        assert req.src_identity is not None and req.src_identity.uri == sid("shop", "client")
    if route is Route.WAYPOINT:
        assert req.waypoint is not None and req.via == hbone[0]  # type: ignore[index]
        assert req.original == (dst[0], dst[1])
    if route is Route.REFUSE:
        assert req.src_identity is None and req.waypoint is not None


def test_service_endpoint_with_its_own_waypoint_without_require_waypoint_is_direct() -> None:
    """requireWaypoint false is Istio's behaviour: a workload waypoint applies
    only to traffic addressed to the pod (ztunnel: "Don't traverse waypoint
    if traffic was addressed to a service")."""
    req = decide(WP_STATE.view, SRC, ("10.96.1.13", 80), tls=True, require_waypoint=False)
    assert req.route is Route.HBONE and req.target == ("10.2.0.11", 8080)
    assert req.dst_identity is not None and req.dst_identity.uri == sid("shop", "wl-pod")
    # traffic addressed to the pod still goes through its waypoint
    req = decide(WP_STATE.view, SRC, ("10.2.0.11", 8080), tls=True, require_waypoint=False)
    assert req.route is Route.WAYPOINT


def test_waypoint_request_carries_the_service() -> None:
    req = decide(WP_STATE.view, SRC, ("10.96.1.1", 80), tls=True)
    assert req.dst_service is not None and req.dst_service.key == "shop/websvc"
    assert req.dst_workload is None  # the waypoint chooses the endpoint


def test_a_waypoint_pod_is_never_sent_to_a_waypoint() -> None:
    """Envoy originates its own HBONE and is not captured; should its pod be
    captured anyway, it must not loop back to itself."""
    req = decide(WP_STATE.view, WP_POD, ("10.96.1.1", 80), tls=True)
    assert req.route is Route.HBONE and req.target == ("10.2.0.10", 8080)
    req = decide(WP_STATE.view, WP_POD, ("10.2.0.11", 8080), tls=True)
    assert req.route is Route.HBONE and req.target == ("10.2.0.11", 8080)


def test_unknown_source_is_not_given_a_waypoint_identity() -> None:
    req = decide(WP_STATE.view, None, ("10.96.1.1", 80), tls=True)
    assert req.route is Route.PASSTHROUGH and req.src_identity is None


def test_guards_and_waypoint_addresses() -> None:
    v = WP_STATE.view
    by = {w.name: w for w in WP_WORKLOADS}
    names = {k: [wp.key for wp in v.guarded_by(by[k])] for k in by}
    assert names["web"] == ["shop/wp"]  # selected by a service using wp
    assert names["local-web"] == ["shop/wp"]
    assert names["wl-pod"] == ["shop/wp-workload"]  # its own, for workload traffic
    assert names["all-pod"] == ["shop/wp-all"]
    # every service selecting it that uses a waypoint for service traffic
    assert names["backend"] == ["shop/wp-v4only", "shop/wp-all", "infra/shared", "shop/wp-noaddr"]
    assert names["nsd-pod"] == ["nsd/ns-wp"]
    for unguarded in ("client", "none-pod", "svc-only-pod", "ghost-pod", "nsd-optout", "wp-7f9"):
        assert names[unguarded] == [], unguarded
    assert v.waypoint_at("10.5.0.2") is WAYPOINTS[0]
    assert v.waypoint_at("::ffff:10.5.0.1") is WAYPOINTS[0]
    assert v.waypoint_at("10.2.0.10") is None
    assert v.is_waypoint(WP_POD) and not v.is_waypoint(SRC)
    assert v.identity_of_waypoint(WAYPOINTS[1]).uri == sid("shop", "wp-workload")
    assert v.missing_waypoint == {
        "service shop/ghost-svc": "shop/ghost",
        "workload shop/ghost-pod": "shop/ghost",
    }
    dump = {d["name"]: d for d in v.describe()["waypoints"]}
    assert dump["shop/wp"]["identity"] == sid("shop", "wp-sa")
    assert dump["shop/wp"]["guards"] == ["shop/local-web", "shop/web"]
