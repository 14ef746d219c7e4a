"""k8s tier: the agent's Kubernetes source against a real kube-apiserver.

Pods are created through the API with spec.nodeName and their IPs set
through the status subresource, as a kubelet would; the simulated node's
netns pods stand in for them (their cgroups laid out as the kubelet's
cgroupfs driver does, by pod UID).  The agent runs `tether run --kube` with a
kubeconfig for its own least-privilege user, and real traffic is checked.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.sim.harness import classify
from agent.sim.topology import Pod, Testbed

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="k8s tier needs root (netns, BPF)")

PY = sys.executable
REDIRECTION = "ambient.istio.io/redirection"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Root:
    """Spawn target: the test's netns (where the API server listens) and a cgroup."""

    def __init__(self, cgroup: Path) -> None:
        self.netns_path = Path(f"/proc/{os.getpid()}/ns/net")  # the test's own netns
        self.cgroup_path = cgroup


class KubeNode:
    """One simulated node whose agent watches the real API server."""

    def __init__(self, tb: Testbed, k8s: Any, ns: str) -> None:
        from kubernetes import client

        self.tb, self.k8s, self.ns = tb, k8s, ns
        self.core = client.CoreV1Api(k8s.api_client())
        self.custom = client.CustomObjectsApi(k8s.api_client())
        self.node = tb.add_node("n1")
        self.dir = Path(tempfile.mkdtemp(prefix=f"tether-{tb.prefix}-k8s-"))
        self.admin_port = _free_port()
        self.pin_dir = f"/sys/fs/bpf/{tb.prefix}-k8s"
        self.state_dir = f"/run/{tb.prefix}-k8s"
        self.agent: subprocess.Popen[Any] | None = None
        self.pods: dict[str, Pod] = {}

    def add_pod(self, name: str, sa: str = "default", labels: dict[str, str] | None = None) -> Pod:
        """Create the API pod, then its stand-in, then report its IPs as a kubelet does."""
        body = {
            "metadata": {"name": name, "labels": labels or {"app": name}},
            "spec": {
                "nodeName": "n1",
                "serviceAccountName": sa,
                "containers": [{"name": "app", "image": "stand-in"}],
            },
        }
        if sa != "default":
            with contextlib.suppress(Exception):
                self.core.create_namespaced_service_account(self.ns, {"metadata": {"name": sa}})
        api_pod = self.core.create_namespaced_pod(self.ns, body)
        pod = self.node.add_pod(name, self.ns, sa, uid=api_pod.metadata.uid)
        self.core.patch_namespaced_pod_status(
            name,
            self.ns,
            {
                "status": {
                    "phase": "Running",
                    "podIP": pod.ip4,
                    "podIPs": [{"ip": pod.ip4}, {"ip": pod.ip6}],
                }
            },
        )
        self.pods[name] = pod
        srv = self.tb.spawn(
            pod, [PY, "-m", "agent.sim.peer", "serve", "--port", "8080"], stdout=subprocess.PIPE
        )
        assert srv.stdout is not None and b"ready" in srv.stdout.readline()
        return pod

    def start_agent(self) -> subprocess.Popen[Any]:
        # the agent's user gets exactly the DaemonSet's ClusterRole: least privilege
        root = Path(__file__).resolve().parents[2]
        self.k8s.apply_rbac(
            root / "daemonset" / "rbac.yaml",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "tether-agent-test"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "tether-agent",
                },
                "subjects": [
                    {"kind": "ServiceAccount", "name": "tether", "namespace": "tether-system"}
                ],
            },
        )
        kubeconfig = self.k8s.agent_kubeconfig()
        cfg = {
            "node": "n1",
            "agent": {
                "pinDir": self.pin_dir,
                "stateDir": self.state_dir,
                "cgroup": str(self.node.agent.cgroup_path),
                "kubeletCgroups": [str(self.node.kubelet.cgroup_path)],
                "podCgroupRoot": str(self.node.cgroup_path),
                "adminPort": self.admin_port,
                "readyPort": _free_port(),
                "metricsPort": _free_port(),
                # the deployer has its own module (test_waypoint_lifecycle.py);
                # here a Gateway must stay without pods and status addresses,
                # whichever RBAC an earlier module left bound to this user
                "waypointDeployer": False,
            },
            "identity": {"caDir": str(self.dir / "ca")},
        }
        (self.dir / "agent.yaml").write_text(yaml.safe_dump(cfg))
        log = (self.dir / "agent.log").open("a")
        self.agent = self.tb.spawn(
            Root(self.node.agent.cgroup_path),
            [
                PY,
                "-m",
                "agent.cli",
                "run",
                "--kube",
                "--node",
                "n1",
                "--kubeconfig",
                str(kubeconfig),
                "--config",
                str(self.dir / "agent.yaml"),
            ],
            stdout=log,
            stderr=log,
            env={**os.environ, "TETHER_LOG": "INFO"},
        )
        # startup compiles the programs (BCC): slow on a loaded machine, so a
        # generous bound, as the netns harness uses
        self.wait(lambda: self.status()["ready"], "agent ready", timeout=90)
        return self.agent

    def stop_agent(self, kill: bool = False) -> None:
        if self.agent is not None:
            (self.agent.kill if kill else self.agent.terminate)()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.agent.wait(20)
            self.agent = None

    def status(self) -> dict[str, Any]:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.admin_port}/config_dump", timeout=5
        ) as r:
            data: dict[str, Any] = json.load(r)
        return data

    def enrolled(self) -> set[str]:
        return set(self.status()["datapath"]["pods"])

    def annotation(self, name: str) -> str | None:
        p = self.core.read_namespaced_pod(name, self.ns)
        return (p.metadata.annotations or {}).get(REDIRECTION)

    def log_tail(self) -> str:
        try:
            return "\n".join((self.dir / "agent.log").read_text().splitlines()[-30:])
        except FileNotFoundError:
            return ""

    def wait(self, cond: Any, what: str, timeout: float = 20.0) -> float:
        t0 = time.monotonic()
        while True:
            with contextlib.suppress(OSError, ValueError, KeyError):
                if cond():
                    return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"timed out waiting for {what}\n{self.log_tail()}")
            if self.agent is not None and self.agent.poll() is not None:
                raise AssertionError(f"agent exited ({self.agent.returncode})\n{self.log_tail()}")
            time.sleep(0.05)

    def connect(self, src: str, dst: str) -> tuple[dict[str, Any], tuple[str, str]]:
        p = self.tb.spawn(
            self.pods[src],
            [PY, "-m", "agent.sim.peer", "connect", self.pods[dst].ip4, "8080", "--timeout", "5"],
            stdout=subprocess.PIPE,
        )
        out, _ = p.communicate(timeout=30)
        r: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        time.sleep(0.2)
        conns = self.status()["connections"]
        return r, classify(r, conns["closed"] + conns["open"])

    def close(self) -> None:
        self.stop_agent()
        from kubernetes import client

        with contextlib.suppress(client.ApiException):  # other tests expect the user bare
            client.RbacAuthorizationV1Api(self.k8s.api_client()).delete_cluster_role_binding(
                "tether-agent-test"
            )
        from agent.datapath.datapath import cleanup

        with contextlib.suppress(OSError):
            cleanup(self.pin_dir, self.state_dir)
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def kube_node(k8s_cluster_running: Any, k8s_namespace: str) -> Iterator[KubeNode]:
    with Testbed() as tb:
        n = KubeNode(tb, k8s_cluster_running, k8s_namespace)
        try:
            yield n
        finally:
            n.close()


