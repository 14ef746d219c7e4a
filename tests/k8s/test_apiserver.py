"""Smoke tests of the k8s tier's control plane itself (no agent yet).

They check that the real kube-apiserver + etcd do what the agent's tests will
rely on: kubelet-style pod status writes, Services with cluster IPs from
10.96.0.0/16, EndpointSlices, Istio/Gateway API custom objects, list+watch
from a resourceVersion, 410 Gone after etcd compaction, TokenRequest +
TokenReview (with the pod/node binding the CA needs), RBAC for the agent's
user, and an API server outage and return.
"""

from __future__ import annotations

import threading
import time
import urllib.error
from typing import Any

import pytest

from tests.k8s.cluster import AGENT_USER, Cluster

kubernetes = pytest.importorskip("kubernetes")
from kubernetes import client, watch  # noqa: E402

NODE = "tether-node-a"
AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def core(c: Cluster) -> Any:
    return client.CoreV1Api(c.api_client())


def make_pod(
    c: Cluster,
    ns: str,
    name: str,
    ip: str,
    sa: str | None = None,
    labels: dict[str, str] | None = None,
) -> Any:
    """Create a pod bound to NODE, then set its IPs as the kubelet would."""
    api = core(c)
    spec: dict[str, Any] = {
        "nodeName": NODE,
        "containers": [{"name": "app", "image": "registry.invalid/app:1"}],
    }
    if sa:
        spec["serviceAccountName"] = sa
    api.create_namespaced_pod(
        ns, {"metadata": {"name": name, "labels": labels or {}}, "spec": spec}
    )
    # Status subresource: read-modify-PUT, like a kubelet status update. Done on
    # the JSON form: the client's model field names differ between releases
    # (pod_i_ps before kubernetes 37, pod_ips since).
    body = as_json(c, api.read_namespaced_pod_status(name, ns))
    body["status"].update(
        {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "192.0.2.10",
            "hostIPs": [{"ip": "192.0.2.10"}],
            "conditions": [{"type": "Ready", "status": "True"}],
        }
    )
    return api.replace_namespaced_pod_status(name, ns, body)


def as_json(c: Cluster, obj: Any) -> Any:
    return c.api_client().sanitize_for_serialization(obj)


def test_version_and_readyz(k8s_cluster: Cluster) -> None:
    assert k8s_cluster.raw("GET", "/readyz") == "ok"
    v = k8s_cluster.raw("GET", "/version")
    assert v["gitVersion"].startswith("v1."), v
    # The kubernetes client sees the same server.
    assert client.VersionApi(k8s_cluster.api_client()).get_code().git_version == v["gitVersion"]
    # The kubeconfig files load with the client's own loader (as the agent will).
    from kubernetes import config

    for kc in (k8s_cluster.admin_kubeconfig(), k8s_cluster.agent_kubeconfig()):
        api = config.new_client_from_config(config_file=str(kc))
        assert client.VersionApi(api).get_code().git_version == v["gitVersion"]


