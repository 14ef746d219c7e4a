"""k8s tier: the waypoint lifecycle against a real kube-apiserver.

Gateways of class istio-waypoint become a ServiceAccount, Service and
Deployment owned by the Gateway, and a Gateway status, written by exactly one
deployer (the Lease holder); the deployer runs with the DaemonSet's
ClusterRole (least privilege).  The apiserver here has no controller-manager:
garbage collection is not run, so the tests check the ownerReferences it
would follow, and that the deployer never recreates for a deleted Gateway.
Everything polls with bounds; nothing sleeps a fixed time.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.sources.waypoint_deploy import (
    FIELD_MANAGER,
    LEASE_NAME,
    LeaseTiming,
    WaypointDeployer,
)
from tests.k8s.cluster import AGENT_SA_NAMESPACE, Cluster

ROOT = Path(__file__).resolve().parents[2]
GW = "gateway.networking.k8s.io"
IMAGE = "registry.example/tether:test"
FAST = LeaseTiming(lease_duration=3.0, renew_deadline=2.0, retry_period=0.3)


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            last = cond()
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


@pytest.fixture(scope="module")
def agent_rbac(k8s_cluster: Cluster) -> Cluster:
    """The DaemonSet's RBAC, bound to the test agent user (tether-system/tether)."""
    k8s_cluster.ensure_namespace(AGENT_SA_NAMESPACE)
    subject = [{"kind": "ServiceAccount", "name": "tether", "namespace": AGENT_SA_NAMESPACE}]
    ref = {"apiGroup": "rbac.authorization.k8s.io"}
    k8s_cluster.apply_rbac(
        ROOT / "daemonset" / "rbac.yaml",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "tether-agent-wplife"},
            "roleRef": {**ref, "kind": "ClusterRole", "name": "tether-agent"},
            "subjects": subject,
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "tether-waypoint-deployer-wplife", "namespace": "tether-system"},
            "roleRef": {**ref, "kind": "Role", "name": "tether-waypoint-deployer"},
            "subjects": subject,
        },
    )
    return k8s_cluster


class Deployers:
    """Deployers started in a test, each with the agent user's credentials."""

    def __init__(self, cluster: Cluster, lease_ns: str) -> None:
        self.cluster = cluster
        self.lease_ns = lease_ns
        self.running: list[WaypointDeployer] = []

    def start(self, identity: str) -> WaypointDeployer:
        d = WaypointDeployer(
            self.cluster.agent_api_client(),
            namespace=self.lease_ns,
            identity=identity,
            image=IMAGE,
            xds_dir="/var/run/tether/xds",
            timing=FAST,
            resync=1.0,
        )
        d.start()
        self.running.append(d)
        return d

    def close(self) -> None:
        for d in self.running:
            d.stop()


@pytest.fixture
def deployers(agent_rbac: Cluster) -> Iterator[Deployers]:
    from kubernetes import client

    coord = client.CoordinationV1Api(agent_rbac.api_client())
    with contextlib.suppress(client.ApiException):
        coord.delete_namespaced_lease(LEASE_NAME, AGENT_SA_NAMESPACE)
    ds = Deployers(agent_rbac, AGENT_SA_NAMESPACE)
    yield ds
    ds.close()


