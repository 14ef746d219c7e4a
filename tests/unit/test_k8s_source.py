"""KubeSource without an API server: a custom resource whose CRD is not
installed (the Gateway API, or Istio's own CRDs) counts as synced and empty,
is reported, and is picked up once it appears; other failures still raise."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from agent.sources.k8s import Kind, KubeSource, waypoints_of
from agent.state.state import ProxyState

GW = ("gateway.networking.k8s.io", "v1", "gateways")


class FakeList:
    def __init__(self) -> None:
        self.installed = False
        self.items: list[dict[str, Any]] = []

    def __call__(self, *args: Any, **kw: Any) -> Any:
        if not self.installed:
            raise ApiException(status=404, reason="Not Found")
        return SimpleNamespace(
            data=json.dumps({"metadata": {"resourceVersion": "7"}, "items": self.items}).encode()
        )


def _source() -> KubeSource:
    return KubeSource("n1", api=client.ApiClient())


def test_missing_crd_is_synced_empty_and_reported_then_picked_up() -> None:
    src = _source()
    fake = FakeList()
    kind = Kind("gateways", fake, GW)
    assert src._relist(kind) is None
    assert "gateways" in src.synced and src.objects["gateways"] == {}
    assert "CRD not installed" in src.describe()["missing"]["gateways"]
    fake.installed = True
    fake.items = [
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "shop"},
        }
    ]
    assert src._relist(kind) == "7"
    assert "gateways" not in src.describe()["missing"]
    assert list(src.objects["gateways"]) == ["shop/waypoint"]


def test_snapshot_carries_gateway_api_documents_for_reporting() -> None:
    src = _source()
    src.objects = {
        "gateways": {
            "shop/w": {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "metadata": {"name": "w", "namespace": "shop"},
            }
        }
    }
    (doc,) = src.snapshot().policies
    assert doc["kind"] == "Gateway" and doc["apiVersion"].startswith("gateway.networking")


def test_missing_core_kind_still_fails() -> None:
    src = _source()
    fake = FakeList()
    with pytest.raises(ApiException):
        src._relist(Kind("pods", fake))
    assert "pods" not in src.synced


def test_other_errors_of_custom_kinds_still_fail() -> None:
    src = _source()

    def forbidden(*a: Any, **kw: Any) -> Any:
        raise ApiException(status=403, reason="Forbidden")

    with pytest.raises(ApiException):
        src._relist(Kind("gateways", forbidden, GW))
    assert "gateways" not in src.synced


def test_crd_removed_while_watching_is_relisted_and_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The watch of a custom kind gets 404 (its CRD was deleted): the loop
    relists instead of re-watching a stale resourceVersion forever, and the
    kind shows up as missing with nothing left of it."""
    import agent.sources.k8s as k8s

    src = _source()
    fake = FakeList()
    fake.installed = True
    fake.items = [
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "w", "namespace": "shop"},
        }
    ]

    class GoneWatch:
        def stream(self, *a: Any, **kw: Any) -> Any:
            fake.installed = False  # the CRD is deleted while we watch
            raise ApiException(status=404, reason="Not Found")

        def stop(self) -> None:
            pass

    monkeypatch.setattr(k8s.watch, "Watch", GoneWatch)
    monkeypatch.setattr(k8s, "MISSING_RECHECK", 0.0)
    waits: list[float] = []

    def wait(t: float) -> bool:
        waits.append(t)
        if "gateways" in src.missing or len(waits) >= 5:  # bounded either way
            src._stop.set()
        return src._stop.is_set()

    monkeypatch.setattr(src._stop, "wait", wait)
    src._run(Kind("gateways", fake, GW))
    assert "gateways" in src.missing
    assert src.objects["gateways"] == {}
    assert len(waits) <= 3, waits


# -- waypoints: Gateways of class istio-waypoint --------------------------------


def _gateway(name: str, ns: str = "shop", **kw: Any) -> dict[str, Any]:
    return {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {"name": name, "namespace": ns, "labels": kw.pop("labels", {}), **kw},
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }


def _wp_pod(
    name: str, gw: str, ips: list[str], node: str = "n2", ns: str = "shop", **status: Any
) -> dict[str, Any]:
    """A waypoint pod as Istio's deployment controller labels it."""
    return {
        "metadata": {
            "name": name,
            "namespace": ns,
            "uid": f"uid-{name}",
            "labels": {
                "gateway.networking.k8s.io/gateway-name": gw,
                "istio.io/dataplane-mode": "none",
            },
        },
        "spec": {"nodeName": node, "serviceAccountName": gw},
        "status": {
            "phase": "Running",
            "podIP": ips[0] if ips else None,
            "podIPs": [{"ip": i} for i in ips],
            "conditions": [{"type": "Ready", "status": "True"}],
            **status,
        },
    }