def test_enroll_by_namespace_label_opt_out_delete_and_policy(kube_node: KubeNode) -> None:
    n = kube_node
    n.add_pod("a", "sa-a")
    n.add_pod("b", "sa-b")
    n.start_agent()
    assert n.enrolled() == set()
    r, path = n.connect("a", "b")
    assert r["ok"] and path == ("direct", "direct")

    # label the namespace: enrollment of running pods, no restart
    t0 = time.monotonic()
    n.core.patch_namespace(n.ns, {"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}})
    n.wait(lambda: n.enrolled() == {f"{n.ns}/a", f"{n.ns}/b"}, "enrollment")
    latency = time.monotonic() - t0
    print(f"\nenrollment latency (label applied -> capture active): {latency * 1000:.0f} ms")
    n.wait(lambda: n.annotation("a") == "enabled", "redirection annotation")
    r, path = n.connect("a", "b")
    assert r["ok"] and path[1] == "captured", (r, path)
    assert r["server_saw_peer"][0] == n.pods["a"].ip4

    # a Service VIP with an EndpointSlice (named target port) reaches b through capture
    svc = n.core.create_namespaced_service(
        n.ns,
        {
            "metadata": {"name": "b-svc"},
            "spec": {
                "selector": {"app": "b"},
                "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
            },
        },
    )
    from kubernetes import client as kclient

    kclient.DiscoveryV1Api(n.k8s.api_client()).create_namespaced_endpoint_slice(
        n.ns,
        {
            "metadata": {"name": "b-svc-1", "labels": {"kubernetes.io/service-name": "b-svc"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [n.pods["b"].ip4], "conditions": {"ready": True}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        },
    )
    vip = svc.spec.cluster_ip
    n.wait(
        lambda: any(
            s["name"] == f"{n.ns}/b-svc" and s["endpoints"] for s in n.status()["state"]["services"]
        ),
        "service endpoints",
    )
    p = n.tb.spawn(
        n.pods["a"],
        [PY, "-m", "agent.sim.peer", "connect", vip, "80", "--timeout", "5"],
        stdout=subprocess.PIPE,
    )
    out, _ = p.communicate(timeout=30)
    r = json.loads(out.decode().strip().splitlines()[-1])
    assert r["ok"], r
    assert r["server_saw_local"] == [n.pods["b"].ip4, 8080]
    assert r["getpeername"] == [vip, 80], "the app still sees the VIP it dialled"
    time.sleep(0.2)
    recs = n.status()["connections"]["closed"]
    assert any(c["dst_service"] == f"b-svc.{n.ns}.svc.cluster.local" for c in recs)

    # a pod opts out
    n.core.patch_namespaced_pod(
        "b", n.ns, {"metadata": {"labels": {"istio.io/dataplane-mode": "none"}}}
    )
    n.wait(lambda: n.enrolled() == {f"{n.ns}/a"}, "opt-out")
    n.wait(lambda: n.annotation("b") is None, "annotation removed")
    n.core.patch_namespaced_pod(
        "b", n.ns, {"metadata": {"labels": {"istio.io/dataplane-mode": None}}}
    )
    n.wait(lambda: len(n.enrolled()) == 2, "opt back in")

    # a policy: only sa-x may reach b -> a is denied; then removed -> allowed again
    policy = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "b-only-x", "namespace": n.ns},
        "spec": {
            "selector": {"matchLabels": {"app": "b"}},
            "rules": [{"from": [{"source": {"principals": [f"cluster.local/ns/{n.ns}/sa/sa-x"]}}]}],
        },
    }
    n.custom.create_namespaced_custom_object(
        "security.istio.io", "v1", n.ns, "authorizationpolicies", policy
    )
    n.wait(lambda: not n.connect("a", "b")[0]["ok"], "policy enforced", timeout=15)
    n.custom.delete_namespaced_custom_object(
        "security.istio.io", "v1", n.ns, "authorizationpolicies", "b-only-x"
    )
    n.wait(lambda: n.connect("a", "b")[0]["ok"], "policy removed", timeout=15)

    # a pod deleted through the API is unenrolled
    n.core.delete_namespaced_pod("b", n.ns, grace_period_seconds=0)
    n.wait(lambda: n.enrolled() == {f"{n.ns}/a"}, "deleted pod unenrolled")


def test_api_server_loss_keeps_enforcing_and_agent_restart_adopts(
    kube_node: KubeNode, k8s_cluster_running: Any
) -> None:
    n = kube_node
    n.core.patch_namespace(n.ns, {"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}})
    n.add_pod("a")
    n.add_pod("b")
    n.start_agent()
    n.wait(lambda: len(n.enrolled()) == 2, "enrollment")
    k8s_cluster_running.stop_apiserver()
    try:
        time.sleep(2)
        r, path = n.connect("a", "b")
        assert r["ok"] and path[1] == "captured", "last known state stays enforced"
        assert n.status()["source"]["errors"], "the watch errors are visible"
    finally:
        k8s_cluster_running.start_apiserver()
    # changes made after the API server is back arrive
    n.core.patch_namespaced_pod(
        "b", n.ns, {"metadata": {"labels": {"istio.io/dataplane-mode": "none"}}}
    )
    n.wait(lambda: n.enrolled() == {f"{n.ns}/a"}, "watch resumed", timeout=60)
    # restart: pins adopted, state from a fresh list
    slots = {k: v["slot"] for k, v in n.status()["datapath"]["pods"].items()}
    n.stop_agent()
    n.start_agent()
    n.wait(lambda: n.enrolled() == {f"{n.ns}/a"}, "re-enrolled after restart")
    assert {k: v["slot"] for k, v in n.status()["datapath"]["pods"].items()} == slots


def test_bad_policy_and_uncapturable_pod_are_reported(kube_node: KubeNode) -> None:
    n = kube_node
    n.core.patch_namespace(n.ns, {"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}})
    n.add_pod("a")
    n.add_pod("b")
    # an API pod on this node with no cgroup or netns here: cannot be captured
    n.core.create_namespaced_pod(
        n.ns,
        {
            "metadata": {"name": "ghost"},
            "spec": {"nodeName": "n1", "containers": [{"name": "app", "image": "stand-in"}]},
        },
    )
    n.core.patch_namespaced_pod_status(
        "ghost",
        n.ns,
        {"status": {"phase": "Running", "podIP": "10.10.1.250", "podIPs": [{"ip": "10.10.1.250"}]}},
    )
    n.custom.create_namespaced_custom_object(
        "security.istio.io",
        "v1",
        n.ns,
        "authorizationpolicies",
        {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "custom-ext", "namespace": n.ns},
            "spec": {"action": "CUSTOM", "provider": {"name": "ext"}, "rules": [{}]},
        },
    )
    n.start_agent()
    n.wait(lambda: {f"{n.ns}/a", f"{n.ns}/b"} <= n.enrolled(), "good pods enrolled")
    n.wait(lambda: f"{n.ns}/ghost" in n.status()["pod_errors"], "ghost reported")
    assert "cgroup" in n.status()["pod_errors"][f"{n.ns}/ghost"]
    n.wait(lambda: n.annotation("ghost") == "failed", "failed annotation")
    events = n.core.list_namespaced_event(n.ns).items
    assert any(
        e.reason == "TetherCaptureFailed" and e.involved_object.name == "ghost" for e in events
    )
    dump = json.dumps(n.status()["policies"])
    assert "custom-ext" in dump and "CUSTOM" in dump
    r, path = n.connect("a", "b")
    assert r["ok"] and path[1] == "captured"


def test_waypoint_configuration_is_reported_as_what_is_true(kube_node: KubeNode) -> None:
    """A namespace and a service that ask for a waypoint, its Gateway (class
    istio-waypoint, no pods yet) and an HTTPRoute: /config_dump lists the
    waypoint and each use resolved to it, its service traffic refused until
    it has an address (never sent around it); the HTTPRoute is still reported
    as not applied.  The service's pod is guarded: a direct connection to it
    skips the waypoint and is refused, until the service opts out."""
    n = kube_node
    n.core.patch_namespace(
        n.ns,
        {
            "metadata": {
                "labels": {
                    "istio.io/dataplane-mode": "ambient",
                    "istio.io/use-waypoint": "waypoint",
                }
            }
        },
    )
    n.add_pod("a")
    n.add_pod("b")
    n.core.create_namespaced_service(
        n.ns,
        {
            "metadata": {"name": "b", "labels": {"istio.io/use-waypoint": "waypoint"}},
            "spec": {"selector": {"app": "b"}, "ports": [{"port": 8080}]},
        },
    )
    gw = "gateway.networking.k8s.io"
    n.custom.create_namespaced_custom_object(
        gw,
        "v1",
        n.ns,
        "gateways",
        {
            "apiVersion": f"{gw}/v1",
            "kind": "Gateway",
            "metadata": {"name": "waypoint", "labels": {"istio.io/waypoint-for": "service"}},
            "spec": {
                "gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            },
        },
    )
    n.custom.create_namespaced_custom_object(
        gw,
        "v1",
        n.ns,
        "httproutes",
        {
            "apiVersion": f"{gw}/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "b-v1"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "b"}],
                "rules": [{"backendRefs": [{"name": "b", "port": 8080}]}],
            },
        },
    )
    n.start_agent()
    n.wait(lambda: {f"{n.ns}/a", f"{n.ns}/b"} <= n.enrolled(), "pods enrolled")

    def reported() -> bool:
        uses = {(u["scope"], u["name"]) for u in n.status()["waypoint_uses"]}
        return {("namespace", n.ns), ("service", f"{n.ns}/b")} <= uses

    n.wait(reported, "waypoint uses reported")
    st = n.status()
    # this namespace's (other modules may leave Gateways in theirs)
    (wp,) = [w for w in st["waypoints"] if w["name"].startswith(f"{n.ns}/")]
    assert wp["name"] == f"{n.ns}/waypoint" and wp["addresses"] == [] and wp["for"] == "service"
    assert wp["identity"] == f"spiffe://cluster.local/ns/{n.ns}/sa/waypoint"
    assert wp["guards"] == [f"{n.ns}/b"]
    uses = {u["scope"]: u for u in st["waypoint_uses"]}
    assert all(u["resolved"] == f"{n.ns}/waypoint" for u in uses.values())
    assert "which has no address yet: refused" in uses["service"]["status"]
    assert "workload traffic goes direct" in uses["namespace"]["status"]
    skipped = json.dumps(st["policies"])
    assert f"HTTPRoute {n.ns}/b-v1" in skipped and "not applied" in skipped
    assert f"Gateway {n.ns}/waypoint" not in skipped  # it is a waypoint now
    log = (n.dir / "agent.log").read_text()
    assert f"uses waypoint waypoint: service traffic goes through waypoint {n.ns}/waypoint" in log
    r, path = n.connect("a", "b")
    assert not r["ok"], (r, path)
    refused = [c for c in n.status()["connections"]["closed"] if c["pod"] == f"{n.ns}/b"]
    assert refused and refused[-1]["response_flag"] == "DENY"
    assert "waypoint bypass" in refused[-1]["error"], refused[-1]
    n.core.patch_namespaced_service(
        "b", n.ns, {"metadata": {"labels": {"istio.io/use-waypoint": "none"}}}
    )
    n.wait(lambda: n.status()["waypoints"][0]["guards"] == [], "service b opted out")
    r, path = n.connect("a", "b")
    assert r["ok"] and path == ("captured", "captured"), (r, path)