def gateway(
    name: str, listeners: list[dict[str, Any]] | None = None, **meta: Any
) -> dict[str, Any]:
    return {
        "apiVersion": f"{GW}/v1",
        "kind": "Gateway",
        "metadata": {"name": name, **meta},
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": listeners
            if listeners is not None
            else [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
    }


def conditions(gw: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in (gw.get("status") or {}).get("conditions") or []}


def test_gateway_becomes_owned_deployment_service_and_status(
    k8s_cluster: Cluster, k8s_namespace: str, deployers: Deployers
) -> None:
    from kubernetes import client

    api = k8s_cluster.api_client()
    custom, core, apps = client.CustomObjectsApi(api), client.CoreV1Api(api), client.AppsV1Api(api)
    ns = k8s_namespace
    custom.create_namespaced_custom_object(GW, "v1", ns, "gateways", gateway("wp"))
    custom.create_namespaced_custom_object(
        GW,
        "v1",
        ns,
        "gateways",
        gateway("wp2", annotations={"gateway.istio.io/service-account": "custom-sa"}),
    )
    d = deployers.start("agent-a")
    wait_for(d.leading, "the only deployer leads", 10)

    def programmed(name: str) -> dict[str, Any] | None:
        gw = custom.get_namespaced_custom_object(GW, "v1", ns, "gateways", name)
        c = conditions(gw).get("Programmed")
        return gw if c and c["status"] == "True" else None

    gw = wait_for(lambda: programmed("wp"), "Gateway wp Programmed")
    uid, gen = gw["metadata"]["uid"], gw["metadata"]["generation"]
    conds = conditions(gw)
    assert conds["Accepted"]["status"] == "True" and conds["Accepted"]["reason"] == "Accepted"
    assert conds["Programmed"]["reason"] == "Programmed"
    assert all(c["observedGeneration"] == gen for c in conds.values())
    svc = core.read_namespaced_service("wp", ns)
    assert gw["status"]["addresses"] == [{"type": "IPAddress", "value": svc.spec.cluster_ip}]
    (listener,) = gw["status"]["listeners"]
    assert listener["name"] == "mesh"

    labels = {
        "gateway.networking.k8s.io/gateway-name": "wp",
        "istio.io/gateway-name": "wp",
    }
    owner = {"api_version": f"{GW}/v1", "kind": "Gateway", "name": "wp", "uid": uid}
    for obj in (
        svc,
        apps.read_namespaced_deployment("wp", ns),
        core.read_namespaced_service_account("wp", ns),
    ):
        assert labels.items() <= (obj.metadata.labels or {}).items(), obj.metadata
        (ref,) = obj.metadata.owner_references
        assert {k: getattr(ref, k) for k in owner} == owner and ref.controller is True
    ports = {(p.name, p.port, p.app_protocol) for p in svc.spec.ports}
    assert ports == {("mesh", 15008, "all"), ("status-port", 15021, "tcp")}
    assert svc.spec.selector == {"gateway.networking.k8s.io/gateway-name": "wp"}

    dep = apps.read_namespaced_deployment("wp", ns)
    assert dep.spec.selector.match_labels == {"gateway.networking.k8s.io/gateway-name": "wp"}
    tpl = dep.spec.template
    assert labels.items() <= tpl.metadata.labels.items()
    assert tpl.metadata.labels["istio.io/dataplane-mode"] == "none"
    assert tpl.spec.service_account_name == "wp"
    (c,) = tpl.spec.containers
    assert c.image == IMAGE
    assert c.command == [
        "tether", "waypoint-proxy", "--namespace", ns, "--name", "wp",
        "--xds-dir", "/var/run/tether/xds",
    ]  # fmt: skip
    (vol,) = tpl.spec.volumes
    assert vol.host_path.path == "/var/run/tether/xds"
    assert c.volume_mounts[0].mount_path == "/var/run/tether/xds"
    managers = {m.manager for m in dep.metadata.managed_fields}
    assert FIELD_MANAGER in managers

    # the annotation names the account: used, not created
    wait_for(lambda: programmed("wp2"), "Gateway wp2 Programmed")
    dep2 = apps.read_namespaced_deployment("wp2", ns)
    assert dep2.spec.template.spec.service_account_name == "custom-sa"
    with pytest.raises(client.ApiException) as e:
        core.read_namespaced_service_account("wp2", ns)
    assert e.value.status == 404

    # a spec change is acted on with the new generation
    custom.patch_namespaced_custom_object(
        GW, "v1", ns, "gateways", "wp", {"metadata": {"labels": {"x": "y"}}, "spec": {
            "listeners": [
                {"name": "mesh", "port": 15008, "protocol": "HBONE"},
                {"name": "extra", "port": 8080, "protocol": "HTTP"},
            ]}},
    )  # fmt: skip

    def regenerated() -> bool:
        gw = custom.get_namespaced_custom_object(GW, "v1", ns, "gateways", "wp")
        return all(c["observedGeneration"] == gen + 1 for c in conditions(gw).values())

    wait_for(regenerated, "status at the new generation")

    # deleted: the deployer does not recreate (GC would remove the rest)
    custom.delete_namespaced_custom_object(GW, "v1", ns, "gateways", "wp")
    apps.delete_namespaced_deployment("wp", ns)
    core.delete_namespaced_service("wp", ns)
    wait_for(lambda: f"{ns}/wp" not in d.deployed, "the deployer forgot wp")
    # two more full passes over the Gateways without wp coming back
    after = d.passes
    d.wake()
    wait_for(lambda: d.passes >= after + 2 and d.leading(), "two more passes")
    for read in (apps.read_namespaced_deployment, core.read_namespaced_service):
        with pytest.raises(client.ApiException) as e:
            read("wp", ns)
        assert e.value.status == 404


def test_invalid_gateway_is_not_accepted_and_not_deployed(
    k8s_cluster: Cluster, k8s_namespace: str, deployers: Deployers
) -> None:
    from kubernetes import client

    api = k8s_cluster.api_client()
    custom, apps = client.CustomObjectsApi(api), client.AppsV1Api(api)
    ns = k8s_namespace
    custom.create_namespaced_custom_object(
        GW, "v1", ns, "gateways",
        gateway("bad", [{"name": "http", "port": 80, "protocol": "HTTP"}]),
    )  # fmt: skip
    custom.create_namespaced_custom_object(GW, "v1", ns, "gateways", gateway("good"))
    d = deployers.start("agent-a")

    def accepted(name: str) -> dict[str, Any] | None:
        gw = custom.get_namespaced_custom_object(GW, "v1", ns, "gateways", name)
        return conditions(gw).get("Accepted")

    bad = wait_for(lambda: accepted("bad"), "Gateway bad has Accepted")
    assert bad["status"] == "False" and bad["reason"] == "ListenersNotValid"
    assert "mesh" in bad["message"] and "15008" in bad["message"]
    assert "add it to spec.listeners" in bad["message"]
    # the good one proceeds beside it
    wait_for(lambda: (accepted("good") or {}).get("status") == "True", "good accepted")
    apps.read_namespaced_deployment("good", ns)
    with pytest.raises(client.ApiException) as e:
        apps.read_namespaced_deployment("bad", ns)
    assert e.value.status == 404
    assert f"{ns}/bad" not in d.errors  # invalid is a status, not an error


def test_one_writer_and_takeover_after_leader_loss(
    k8s_cluster: Cluster, k8s_namespace: str, deployers: Deployers
) -> None:
    from kubernetes import client

    api = k8s_cluster.api_client()
    custom, apps = client.CustomObjectsApi(api), client.AppsV1Api(api)
    coord = client.CoordinationV1Api(api)
    ns = k8s_namespace
    a = deployers.start("agent-a")
    b = deployers.start("agent-b")
    wait_for(lambda: a.leading() or b.leading(), "a leader", 10)
    leader, other = (a, b) if a.leading() else (b, a)
    custom.create_namespaced_custom_object(GW, "v1", ns, "gateways", gateway("wp"))
    for d in (a, b):
        d.wake()
    wait_for(lambda: apps.read_namespaced_deployment("wp", ns), "Deployment written")
    # over several renew periods, only one ever leads and only it wrote
    deadline = time.monotonic() + 3 * FAST.retry_period
    while time.monotonic() < deadline:
        assert not (a.leading() and b.leading())
        time.sleep(0.05)
    assert other.deployed == {} and not other.leading()
    lease = coord.read_namespaced_lease(LEASE_NAME, AGENT_SA_NAMESPACE)
    assert lease.spec.holder_identity == leader.elector.identity

    # leader loss without a clean step-down: its threads stop, the Lease stays
    leader.stop(release=False)
    lost = time.monotonic()
    wait_for(other.leading, "the other takes over", FAST.lease_duration + 10)
    took = time.monotonic() - lost
    assert took < FAST.lease_duration + 3 * FAST.retry_period + 2, took
    lease = coord.read_namespaced_lease(LEASE_NAME, AGENT_SA_NAMESPACE)
    assert lease.spec.holder_identity == other.elector.identity
    assert (lease.spec.lease_transitions or 0) >= 1
    # the new leader owns the work: a new Gateway is deployed by it
    custom.create_namespaced_custom_object(GW, "v1", ns, "gateways", gateway("wp3"))
    other.wake()
    wait_for(lambda: f"{ns}/wp3" in other.deployed, "new leader deploys wp3")

    # clean step-down: the successor does not wait for expiry
    other.stop()
    c = deployers.start("agent-c")
    start = time.monotonic()
    wait_for(c.leading, "agent-c leads after a release", 10)
    assert time.monotonic() - start < FAST.lease_duration, "waited for expiry despite a release"


def _pod(core: Any, ns: str, name: str, node: str, ip: str, labels: dict[str, str]) -> None:
    """A pod as the scheduler and kubelet would leave it (neither runs here)."""
    core.create_namespaced_pod(
        ns,
        {
            "metadata": {"name": name, "labels": labels},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]},
        },
    )
    core.patch_namespaced_pod_status(
        name,
        ns,
        {
            "status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{"ip": ip}],
                "conditions": [{"type": "Ready", "status": "True"}],
            }
        },
    )