def test_enrolled_namespace_pod_service_slice_policy_and_watch(
    k8s_cluster: Cluster, k8s_namespace: str
) -> None:
    ns = k8s_namespace
    api = core(k8s_cluster)
    ns_obj = api.read_namespace(ns)
    ns_obj.metadata.labels = {**(ns_obj.metadata.labels or {}), **AMBIENT}
    api.replace_namespace(ns, ns_obj)
    assert api.read_namespace(ns).metadata.labels["istio.io/dataplane-mode"] == "ambient"
    enrolled = api.list_namespace(label_selector="istio.io/dataplane-mode=ambient")
    assert ns in [n.metadata.name for n in enrolled.items]

    # List, remember the resourceVersion, then change things.
    pods = api.list_namespaced_pod(ns)
    assert pods.items == []
    rv0 = pods.metadata.resource_version
    custom = client.CustomObjectsApi(k8s_cluster.api_client())
    aps = custom.list_namespaced_custom_object(
        "security.istio.io", "v1", ns, "authorizationpolicies"
    )
    ap_rv0 = aps["metadata"]["resourceVersion"]

    pod = make_pod(k8s_cluster, ns, "web-0", "10.244.1.5", labels={"app": "web"})
    assert pod.spec.node_name == NODE
    assert pod.status.pod_ip == "10.244.1.5"
    assert as_json(k8s_cluster, pod)["status"]["podIPs"] == [{"ip": "10.244.1.5"}]
    # ServiceAccount admission is on, as on a real cluster.
    assert pod.spec.service_account_name == "default"

    # Field selector on nodeName: what a node agent watches for its own pods.
    mine = api.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={NODE}")
    assert (ns, "web-0") in [(p.metadata.namespace, p.metadata.name) for p in mine.items]

    svc = api.create_namespaced_service(
        ns,
        {
            "metadata": {"name": "web"},
            "spec": {
                "selector": {"app": "web"},
                "ports": [{"name": "http", "port": 80, "targetPort": 8080}],
            },
        },
    )
    import ipaddress

    assert ipaddress.ip_address(svc.spec.cluster_ip) in ipaddress.ip_network("10.96.0.0/16")

    disc = client.DiscoveryV1Api(k8s_cluster.api_client())
    disc.create_namespaced_endpoint_slice(
        ns,
        {
            "metadata": {"name": "web-abc12", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {
                    "addresses": ["10.244.1.5"],
                    "nodeName": NODE,
                    "conditions": {"ready": True},
                    "targetRef": {
                        "kind": "Pod",
                        "namespace": ns,
                        "name": "web-0",
                        "uid": pod.metadata.uid,
                    },
                }
            ],
        },
    )
    slices = disc.list_namespaced_endpoint_slice(
        ns, label_selector="kubernetes.io/service-name=web"
    )
    assert [e.addresses for e in slices.items[0].endpoints] == [["10.244.1.5"]]

    ap = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "allow-frontend"},
        "spec": {
            "selector": {"matchLabels": {"app": "web"}},
            "action": "ALLOW",
            "rules": [
                {"from": [{"source": {"principals": ["cluster.local/ns/frontend/sa/frontend"]}}]}
            ],
        },
    }
    custom.create_namespaced_custom_object(
        "security.istio.io", "v1", ns, "authorizationpolicies", ap
    )
    # Served as v1beta1 too (same schema, no conversion).
    got = custom.get_namespaced_custom_object(
        "security.istio.io", "v1beta1", ns, "authorizationpolicies", "allow-frontend"
    )
    assert got["spec"]["action"] == "ALLOW"
    # Unknown fields survive (preserve-unknown-fields): tether must judge them itself.
    ap2 = {
        **ap,
        "metadata": {"name": "custom-action"},
        "spec": {
            "action": "CUSTOM",
            "provider": {"name": "ext-authz"},
            "rules": [{"when": [{"key": "request.weird", "values": ["x"]}]}],
        },
    }
    custom.create_namespaced_custom_object(
        "security.istio.io", "v1", ns, "authorizationpolicies", ap2
    )

    # Watch from the list's resourceVersion: every change since then is replayed.
    w = watch.Watch()
    events = []
    for ev in w.stream(api.list_namespaced_pod, ns, resource_version=rv0, timeout_seconds=3):
        o = ev["object"]
        events.append((ev["type"], o.metadata.name, o.status.pod_ip))
        if ev["type"] == "MODIFIED" and o.status.pod_ip:
            w.stop()
    assert events[0] == ("ADDED", "web-0", None)
    assert ("MODIFIED", "web-0", "10.244.1.5") in events

    w = watch.Watch()
    seen = []
    for ev in w.stream(
        custom.list_namespaced_custom_object,
        "security.istio.io",
        "v1",
        ns,
        "authorizationpolicies",
        resource_version=ap_rv0,
        timeout_seconds=3,
    ):
        seen.append((ev["type"], ev["object"]["metadata"]["name"]))
        if len(seen) == 2:
            w.stop()
    assert seen == [("ADDED", "allow-frontend"), ("ADDED", "custom-action")]