def test_waypoint_gateway_becomes_a_waypoint_from_its_pods() -> None:
    src = _source()
    src.objects = {
        "gateways": {
            "shop/waypoint": _gateway("waypoint"),
            "shop/ingress": {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "metadata": {"name": "ingress", "namespace": "shop"},
                "spec": {"gatewayClassName": "istio"},
            },
        },
        "pods": {
            "shop/waypoint-b": _wp_pod("waypoint-b", "waypoint", ["10.2.0.8", "fd00::8"]),
            "shop/waypoint-a": _wp_pod("waypoint-a", "waypoint", ["10.3.0.7"], node="n3"),
            "shop/gone": _wp_pod("gone", "waypoint", ["10.2.0.9"], phase="Failed"),
            "shop/unready": _wp_pod(
                "unready",
                "waypoint",
                ["10.2.0.10"],
                conditions=[{"type": "Ready", "status": "False"}],
            ),
            "other/waypoint-x": _wp_pod("waypoint-x", "waypoint", ["10.4.0.1"], ns="other"),
        },
    }
    snap = src.snapshot()
    (wp,) = snap.waypoints
    assert wp.key == "shop/waypoint"
    assert wp.addresses == ("10.3.0.7", "10.2.0.8", "fd00::8")  # serving pods, by name
    assert (wp.node, wp.account, wp.traffic_for) == ("n3", "waypoint", "service")
    # the waypoint Gateway is no longer a document reported as not applied; others are
    assert [d["metadata"]["name"] for d in snap.policies] == ["ingress"]
    state = ProxyState("n1")
    state.apply(snap)
    assert state.view.waypoint_at("10.2.0.8") is wp
    assert state.view.identity_of_waypoint(wp).uri == "spiffe://cluster.local/ns/shop/sa/waypoint"


def test_waypoint_pods_are_dialled_and_status_addresses_indexed() -> None:
    """The Gateway's status address is its Service's ClusterIP: a node
    without kube-proxy cannot dial it (found on the real node: "Network is
    unreachable"), so the serving pods are dialled, as ztunnel resolves the
    waypoint's VIP to its workloads; the VIP still names the waypoint."""
    gw = _gateway("wp", labels={"istio.io/waypoint-for": "all"})
    gw["status"] = {
        "addresses": [
            {"type": "IPAddress", "value": "10.96.5.5"},
            {"type": "Hostname", "value": "wp.shop.svc.cluster.local"},
            {"value": "fd00:96::5"},
        ]
    }
    (wp,) = waypoints_of([gw], [_wp_pod("wp-1", "wp", ["10.2.0.8"])])
    assert wp.addresses == ("10.2.0.8",)
    assert wp.service_addresses == ("10.96.5.5", "fd00:96::5")
    assert (wp.traffic_for, wp.node) == ("all", "n2")
    # no serving pod known (yet, or not visible): the status addresses are dialled
    (wp,) = waypoints_of([gw], [])
    assert wp.addresses == ("10.96.5.5", "fd00:96::5")


def test_a_running_waypoint_pod_not_yet_ready_is_served_but_not_dialled() -> None:
    """The waypoint pod is Ready only once its Envoy is configured (its
    readiness probe), so its node's agent must serve it before it is Ready;
    traffic goes to Ready pods only (found on the real node: the agent waited
    for Ready, the pod for its configuration)."""
    gw = _gateway("wp")
    gw["status"] = {"addresses": [{"type": "IPAddress", "value": "10.96.5.5"}]}
    pod = _wp_pod("wp-1", "wp", ["10.2.0.8"], conditions=[{"type": "Ready", "status": "False"}])
    (wp,) = waypoints_of([gw], [pod], {("shop", "wp-1"): "/proc/7/ns/net"}, node="n2")
    assert wp.envoy_in_pod and wp.netns == "/proc/7/ns/net" and wp.node == "n2"
    assert wp.addresses == ("10.96.5.5",)  # not the unready pod
    ready = _wp_pod("wp-1", "wp", ["10.2.0.8"])
    (wp,) = waypoints_of([gw], [ready], {("shop", "wp-1"): "/proc/7/ns/net"}, node="n2")
    assert wp.envoy_in_pod and wp.addresses == ("10.2.0.8",)


def test_waypoint_without_pods_has_no_address_and_named_account() -> None:
    gw = _gateway(
        "wp",
        labels={"istio.io/waypoint-for": "bogus"},
        annotations={"gateway.istio.io/service-account": "custom-sa"},
    )
    old_label = _wp_pod("wp-1", "wp", ["10.2.0.8"], phase="Pending")
    (wp,) = waypoints_of([gw], [old_label])
    assert wp.addresses == () and wp.node == ""
    assert wp.account == "custom-sa" and wp.traffic_for == "service"


def test_older_istio_gateway_name_label_is_followed() -> None:
    pod = _wp_pod("wp-1", "wp", ["10.2.0.8"])
    pod["metadata"]["labels"] = {"istio.io/gateway-name": "wp"}
    (wp,) = waypoints_of([_gateway("wp")], [pod])
    assert wp.addresses == ("10.2.0.8",)


def test_waypoint_pod_on_this_node_is_served_not_run() -> None:
    """The deployer's pod runs Envoy itself: the agent of its node learns its
    netns (to admit only it on the xDS socket) and that Envoy is the pod's."""
    pod = _wp_pod("wp-1", "wp", ["10.2.0.8"])
    netns = {(pod["metadata"]["namespace"], "wp-1"): "/proc/42/ns/net"}
    (here,) = waypoints_of([_gateway("wp")], [pod], netns, "n2")
    assert here.netns == "/proc/42/ns/net" and here.envoy_in_pod
    (elsewhere,) = waypoints_of([_gateway("wp")], [pod], netns, "n1")
    assert elsewhere.netns is None and not elsewhere.envoy_in_pod