def test_use_waypoint_labels_reach_the_outbound_decision(
    k8s_cluster: Cluster, k8s_namespace: str, deployers: Deployers
) -> None:
    """Namespace and Service `istio.io/use-waypoint` labels, changed live,
    reach the agent's outbound decision (KubeSource -> ProxyState ->
    decide()), through the address the deployer wrote on the Gateway."""
    import asyncio

    from kubernetes import client

    from agent.sources.k8s import KubeSource
    from agent.state.outbound import Route, decide
    from agent.state.state import ProxyState

    api = k8s_cluster.api_client()
    core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
    ns = k8s_namespace
    core.patch_namespace(ns, {"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}})
    _pod(core, ns, "a", "node-a", "10.244.77.10", {"app": "a"})
    _pod(core, ns, "b", "node-b", "10.244.77.11", {"app": "b"})
    svc_b = {
        "metadata": {"name": "b"},
        "spec": {"selector": {"app": "b"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }
    vip = core.create_namespaced_service(ns, svc_b).spec.cluster_ip
    custom.create_namespaced_custom_object(GW, "v1", ns, "gateways", gateway("wp"))
    deployers.start("agent-a")

    loop = asyncio.new_event_loop()  # never run: the test takes snapshots itself
    source = KubeSource("node-a", api=k8s_cluster.agent_api_client())
    source.start(loop, lambda snap: None)
    state = ProxyState("node-a")

    def route() -> tuple[Route, str]:
        view = state.apply(source.snapshot()).view
        src = next(w for w in view.snapshot.workloads if w.name == "a" and w.namespace == ns)
        req = decide(view, src, (vip, 80), tls=True)
        return req.route, req.via or req.target[0]

    def becomes(want: Route, what: str) -> tuple[Route, str]:
        got: list[tuple[Route, str]] = []

        def check() -> bool:
            got[:] = [route()] if source.ready() else []
            return bool(got) and got[0][0] is want

        wait_for(check, f"{what} (last decision {got})")
        return got[0]

    try:
        wp_ip = wait_for(
            lambda: core.read_namespaced_service("wp", ns).spec.cluster_ip, "wp's Service"
        )
        assert becomes(Route.HBONE, "direct to b without a waypoint label") == (
            Route.HBONE, "10.244.77.11",
        )  # fmt: skip
        core.patch_namespace(ns, {"metadata": {"labels": {"istio.io/use-waypoint": "wp"}}})
        assert becomes(Route.WAYPOINT, "namespace label: through wp") == (Route.WAYPOINT, wp_ip)
        core.patch_namespaced_service(
            "b", ns, {"metadata": {"labels": {"istio.io/use-waypoint": "none"}}}
        )
        becomes(Route.HBONE, "the service opts out")
        core.patch_namespaced_service(
            "b", ns, {"metadata": {"labels": {"istio.io/use-waypoint": None}}}
        )
        becomes(Route.WAYPOINT, "the service's opt-out removed")
        core.patch_namespace(ns, {"metadata": {"labels": {"istio.io/use-waypoint": None}}})
        becomes(Route.HBONE, "the namespace label removed")
    finally:
        source.stop()
        loop.close()


def test_a_nack_becomes_a_warning_event_on_the_gateway(
    agent_rbac: Cluster, k8s_namespace: str
) -> None:
    """What agent/app.py wires to Waypoints.on_nack, with the agent's RBAC."""
    from kubernetes import client

    from agent.sources.k8s import KubeSource

    api = agent_rbac.api_client()
    custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)
    ns = k8s_namespace
    uid = custom.create_namespaced_custom_object(GW, "v1", ns, "gateways", gateway("wp"))[
        "metadata"
    ]["uid"]
    source = KubeSource("node-a", api=agent_rbac.agent_api_client())
    source.gateway_event(ns, "wp", "WaypointConfigRejected", "Envoy rejected Listener version 7")

    def event() -> Any:
        items = core.list_namespaced_event(ns).items
        return [e for e in items if e.involved_object.kind == "Gateway"]

    (ev,) = wait_for(event, "the Event")
    assert ev.involved_object.name == "wp" and ev.involved_object.uid == uid
    assert ev.type == "Warning" and ev.reason == "WaypointConfigRejected"
    assert "Listener version 7" in ev.message


def test_api_server_outage_is_retried_not_fatal(
    k8s_cluster_running: Cluster, k8s_namespace: str, deployers: Deployers
) -> None:
    """The leader loses the Lease when it cannot renew, keeps its threads,
    and after the API server returns leads again and deploys what it missed."""
    from kubernetes import client

    cluster = k8s_cluster_running
    ns = k8s_namespace
    d = deployers.start("agent-a")
    wait_for(d.leading, "leads", 10)
    cluster.stop_apiserver()
    wait_for(lambda: not d.leading(), "stops leading without renewals", 10)
    wait_for(lambda: d.elector.error, "the Lease error is recorded", 10)
    assert all(t.is_alive() for t in d._threads)
    cluster.start_apiserver()
    api = cluster.api_client()
    custom, apps = client.CustomObjectsApi(api), client.AppsV1Api(api)
    custom.create_namespaced_custom_object(GW, "v1", ns, "gateways", gateway("wp"))
    wait_for(d.leading, "leads again", 30)
    d.wake()
    wait_for(lambda: apps.read_namespaced_deployment("wp", ns), "deployed after the outage", 30)
    assert d.describe()["lease_error"] is None