def test_live_watch_sees_label_change(k8s_cluster: Cluster, k8s_namespace: str) -> None:
    """A watch opened before a change delivers it (what enrollment relies on)."""
    api = core(k8s_cluster)
    rv = api.read_namespace(k8s_namespace).metadata.resource_version
    got: list[tuple[str, dict[str, str]]] = []
    w = watch.Watch()

    def run() -> None:
        for ev in w.stream(
            api.list_namespace,
            field_selector=f"metadata.name={k8s_namespace}",
            resource_version=rv,
            timeout_seconds=10,
        ):
            got.append((ev["type"], dict(ev["object"].metadata.labels or {})))
            w.stop()

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.5)
    t0 = time.monotonic()
    ns_obj = api.read_namespace(k8s_namespace)
    ns_obj.metadata.labels = {**(ns_obj.metadata.labels or {}), **AMBIENT}
    api.replace_namespace(k8s_namespace, ns_obj)
    t.join(15)
    latency = time.monotonic() - t0
    assert got and got[0][0] == "MODIFIED"
    assert got[0][1]["istio.io/dataplane-mode"] == "ambient"
    assert latency < 5, latency


def watch_status(api: Any, ns: str, rv: str) -> Any:
    """Watch config maps from rv for a second: the event types, or the ApiException status."""
    try:
        return [
            e["type"]
            for e in watch.Watch().stream(
                api.list_namespaced_config_map, ns, resource_version=rv, timeout_seconds=1
            )
        ]
    except client.ApiException as e:
        return e.status


def test_gone_after_compaction_and_restart(
    k8s_cluster_running: Cluster, k8s_namespace: str
) -> None:
    c, ns = k8s_cluster_running, k8s_namespace
    api = core(c)
    api.create_namespaced_config_map(ns, {"metadata": {"name": "c"}, "data": {"n": "0"}})
    old_rv = api.list_namespaced_config_map(ns).metadata.resource_version
    for i in range(1, 6):
        cm = api.read_namespaced_config_map("c", ns)
        cm.data = {"n": str(i)}
        api.replace_namespaced_config_map("c", ns, cm)

    rev = c.compact()
    assert rev > int(old_rv)
    # An exact-RV list for a compacted revision: 410 Gone, once the API
    # server's watch cache has seen the compaction (it polls every 15s).
    deadline, status = time.monotonic() + 30, None
    while time.monotonic() < deadline:
        try:
            api.list_namespaced_config_map(
                ns, resource_version=old_rv, resource_version_match="Exact"
            )
        except client.ApiException as e:
            status = e.status
            break
        time.sleep(0.5)
    assert status == 410

    # The watch cache still holds the events after old_rv: a watch resumes fine.
    assert watch_status(api, ns, old_rv) == ["MODIFIED"] * 5

    # After an API server restart the cache starts at the current revision: a
    # watch from old_rv gets 410 ("too old resource version"). The kubernetes
    # client raises ApiException(410) for the ERROR event when timeout_seconds
    # is set (otherwise it retries once from the last RV it saw).
    c.restart_apiserver()
    assert watch_status(api, ns, old_rv) == 410

    # Relist, then watch from the fresh RV: the recovery an informer does.
    fresh = api.list_namespaced_config_map(ns)
    assert fresh.items[0].data == {"n": "5"}
    assert watch_status(api, ns, fresh.metadata.resource_version) == []


