"""The mesh from the Kubernetes API: Namespaces, Pods, Services, Istio
AuthorizationPolicy and PeerAuthentication, turned into the same Snapshot the
local file gives (agent.model), so the agent's reconcile does not care where
state came from.

Destinations: Services with their EndpointSlices (ready endpoints, named
target ports resolved); a Service without slices falls back to its selector.

Each resource is a list-then-watch loop on its own thread (the `kubernetes`
client is synchronous): watches resume from the last resourceVersion, a 410
Gone relists, errors back off (1 s doubling to 30 s), and while the API
server is unreachable the agent keeps enforcing the last state it had.
Every change schedules one snapshot for the agent (debounced), never a
partial one.  The source also writes back what the agent did: the pod
annotation `ambient.istio.io/redirection` (as Istio's CNI does) and Events
for pods that could not be captured.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from agent.model import (
    FOR_VALUES,
    GATEWAY_NAME_LABEL,
    WAYPOINT_CLASS,
    WAYPOINT_FOR,
    Endpoint,
    Service,
    ServicePort,
    Snapshot,
    Waypoint,
    Workload,
    norm_ip,
)
from agent.sources import podfs

log = logging.getLogger(__name__)

REDIRECTION = "ambient.istio.io/redirection"
EXCLUDE_IN = "traffic.sidecar.istio.io/excludeInboundPorts"
EXCLUDE_OUT = "traffic.sidecar.istio.io/excludeOutboundPorts"
EXCLUDE_OUT_CIDR = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
WATCH_TIMEOUT = 300
BACKOFF_MAX = 30.0
DEBOUNCE = 0.05
MISSING_RECHECK = 30.0  # seconds between looks for a CRD that was not installed
# Istio's older name for GATEWAY_NAME_LABEL on gateway pods
OLD_GATEWAY_NAME_LABEL = "istio.io/gateway-name"
SERVICE_ACCOUNT_ANNOTATION = "gateway.istio.io/service-account"


def api_client(kubeconfig: str | None = None) -> client.ApiClient:
    """A kubeconfig when given, else in-cluster credentials, else ~/.kube/config."""
    if kubeconfig:
        config.load_kube_config(kubeconfig)
    else:
        try:
            config.load_incluster_config()
        except config.ConfigException:
            config.load_kube_config()
    return client.ApiClient()


@dataclasses.dataclass(frozen=True)
class Kind:
    name: str
    list_fn: Callable[..., Any]
    custom: tuple[str, str, str] | None = None  # group, version, plural


class KubeSource:
    """Watches the API and calls `on_snapshot(Snapshot)` on the agent's loop."""

    def __init__(
        self,
        node: str,
        api: client.ApiClient | None = None,
        kubeconfig: str | None = None,
        cgroup_root: Any = None,
    ) -> None:
        self.api = api or api_client(kubeconfig)
        self.core = client.CoreV1Api(api)
        self.discovery = client.DiscoveryV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.node = node
        self.cgroup_root = cgroup_root
        self.objects: dict[str, dict[str, dict[str, Any]]] = {}
        self.synced: set[str] = set()
        self.kinds = [
            Kind("namespaces", self.core.list_namespace),
            Kind("pods", self.core.list_pod_for_all_namespaces),
            Kind("services", self.core.list_service_for_all_namespaces),
            Kind("endpointslices", self.discovery.list_endpoint_slice_for_all_namespaces),
            Kind(
                "authorizationpolicies",
                self.custom.list_cluster_custom_object,
                ("security.istio.io", "v1", "authorizationpolicies"),
            ),
            Kind(
                "peerauthentications",
                self.custom.list_cluster_custom_object,
                ("security.istio.io", "v1", "peerauthentications"),
            ),
            # Gateways of class istio-waypoint are waypoints; other Gateways and
            # HTTPRoutes go on as documents (reported, for the L7 translation).
            Kind(
                "gateways",
                self.custom.list_cluster_custom_object,
                ("gateway.networking.k8s.io", "v1", "gateways"),
            ),
            Kind(
                "httproutes",
                self.custom.list_cluster_custom_object,
                ("gateway.networking.k8s.io", "v1", "httproutes"),
            ),
        ]
        self.missing: dict[str, str] = {}  # kind -> why it is absent (CRD not installed)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: asyncio.Handle | None = None
        self._on_snapshot: Callable[[Snapshot], None] | None = None
        self.errors: dict[str, str] = {}  # kind -> last watch error
        self._annotated: dict[str, str] = {}

    # -- lifecycle -------------------------------------------------------------

    def start(
        self, loop: asyncio.AbstractEventLoop, on_snapshot: Callable[[Snapshot], None]
    ) -> None:
        self._loop = loop
        self._on_snapshot = on_snapshot
        for kind in self.kinds:
            t = threading.Thread(
                target=self._run, args=(kind,), name=f"watch-{kind.name}", daemon=True
            )
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        self._stop.set()

    def ready(self) -> bool:
        return len(self.synced) == len(self.kinds)

    # -- watch loops ---------------------------------------------------------------

    def _list(self, kind: Kind, **kw: Any) -> Any:
        if kind.custom:
            g, v, p = kind.custom
            return kind.list_fn(g, v, p, **kw)
        return kind.list_fn(**kw)

    def _run(self, kind: Kind) -> None:
        backoff = 1.0
        rv: str | None = None
        while not self._stop.is_set():
            try:
                if rv is None:
                    rv = self._relist(kind)
                    if rv is None:  # the kind's CRD is not installed: look again later
                        self._stop.wait(MISSING_RECHECK)
                        continue
                w = watch.Watch()
                for ev in w.stream(
                    self._list_raw(kind),
                    resource_version=rv,
                    timeout_seconds=WATCH_TIMEOUT,
                    allow_watch_bookmarks=True,
                ):
                    if self._stop.is_set():
                        w.stop()
                        return
                    obj = ev["raw_object"]
                    rv = obj.get("metadata", {}).get("resourceVersion", rv)
                    if ev["type"] == "BOOKMARK":
                        continue
                    if ev["type"] == "ERROR":
                        if obj.get("code") == 410:
                            log.info("%s: watch expired (410 Gone), relisting", kind.name)
                            rv = None
                            break
                        raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                    self._apply(kind.name, ev["type"], obj)
                backoff = 1.0
            except ApiException as e:
                if e.status == 410:
                    log.info("%s: resourceVersion too old (410 Gone), relisting", kind.name)
                    rv = None
                    continue
                if e.status == 404 and kind.custom is not None:
                    rv = None  # its CRD went away: the relist reports it missing
                self._failed(kind, e, backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)
            except Exception as e:  # connection refused, timeouts, decode errors
                self._failed(kind, e, backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    def _list_raw(self, kind: Kind) -> Callable[..., Any]:
        """A list function returning raw JSON for watch.stream (no model decoding)."""

        def fn(**kw: Any) -> Any:
            return self._list(kind, **kw)

        fn.__doc__ = kind.list_fn.__doc__  # watch.stream reads the return type from it
        return fn

    def _failed(self, kind: Kind, e: Exception, backoff: float) -> None:
        msg = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        if self.errors.get(kind.name) != msg:
            log.warning(
                "%s watch failed (%s); keeping the last known state, retrying in %.0f s",
                kind.name,
                msg,
                backoff,
            )
        self.errors[kind.name] = msg
        self._stop.wait(backoff)

    def _relist(self, kind: Kind) -> str | None:
        """List the kind and replace what we hold of it; its resourceVersion.
        None when the kind is a custom resource whose CRD is not installed:
        that counts as synced and empty (a cluster without the Gateway API
        or without Istio's CRDs still enrolls pods), and is reported."""
        try:
            resp = self._list(kind, _preload_content=False, timeout_seconds=60)
        except ApiException as e:
            if e.status != 404 or kind.custom is None:
                raise
            g, v, p = kind.custom
            why = (
                f"{p}.{g}/{v} is not served by this API server (CRD not installed); "
                f"treated as empty, checked again every {MISSING_RECHECK:.0f} s"
            )
            if self.missing.get(kind.name) != why:
                log.warning("%s", why)
            with self._lock:
                self.objects[kind.name] = {}
                self.synced.add(kind.name)
            self.missing[kind.name] = why
            self.errors.pop(kind.name, None)
            self._schedule()
            return None
        import json

        data = json.loads(resp.data)
        items = {self._key(o): o for o in data.get("items", [])}
        with self._lock:
            self.objects[kind.name] = items
            self.synced.add(kind.name)
        self.errors.pop(kind.name, None)
        self.missing.pop(kind.name, None)
        self._schedule()
        rv: str = data.get("metadata", {}).get("resourceVersion", "")
        return rv

    @staticmethod
    def _key(o: dict[str, Any]) -> str:
        m = o.get("metadata", {})
        return f"{m.get('namespace', '')}/{m.get('name', '')}"

    def _apply(self, kind: str, typ: str, obj: dict[str, Any]) -> None:
        with self._lock:
            objs = self.objects.setdefault(kind, {})
            if typ == "DELETED":
                objs.pop(self._key(obj), None)
            else:
                objs[self._key(obj)] = obj
        self._schedule()

    def _schedule(self) -> None:
        loop = self._loop
        if loop is None or not self.ready():
            return

        def fire() -> None:
            self._pending = None
            if self._on_snapshot is not None:
                self._on_snapshot(self.snapshot())

        def arm() -> None:
            if self._pending is None:
                self._pending = loop.call_later(DEBOUNCE, fire)

        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(arm)

    # -- model ---------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        with self._lock:
            objs = {k: list(v.values()) for k, v in self.objects.items()}
        namespaces = {
            o["metadata"]["name"]: dict(o["metadata"].get("labels") or {})
            for o in objs.get("namespaces", [])
        }
        workloads = [w for w in (self._workload(p) for p in objs.get("pods", [])) if w]
        slices: dict[str, list[dict[str, Any]]] = {}
        for sl in objs.get("endpointslices", []):
            svc = (sl["metadata"].get("labels") or {}).get("kubernetes.io/service-name")
            if svc:
                slices.setdefault(f"{sl['metadata']['namespace']}/{svc}", []).append(sl)
        services = [s for s in (self._service(o, slices) for o in objs.get("services", [])) if s]
        policies = tuple(
            {**o, "kind": kind}
            for plural, kind in (
                ("authorizationpolicies", "AuthorizationPolicy"),
                ("peerauthentications", "PeerAuthentication"),
                ("gateways", "Gateway"),
                ("httproutes", "HTTPRoute"),
            )
            for o in objs.get(plural, [])
            if not (plural == "gateways" and _is_waypoint(o))
        )
        local_netns = {
            (w.namespace, w.name): w.netns for w in workloads if w.node == self.node and w.netns
        }
        waypoints = waypoints_of(
            objs.get("gateways", []), objs.get("pods", []), local_netns, self.node
        )
        return Snapshot(
            self.node, namespaces, tuple(workloads), tuple(services), policies, waypoints
        )

    def _workload(self, pod: dict[str, Any]) -> Workload | None:
        meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
        if status.get("phase") in ("Succeeded", "Failed") or spec.get("hostNetwork"):
            return None
        ips = tuple(p["ip"] for p in status.get("podIPs") or [] if p.get("ip"))
        if not ips and status.get("podIP"):
            ips = (status["podIP"],)
        if not ips:
            return None
        ann = meta.get("annotations") or {}
        node = spec.get("nodeName", "")
        netns = cgroup = None
        if node == self.node:
            try:
                paths = podfs.find(meta["uid"], self.cgroup_root)
                netns, cgroup = paths.netns, paths.cgroup
            except podfs.PodNotFound as e:
                log.debug("%s", e)

        def ints(v: str) -> tuple[int, ...]:
            return tuple(int(x) for x in v.split(",") if x.strip().isdigit())

        return Workload(
            name=meta["name"],
            namespace=meta["namespace"],
            service_account=spec.get("serviceAccountName") or "default",
            node=node,
            addresses=ips,
            labels=dict(meta.get("labels") or {}),
            netns=netns,
            cgroup=cgroup,
            exclude_inbound_ports=ints(ann.get(EXCLUDE_IN, "")),
            exclude_outbound_ports=ints(ann.get(EXCLUDE_OUT, "")),
            exclude_outbound_cidrs=tuple(
                x.strip()
                for x in ann.get(EXCLUDE_OUT_CIDR, "").split(",")
                if x.strip() and x.strip() != "*"
            ),
        )

    @staticmethod
    def _service(o: dict[str, Any], slices: dict[str, list[dict[str, Any]]]) -> Service | None:
        spec = o.get("spec", {})
        ips = tuple(
            i for i in spec.get("clusterIPs") or [spec.get("clusterIP")] if i and i != "None"
        )
        key = f"{o['metadata']['namespace']}/{o['metadata']['name']}"
        if not ips or (not spec.get("selector") and key not in slices):
            return None
        ports = []
        for p in spec.get("ports") or []:
            if p.get("protocol", "TCP") != "TCP":
                continue
            target = p.get("targetPort", p["port"])
            # a named targetPort would need the pods' container ports; use the port
            # a named targetPort is resolved per endpoint from the EndpointSlices
            ports.append(
                ServicePort(
                    p["port"], target if isinstance(target, int) else p["port"], p.get("name") or ""
                )
            )
        endpoints: tuple[Endpoint, ...] | None = None
        if key in slices:
            eps = []
            for sl in slices[key]:
                named = {
                    p.get("name") or "": p["port"]
                    for p in sl.get("ports") or []
                    if p.get("port") is not None and p.get("protocol", "TCP") == "TCP"
                }
                for e in sl.get("endpoints") or []:
                    if (e.get("conditions") or {}).get("ready") is False:
                        continue
                    eps += [Endpoint(a, named) for a in e.get("addresses") or []]
            endpoints = tuple(eps)
        return Service(
            o["metadata"]["name"],
            o["metadata"]["namespace"],
            ips,
            tuple(ports),
            dict(spec.get("selector") or {}),
            endpoints,
            labels=dict(o["metadata"].get("labels") or {}),
        )

    # -- writing back ----------------------------------------------------------------

    def report(self, key: str, state: str, message: str = "") -> None:
        """Record what the agent did with a local pod: the annotation
        (enabled | disabled | failed) and, on failure, an Event.  Runs on a
        thread; errors are logged, never raised into the agent."""
        if self._annotated.get(key) == state:
            return
        self._annotated[key] = state
        threading.Thread(target=self._write_back, args=(key, state, message), daemon=True).start()

    def _write_back(self, key: str, state: str, message: str) -> None:
        ns, name = key.split("/", 1)
        try:
            self.core.patch_namespaced_pod(
                name,
                ns,
                {
                    "metadata": {
                        "annotations": {REDIRECTION: None if state == "disabled" else state}
                    }
                },
            )
            if state == "failed":
                now = datetime.datetime.now(datetime.UTC)
                self.core.create_namespaced_event(
                    ns,
                    client.CoreV1Event(
                        metadata=client.V1ObjectMeta(generate_name=f"{name}.tether-"),
                        involved_object=client.V1ObjectReference(
                            kind="Pod", name=name, namespace=ns
                        ),
                        reason="TetherCaptureFailed",
                        message=message[:1000],
                        type="Warning",
                        first_timestamp=now,
                        last_timestamp=now,
                        count=1,
                        source=client.V1EventSource(component="tether", host=self.node),
                    ),
                )
        except ApiException as e:
            if e.status != 404:
                log.warning("cannot record %s on pod %s: %s", state, key, e.reason)
        except Exception as e:
            log.warning("cannot record %s on pod %s: %s", state, key, e)

    def gateway_event(self, namespace: str, name: str, reason: str, message: str) -> None:
        """A Warning Event on a waypoint Gateway (its Envoy rejected the
        configuration this node pushed).  On a thread; never raises."""
        threading.Thread(
            target=self._gateway_event, args=(namespace, name, reason, message), daemon=True
        ).start()

    def _gateway_event(self, namespace: str, name: str, reason: str, message: str) -> None:
        now = datetime.datetime.now(datetime.UTC)
        try:
            gw: Any = self.custom.get_namespaced_custom_object(
                "gateway.networking.k8s.io", "v1", namespace, "gateways", name
            )
            self.core.create_namespaced_event(
                namespace,
                client.CoreV1Event(
                    metadata=client.V1ObjectMeta(generate_name=f"{name}.tether-"),
                    involved_object=client.V1ObjectReference(
                        api_version="gateway.networking.k8s.io/v1",
                        kind="Gateway",
                        name=name,
                        namespace=namespace,
                        uid=gw["metadata"]["uid"],
                    ),
                    reason=reason,
                    message=message[:1000],
                    type="Warning",
                    first_timestamp=now,
                    last_timestamp=now,
                    count=1,
                    source=client.V1EventSource(component="tether", host=self.node),
                ),
            )
        except Exception as e:
            log.warning("cannot record %s on Gateway %s/%s: %s", reason, namespace, name, e)

    def describe(self) -> dict[str, Any]:
        return {
            "synced": sorted(self.synced),
            "errors": dict(self.errors),
            "missing": dict(self.missing),
            "objects": {k: len(v) for k, v in self.objects.items()},
            "at": time.time(),
        }


def _is_waypoint(gw: dict[str, Any]) -> bool:
    return bool((gw.get("spec") or {}).get("gatewayClassName") == WAYPOINT_CLASS)


def _running(pod: dict[str, Any]) -> bool:
    """A waypoint pod its node's agent serves (xDS): running with an IP, not
    being deleted.  Readiness is not asked: the pod becomes Ready only once
    that agent has configured its Envoy."""
    status = pod.get("status") or {}
    if status.get("phase") in ("Succeeded", "Failed", "Pending"):
        return False
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    return bool(status.get("podIP") or status.get("podIPs"))


def _serving(pod: dict[str, Any]) -> bool:
    """A waypoint pod that can take traffic: running, not reported unready."""
    if not _running(pod):
        return False
    status = pod.get("status") or {}
    ready = [c for c in status.get("conditions") or [] if c.get("type") == "Ready"]
    return not (ready and ready[0].get("status") != "True")


def _ips(pod: dict[str, Any]) -> list[str]:
    status = pod.get("status") or {}
    ips = [p["ip"] for p in status.get("podIPs") or [] if p.get("ip")]
    return ips or ([status["podIP"]] if status.get("podIP") else [])


def waypoints_of(
    gateways: list[dict[str, Any]],
    pods: list[dict[str, Any]],
    local_netns: dict[tuple[str, str], str] | None = None,
    node: str = "",
) -> tuple[Waypoint, ...]:
    """Gateways of class istio-waypoint as Waypoints.  Addresses: the IPs of
    its Ready pods, found as Istio labels them (gateway.networking.k8s.io/gateway-name
    = the Gateway's name, in its namespace), else the Gateway's
    `status.addresses` (IPAddress entries: its Service's ClusterIP, which
    needs kube-proxy), which are also kept as `service_addresses`.  Node and
    service account come from its running pod; `istio.io/waypoint-for` on the
    Gateway (default service).  No address yet: traffic through it is
    refused until it has one.
    When that pod runs on ``node`` and its netns was found (``local_netns``,
    by (namespace, pod name)), the Waypoint names it and ``envoy_in_pod``:
    this node's agent serves its xDS socket; the pod runs Envoy itself."""
    pods_of: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for p in pods:
        meta = p.get("metadata") or {}
        labels = meta.get("labels") or {}
        gw_name = labels.get(GATEWAY_NAME_LABEL) or labels.get(OLD_GATEWAY_NAME_LABEL)
        if gw_name:
            pods_of.setdefault((meta.get("namespace", ""), gw_name), []).append(p)
    out = []
    for gw in gateways:
        if not _is_waypoint(gw):
            continue
        meta = gw.get("metadata") or {}
        ns, name = meta.get("namespace", ""), meta.get("name", "")
        labels = meta.get("labels") or {}
        traffic_for = labels.get(WAYPOINT_FOR, "service")
        if traffic_for not in FOR_VALUES:
            log.warning(
                "Gateway %s/%s: %s=%r is not one of %s; taken as service",
                ns,
                name,
                WAYPOINT_FOR,
                traffic_for,
                ", ".join(FOR_VALUES),
            )
            traffic_for = "service"
        status_ips = []
        for a in (gw.get("status") or {}).get("addresses") or []:
            if a.get("type", "IPAddress") != "IPAddress":
                continue  # a Hostname: not dialled by the node
            try:
                status_ips.append(norm_ip(str(a.get("value", ""))))
            except ValueError:
                continue
        running = sorted(  # Ready ones first, then by name
            (p for p in pods_of.get((ns, name), []) if _running(p)),
            key=lambda p: (not _serving(p), str(p["metadata"].get("name", ""))),
        )
        # dialled: the Ready pods; served (xDS) by their node's agent: the
        # running one, Ready or not (it is Ready once served: no deadlock)
        pod_ips = [ip for p in running if _serving(p) for ip in _ips(p)]
        first = running[0] if running else {}
        spec = first.get("spec") or {}
        first_meta = first.get("metadata") or {}
        netns = None
        if node and spec.get("nodeName") == node:
            netns = (local_netns or {}).get((ns, str(first_meta.get("name", ""))))
        account = spec.get("serviceAccountName") or (meta.get("annotations") or {}).get(
            SERVICE_ACCOUNT_ANNOTATION, ""
        )
        out.append(
            Waypoint(
                name=name,
                namespace=ns,
                addresses=tuple(pod_ips or status_ips),
                service_addresses=tuple(status_ips),
                node=str(spec.get("nodeName") or ""),
                service_account=str(account or ""),
                traffic_for=traffic_for,
                netns=netns,
                envoy_in_pod=netns is not None,
            )
        )
    return tuple(sorted(out, key=lambda w: w.key))
