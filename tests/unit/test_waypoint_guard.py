"""The destination's side of waypoints, without root: a workload guarded by
a waypoint takes mesh traffic only from its waypoint's identity
(agent.requireWaypoint, default on); open connections that skipped the
waypoint are closed when a workload becomes guarded."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace
from typing import Any

from agent.identity.spiffe import SpiffeId
from agent.model import Service, ServicePort, Snapshot, Waypoint, Workload
from agent.state.state import ProxyState
from agent.tunnel.conns import ConnTable
from agent.tunnel.context import PodRef, Tunnel, waypoint_bypass
from agent.tunnel.watcher import revalidate

TD = "cluster.local"
AMBIENT = {"istio.io/dataplane-mode": "ambient"}
WP = Waypoint("wp", "shop", ("10.5.0.1",), "n2", "wp-sa")
WEB = Workload("web", "shop", "web", "n1", ("10.1.0.10",), {"app": "web"})
OWN = Workload("own", "shop", "own", "n1", ("10.1.0.11",), {"istio.io/use-waypoint": "wpw"})
FREE = Workload("free", "shop", "free", "n1", ("10.1.0.12",), {"app": "free"})
WPW = Waypoint("wpw", "shop", ("10.5.0.2",), "n2", traffic_for="workload")
SVC = Service(
    "websvc",
    "shop",
    ("10.96.0.1",),
    (ServicePort(80, 8080),),
    {"app": "web"},
    labels={"istio.io/use-waypoint": "wp"},
)


class NoBypass:
    def add(self, src: tuple[str, int], dst: tuple[str, int]) -> None: ...
    def remove(self, src: tuple[str, int], dst: tuple[str, int]) -> None: ...


def _tunnel(snap: Snapshot, **kw: Any) -> Tunnel:
    state = ProxyState("n1", TD)
    state.apply(snap)
    return Tunnel(state, NoBypass(), ConnTable(), **kw)


def _ref(w: Workload) -> PodRef:
    return PodRef(w.key, "/proc/self/ns/net", w.addresses, w, SpiffeId(TD, w.namespace, w.name))


SNAP = Snapshot("n1", {"shop": dict(AMBIENT)}, (WEB, OWN, FREE), (SVC,), waypoints=(WP, WPW))
WP_ID = SpiffeId(TD, "shop", "wp-sa")
CLIENT = SpiffeId(TD, "shop", "client")


def test_guarded_pod_takes_only_its_waypoint() -> None:
    t = _tunnel(SNAP)
    assert waypoint_bypass(t, _ref(WEB), WP_ID) is None
    why = waypoint_bypass(t, _ref(WEB), CLIENT)
    assert why is not None
    assert "waypoint bypass: shop/web takes mesh traffic only through waypoint shop/wp" in why
    assert "spiffe://cluster.local/ns/shop/sa/wp-sa" in why and CLIENT.uri in why
    plain = waypoint_bypass(t, _ref(WEB), None)  # plaintext (15006)
    assert plain is not None and "a peer without identity" in plain
    # its own waypoint, for workload traffic
    assert waypoint_bypass(t, _ref(OWN), SpiffeId(TD, "shop", "wpw")) is None
    assert waypoint_bypass(t, _ref(OWN), WP_ID) is not None
    # not guarded
    assert waypoint_bypass(t, _ref(FREE), CLIENT) is None
    assert waypoint_bypass(t, _ref(FREE), None) is None


def test_require_waypoint_false_is_istios_default() -> None:
    t = _tunnel(SNAP, require_waypoint=False)
    assert waypoint_bypass(t, _ref(WEB), CLIENT) is None
    assert waypoint_bypass(t, _ref(WEB), None) is None


def test_becoming_guarded_closes_connections_that_skipped_the_waypoint() -> None:
    before = dataclasses.replace(SNAP, waypoints=())  # the label names nothing yet
    t = _tunnel(before)
    killed: list[int] = []
    ref = _ref(WEB)
    t.local[WEB.key] = SimpleNamespace(pod=ref)  # type: ignore[assignment]
    for ident in (CLIENT, WP_ID):
        c = t.conns.add(
            WEB.key, "inbound", ("10.2.0.4", 40000), ("10.1.0.10", 8080), "hbone",
            src_identity=ident.uri,
        )  # fmt: skip
        c.kill = lambda c=c: killed.append(c.id)  # type: ignore[misc]
    assert revalidate(t) == {}
    change = t.state.apply(SNAP)
    assert change.guards_changed and not change.policies_changed
    assert revalidate(t) == {WEB.key: 1}
    (direct,) = [c for c in t.conns.open.values() if c.id in killed]
    assert direct.src_identity == CLIENT.uri and direct.flag == "DENY"
    assert direct.error is not None and "waypoint bypass" in direct.error
