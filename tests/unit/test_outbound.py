"""The outbound decision as a table, without root or sockets (ztunnel keeps
the same kind of table for build_request()): given the state, the source pod
and what the app dialled, where does the connection go?"""

from __future__ import annotations

from typing import Any

import pytest

from agent.model import Endpoint, Service, ServicePort, Snapshot, Workload
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