def test_token_request_and_review(k8s_cluster: Cluster, k8s_namespace: str) -> None:
    ns = k8s_namespace
    api = core(k8s_cluster)
    api.create_namespaced_service_account(ns, {"metadata": {"name": "app"}})
    pod = make_pod(k8s_cluster, ns, "app-0", "10.244.1.6", sa="app")
    authn = client.AuthenticationV1Api(k8s_cluster.api_client())

    def review(token: str, audiences: list[str] | None = None) -> Any:
        spec: dict[str, Any] = {"token": token}
        if audiences:
            spec["audiences"] = audiences
        return authn.create_token_review({"spec": spec}).status

    plain = k8s_cluster.service_account_token(ns, "app")
    st = review(plain)
    assert st.authenticated is True, st
    assert st.user.username == f"system:serviceaccount:{ns}:app"
    assert f"system:serviceaccounts:{ns}" in st.user.groups

    # Pod-bound token with a custom audience (what a node agent presents to the CA).
    bound = k8s_cluster.service_account_token(
        ns, "app", audiences=["istio-ca"], bound_pod=("app-0", pod.metadata.uid)
    )
    st = review(bound, ["istio-ca"])
    assert st.authenticated is True, st
    assert st.audiences == ["istio-ca"]
    extra = st.user.extra or {}
    assert extra.get("authentication.kubernetes.io/pod-name") == ["app-0"]
    assert extra.get("authentication.kubernetes.io/pod-uid") == [pod.metadata.uid]
    assert extra.get("authentication.kubernetes.io/node-name") == [NODE], extra

    # Wrong audience and a tampered token are rejected.
    assert review(bound, ["some-other-audience"]).authenticated is not True
    assert review(plain[:-4] + "AAAA").authenticated is not True

    # Deleting the pod invalidates the pod-bound token (there is no kubelet, so
    # delete with grace 0; the authenticator's view of pods and its 10s
    # token cache can lag, hence the wait).
    api.delete_namespaced_pod("app-0", ns, grace_period_seconds=0)
    deadline = time.monotonic() + 20
    while review(bound, ["istio-ca"]).authenticated is True:
        assert time.monotonic() < deadline, "pod-bound token still valid 20s after pod deletion"
        time.sleep(0.5)


def test_agent_user_rbac_least_privilege(k8s_cluster: Cluster) -> None:
    agent = client.CoreV1Api(k8s_cluster.agent_api_client())
    with pytest.raises(client.ApiException) as e:
        agent.list_pod_for_all_namespaces()
    assert e.value.status == 403
    assert AGENT_USER in str(e.value.body)

    rbac = client.RbacAuthorizationV1Api(k8s_cluster.api_client())
    name = "tether-test-pod-reader"
    applied = k8s_cluster.apply_rbac(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": [
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": name,
            },
            "subjects": [
                {"kind": "ServiceAccount", "namespace": "tether-system", "name": "tether"}
            ],
        },
    )
    assert applied == [f"ClusterRole/{name}", f"ClusterRoleBinding/{name}"]
    try:
        deadline = time.monotonic() + 10
        while True:  # the RBAC authorizer's informer catches up asynchronously
            try:
                agent.list_pod_for_all_namespaces()
                break
            except client.ApiException as e2:
                if e2.status != 403 or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with pytest.raises(client.ApiException) as e:
            agent.list_secret_for_all_namespaces()
        assert e.value.status == 403
    finally:
        rbac.delete_cluster_role_binding(name)
        rbac.delete_cluster_role(name)


def test_apiserver_outage_and_return(k8s_cluster_running: Cluster, k8s_namespace: str) -> None:
    c = k8s_cluster_running
    api = core(c)
    api.create_namespaced_config_map(k8s_namespace, {"metadata": {"name": "survives"}})
    t0 = time.monotonic()
    c.stop_apiserver()
    stopped = time.monotonic() - t0
    with pytest.raises((urllib.error.URLError, OSError)):
        c.raw("GET", "/readyz", timeout=2)
    t0 = time.monotonic()
    c.start_apiserver()
    started = time.monotonic() - t0
    assert api.read_namespaced_config_map("survives", k8s_namespace).metadata.name == "survives"
    print(f"apiserver stop {stopped:.1f}s, restart to /readyz {started:.1f}s")
