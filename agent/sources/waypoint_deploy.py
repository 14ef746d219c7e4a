"""Waypoint lifecycle in Kubernetes: what istiod's deployment controller does
for Gateways of class ``istio-waypoint``, done by exactly one node agent.

tether has no central control plane, and every node runs an agent: so the
agents elect one writer through a ``coordination.k8s.io/v1`` Lease
(``LeaderElector``, client-go's algorithm: the holder renews every
``retry_period``; another agent takes over once it has seen the same record
unchanged for ``lease_duration`` by its own clock, so clock skew between
nodes does not matter; a leader that cannot renew for ``renew_deadline``
stops writing before anyone else may start; stepping down clears the holder
so a successor need not wait).

The leader (``WaypointDeployer``), for each istio-waypoint Gateway:

- checks it has the listener ``{name: mesh, port: 15008, protocol: HBONE}``;
  if not, writes ``Accepted=False`` (reason ``ListenersNotValid``, naming
  the fix) and deploys nothing;
- server-side applies (field manager ``tether-waypoint-deployer``) a
  ServiceAccount (only the default ``<name>``, not one named by the
  ``gateway.istio.io/service-account`` annotation), a Service and a
  Deployment, all named after the Gateway and owned by it
  (``ownerReferences`` with ``controller: true``, so deleting the Gateway
  lets the garbage collector remove them), labelled as Istio labels them;
- writes the Gateway's status: ``Accepted`` and ``Programmed`` with
  ``observedGeneration``, ``addresses`` = the Service's ClusterIPs (which
  the node agents dial, ``k8s.waypoints_of``), the ``mesh`` listener's status.

The waypoint pod contract (``pod_template``): the agent's own image runs
``tether waypoint-proxy --namespace NS --name NAME --xds-dir DIR``, which
execs Envoy with a bootstrap whose ADS server is the unix socket
``DIR/<ns>.<name>.sock`` (``waypoint.xds.socket_path``); ``DIR`` is the
node agent's ``<stateDir>/xds``, mounted from the host (hostPath) at the same
path.  Only the agent on the pod's node serves that socket, and it admits
only the pod's own processes (peer check by netns), never by a token.

Errors never leave this module: one bad Gateway is reported (log, status,
``describe()``) and the others proceed; API errors back off 1 s doubling to
30 s (the Lease is tried every ``retry_period`` regardless, as client-go
does).  Everything runs on two threads of its own (the ``kubernetes``
client is synchronous): the elector's and the reconciler's; every API call
is bounded (``TIMEOUT``).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import threading
import time
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from agent.model import GATEWAY_NAME_LABEL, WAYPOINT_CLASS

log = logging.getLogger(__name__)

LEASE_NAME = "tether-waypoint-deployer"
FIELD_MANAGER = "tether-waypoint-deployer"
GW_GROUP = "gateway.networking.k8s.io"
GW_VERSION = "v1"
OLD_GATEWAY_NAME_LABEL = "istio.io/gateway-name"
SERVICE_ACCOUNT_ANNOTATION = "gateway.istio.io/service-account"
MANAGED_LABEL = "gateway.istio.io/managed"
MANAGED_VALUE = "tether.io-waypoint-deployer"
DATAPLANE_MODE = "istio.io/dataplane-mode"
PROXY_CONTAINER = "istio-proxy"  # Istio's container name in waypoint pods
XDS_VOLUME = "tether-xds"
MESH_LISTENER = {"name": "mesh", "port": 15008, "protocol": "HBONE"}
STATUS_PORT = 15021
READY_PATH = "/healthz/ready"  # waypoint.envoy.READY_PATH (the contract test ties them)
BACKOFF_MAX = 30.0
# Every API call is bounded: a hung API server must not hold the Lease
# thread past the renew deadline, nor the agent's shutdown.
TIMEOUT = 10.0
T = {"_request_timeout": TIMEOUT}
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _stamp(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro(t: datetime.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _short(e: BaseException) -> str:
    if isinstance(e, ApiException):
        return f"API {e.status} {e.reason}"
    text = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {text}"[:300]


# --------------------------------------------------------------------------- Lease


@dataclasses.dataclass(frozen=True)
class LeaseTiming:
    """client-go's defaults (kube-controller-manager uses the same)."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0


class LeaderElector:
    """One holder of a Lease among many agents; ``leading()`` is the answer."""

    def __init__(
        self,
        coord: Any,  # client.CoordinationV1Api (its models are read loosely)
        namespace: str,
        identity: str,
        name: str = LEASE_NAME,
        timing: LeaseTiming = LeaseTiming(),
    ) -> None:
        self.coord = coord
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.timing = timing
        self.holder = ""  # as last observed
        self.error = ""
        self._observed: tuple[Any, ...] | None = None
        self._observed_at = 0.0
        self._renewed_at: float | None = None  # monotonic, last successful renew

    def leading(self) -> bool:
        r = self._renewed_at
        return r is not None and time.monotonic() - r < self.timing.renew_deadline

    def attempt(self) -> bool:
        """Acquire or renew once; True when this agent holds the Lease."""
        now, mono = _now(), time.monotonic()
        t = self.timing
        try:
            lease = self.coord.read_namespaced_lease(self.name, self.namespace, **T)
        except ApiException as e:
            if e.status != 404:
                raise
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {
                    "holderIdentity": self.identity,
                    "leaseDurationSeconds": max(1, round(t.lease_duration)),
                    "acquireTime": _micro(now),
                    "renewTime": _micro(now),
                    "leaseTransitions": 0,
                },
            }
            try:
                self.coord.create_namespaced_lease(self.namespace, body, **T)
            except ApiException as e2:
                if e2.status == 409:  # another agent created it first
                    return False
                raise
            self._took(mono, self.identity)
            return True
        spec = lease.spec
        holder = spec.holder_identity or ""
        record = (holder, spec.renew_time, spec.lease_duration_seconds, spec.lease_transitions)
        if record != self._observed:
            self._observed, self._observed_at = record, mono
        self.holder = holder
        duration = float(spec.lease_duration_seconds or t.lease_duration)
        if holder and holder != self.identity and mono < self._observed_at + duration:
            self._renewed_at = None
            return False
        transitions = int(spec.lease_transitions or 0)
        new_spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(t.lease_duration)),
            "renewTime": _micro(now),
            "acquireTime": _micro(spec.acquire_time) if spec.acquire_time else _micro(now),
            "leaseTransitions": transitions,
        }
        if holder != self.identity:
            new_spec["acquireTime"] = _micro(now)
            new_spec["leaseTransitions"] = transitions + 1
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": lease.metadata.resource_version,
            },
            "spec": new_spec,
        }
        try:
            self.coord.replace_namespaced_lease(self.name, self.namespace, body, **T)
        except ApiException as e:
            if e.status == 409:  # someone wrote it between our read and write
                return False
            raise
        if holder != self.identity:
            log.info("waypoint deployer: %s took the Lease (was %r)", self.identity, holder)
        self._took(mono, self.identity)
        return True

    def _took(self, mono: float, holder: str) -> None:
        self._renewed_at = mono
        self._observed = None  # our own write: re-observed on the next read
        self._observed_at = mono
        self.holder = holder

    def release(self, write: bool = True) -> None:
        """Step down: clear the holder so another agent takes over at once
        (write=False: only stop leading; the Lease expires)."""
        was = self._renewed_at is not None
        self._renewed_at = None
        if not was or not write:
            return
        try:
            lease = self.coord.read_namespaced_lease(self.name, self.namespace, **T)
            if (lease.spec.holder_identity or "") != self.identity:
                return
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {
                    "name": self.name,
                    "namespace": self.namespace,
                    "resourceVersion": lease.metadata.resource_version,
                },
                "spec": {
                    "holderIdentity": None,
                    "leaseDurationSeconds": 1,
                    "renewTime": _micro(_now()),
                    "leaseTransitions": int(lease.spec.lease_transitions or 0),
                },
            }
            self.coord.replace_namespaced_lease(self.name, self.namespace, body, **T)
            log.info("waypoint deployer: %s released the Lease", self.identity)
        except Exception as e:  # the Lease expires on its own
            log.warning("waypoint deployer: could not release the Lease: %s", _short(e))


# --------------------------------------------------------------------------- objects


def _listener_problem(gw: dict[str, Any]) -> str:
    """'' when the Gateway can be a waypoint, else what is wrong and the fix."""
    listeners = (gw.get("spec") or {}).get("listeners") or []
    for lst in listeners:
        if (
            lst.get("name") == MESH_LISTENER["name"]
            and lst.get("port") == MESH_LISTENER["port"]
            and str(lst.get("protocol", "")) == MESH_LISTENER["protocol"]
        ):
            return ""
    have = ", ".join(
        f"{lst.get('name')}:{lst.get('port')}/{lst.get('protocol')}" for lst in listeners
    )
    return (
        "a waypoint needs the listener {name: mesh, port: 15008, protocol: HBONE} "
        f"(has: {have or 'none'}); add it to spec.listeners"
    )


def service_account_of(gw: dict[str, Any]) -> tuple[str, bool]:
    """(account, whether we create it): the annotation names one the user
    owns, else the Gateway's name, created with it (as Istio does)."""
    meta = gw["metadata"]
    named = (meta.get("annotations") or {}).get(SERVICE_ACCOUNT_ANNOTATION)
    return (str(named), False) if named else (str(meta["name"]), True)


def _labels(name: str) -> dict[str, str]:
    return {
        GATEWAY_NAME_LABEL: name,
        OLD_GATEWAY_NAME_LABEL: name,
        MANAGED_LABEL: MANAGED_VALUE,
    }


def _owner(gw: dict[str, Any]) -> list[dict[str, Any]]:
    meta = gw["metadata"]
    return [
        {
            "apiVersion": f"{GW_GROUP}/{GW_VERSION}",
            "kind": "Gateway",
            "name": meta["name"],
            "uid": meta["uid"],
            "controller": True,
        }
    ]


def _meta(gw: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    meta = gw["metadata"]
    n = name or meta["name"]
    return {
        "name": n,
        "namespace": meta["namespace"],
        "labels": _labels(meta["name"]),
        "ownerReferences": _owner(gw),
    }


def service_of(gw: dict[str, Any]) -> dict[str, Any]:
    name = gw["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(gw),
        "spec": {
            "type": "ClusterIP",
            "selector": {GATEWAY_NAME_LABEL: name},
            "ports": [
                {
                    "name": "status-port",
                    "port": STATUS_PORT,
                    "targetPort": STATUS_PORT,
                    "protocol": "TCP",
                    "appProtocol": "tcp",
                },
                {
                    "name": "mesh",
                    "port": 15008,
                    "targetPort": 15008,
                    "protocol": "TCP",
                    "appProtocol": "all",
                },
            ],
        },
    }


def pod_template(gw: dict[str, Any], image: str, xds_dir: str) -> dict[str, Any]:
    """The waypoint pod: Envoy from the agent's image, fed over the node
    agent's socket in ``xds_dir`` (a host directory mounted at the same path)."""
    meta = gw["metadata"]
    ns, name = meta["namespace"], meta["name"]
    account, _ = service_account_of(gw)
    return {
        "metadata": {
            "labels": {
                **_labels(name),
                # Envoy terminates and originates HBONE itself: the node
                # agent must not capture the waypoint pod.
                DATAPLANE_MODE: "none",
            },
        },
        "spec": {
            "serviceAccountName": account,
            "terminationGracePeriodSeconds": 5,
            "containers": [
                {
                    "name": PROXY_CONTAINER,
                    "image": image,
                    "command": [
                        "tether",
                        "waypoint-proxy",
                        "--namespace",
                        ns,
                        "--name",
                        name,
                        "--xds-dir",
                        xds_dir,
                    ],
                    "ports": [
                        {"name": "mesh", "containerPort": 15008, "protocol": "TCP"},
                        {"name": "status-port", "containerPort": STATUS_PORT, "protocol": "TCP"},
                    ],
                    "volumeMounts": [{"name": XDS_VOLUME, "mountPath": xds_dir}],
                    # Ready once Envoy has its first config from the node
                    # agent (`tether waypoint-proxy --ready-port`), as
                    # Istio's waypoints answer on the status port
                    "readinessProbe": {
                        "httpGet": {"path": READY_PATH, "port": STATUS_PORT},
                        "periodSeconds": 2,
                        "failureThreshold": 3,
                    },
                }
            ],
            "volumes": [
                {
                    "name": XDS_VOLUME,
                    "hostPath": {"path": xds_dir, "type": "DirectoryOrCreate"},
                }
            ],
        },
    }


def deployment_of(gw: dict[str, Any], image: str, xds_dir: str) -> dict[str, Any]:
    name = gw["metadata"]["name"]
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(gw),
        "spec": {
            "selector": {"matchLabels": {GATEWAY_NAME_LABEL: name}},
            "template": pod_template(gw, image, xds_dir),
        },
    }


def service_account_obj(gw: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(gw)}


def _condition(
    typ: str, ok: bool, reason: str, message: str, generation: int, old: list[dict[str, Any]]
) -> dict[str, Any]:
    status = "True" if ok else "False"
    prev = next((c for c in old if c.get("type") == typ), None)
    since = (
        prev["lastTransitionTime"]
        if prev and prev.get("status") == status and prev.get("lastTransitionTime")
        else _stamp(_now())
    )
    return {
        "type": typ,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    }


def gateway_status(
    gw: dict[str, Any], problem: str, ips: list[str], programmed_note: str = ""
) -> dict[str, Any]:
    """The status this deployer writes.  ``problem``: the Gateway is not a
    valid waypoint; ``ips``: the Service's ClusterIPs (none yet: not programmed)."""
    gen = int(gw["metadata"].get("generation") or 0)
    old_status = gw.get("status") or {}
    old = old_status.get("conditions") or []
    if problem:
        conds = [
            _condition("Accepted", False, "ListenersNotValid", problem, gen, old),
            _condition("Programmed", False, "Invalid", "not deployed: " + problem, gen, old),
        ]
        return {"conditions": conds, "addresses": [], "listeners": []}
    programmed = bool(ips) and not programmed_note
    name, ns = gw["metadata"]["name"], gw["metadata"]["namespace"]
    conds = [
        _condition("Accepted", True, "Accepted", "Resource accepted", gen, old),
        _condition(
            "Programmed",
            programmed,
            "Programmed" if programmed else "NoResources",
            f"Resource programmed, assigned to service {name}.{ns}.svc"
            if programmed
            else programmed_note or f"service {ns}/{name} has no ClusterIP yet",
            gen,
            old,
        ),
    ]
    old_listeners = {lst.get("name"): lst for lst in old_status.get("listeners") or []}
    lold = (old_listeners.get("mesh") or {}).get("conditions") or []
    listener = {
        "name": "mesh",
        "supportedKinds": [],
        "attachedRoutes": 0,
        "conditions": [
            _condition("Accepted", True, "Accepted", "No errors found", gen, lold),
            _condition("ResolvedRefs", True, "ResolvedRefs", "No errors found", gen, lold),
            _condition(
                "Programmed",
                programmed,
                "Programmed" if programmed else "Pending",
                "No errors found" if programmed else "waiting for the Service's address",
                gen,
                lold,
            ),
        ],
    }
    return {
        "conditions": conds,
        "addresses": [{"type": "IPAddress", "value": ip} for ip in ips],
        "listeners": [listener],
    }


def _same_status(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


# --------------------------------------------------------------------------- deployer


class WaypointDeployer:
    """Deploys istio-waypoint Gateways while this agent holds the Lease."""

    def __init__(
        self,
        api: client.ApiClient,
        *,
        namespace: str,
        identity: str,
        image: str | None = None,
        pod_name: str | None = None,
        xds_dir: str = "/var/run/tether/xds",
        timing: LeaseTiming = LeaseTiming(),
        resync: float = 60.0,
    ) -> None:
        """image: the waypoint pods' image; None: the image of this agent's own
        pod (``pod_name`` in ``namespace``, container ``agent`` or the first)."""
        self.api = api
        # Any: the generated models type every field Optional; what this
        # module reads is checked by the k8s tier against a real API server.
        self.core: Any = client.CoreV1Api(api)
        self.apps: Any = client.AppsV1Api(api)
        self.custom: Any = client.CustomObjectsApi(api)
        self.namespace = namespace
        self.elector = LeaderElector(
            client.CoordinationV1Api(api), namespace, identity, timing=timing
        )
        self.image = image
        self.pod_name = pod_name
        self.xds_dir = xds_dir
        self.resync = resync
        self.errors: dict[str, str] = {}  # gateway key -> last error
        self.error = ""  # not about one Gateway (list, image, Lease)
        self.deployed: dict[str, str] = {}  # gateway key -> fingerprint applied
        self.passes = 0  # completed reconcile passes (tests wait on it)
        self._synced_at: dict[str, float] = {}
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        for target, name in ((self._elect, "lease"), (self._work, "deploy")):
            t = threading.Thread(target=target, name=f"waypoint-{name}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 5.0, *, release: bool = True) -> None:
        """Stop writing, then release the Lease (a successor takes over at
        once).  release=False: leave it to expire, as a killed agent does."""
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout)
        self.elector.release(write=release)

    def wake(self) -> None:
        """Something changed in the cluster (the agent's watchers saw it): look now."""
        self._wake.set()

    def leading(self) -> bool:
        return self.elector.leading()

    # -- threads -------------------------------------------------------------

    def _elect(self) -> None:
        """Try every retry_period, errors or not, as client-go does: one small
        request per agent, and a returning API server is noticed at once."""
        period = self.elector.timing.retry_period
        while not self._stop.is_set():
            was = self.elector.leading()
            try:
                now = self.elector.attempt()
                self.elector.error = ""
            except Exception as e:
                msg = _short(e)
                if self.elector.error != msg:
                    log.warning("waypoint deployer: Lease: %s; retrying every %.0f s", msg, period)
                self.elector.error = msg
                now = self.elector.leading()  # true until the renew deadline passes
            if now and not was:
                log.info("waypoint deployer: leading (Lease %s/%s)", self.namespace, LEASE_NAME)
                self._synced_at.clear()
                self._wake.set()
            elif was and not self.elector.leading():
                log.warning("waypoint deployer: lost the Lease; no longer writing")
            self._stop.wait(period)

    def _work(self) -> None:
        backoff = 1.0
        wait = self.resync
        while not self._stop.is_set():
            self._wake.wait(wait)  # woken by the agent's watchers, the Lease, or a resync
            self._wake.clear()
            if self._stop.is_set() or not self.elector.leading():
                wait = self.resync
                continue
            prev, self.error = self.error, ""
            try:
                self.reconcile()
            except Exception as e:
                msg = _short(e)
                if prev != msg:
                    log.warning("waypoint deployer: %s; retrying in %.0f s", msg, backoff)
                self.error = msg
            if self.error or self.errors:  # retry what failed, backing off
                wait, backoff = backoff, min(backoff * 2, BACKOFF_MAX)
            else:
                wait, backoff = self.resync, 1.0

    # -- the work --------------------------------------------------------------

    def _own_image(self) -> str:
        if self.image:
            return self.image
        if not self.pod_name:
            raise RuntimeError(
                "no waypoint image: set agent.waypointImage or POD_NAME/POD_NAMESPACE "
                "(the DaemonSet's downward API)"
            )
        pod = self.core.read_namespaced_pod(self.pod_name, self.namespace, **T)
        containers = pod.spec.containers
        mine = next((c for c in containers if c.name == "agent"), containers[0])
        self.image = str(mine.image)
        return self.image

    def reconcile(self) -> None:
        """One pass over every istio-waypoint Gateway (the leader only)."""
        try:
            data = self.custom.list_cluster_custom_object(GW_GROUP, GW_VERSION, "gateways", **T)
        except ApiException as e:
            if e.status == 404:
                self.error = "gateways.gateway.networking.k8s.io not installed"
                return
            raise
        image = self._own_image()
        seen = set()
        for gw in data.get("items") or []:
            if (gw.get("spec") or {}).get("gatewayClassName") != WAYPOINT_CLASS:
                continue
            meta = gw.get("metadata") or {}
            key = f"{meta.get('namespace')}/{meta.get('name')}"
            seen.add(key)
            if meta.get("deletionTimestamp"):
                continue  # going away: never recreate what it owns
            if self._stop.is_set() or not self.elector.leading():
                return
            try:
                self.sync(gw, image)
                self.errors.pop(key, None)
            except Exception as e:
                msg = _short(e)
                if self.errors.get(key) != msg:
                    log.error("waypoint deployer: Gateway %s: %s", key, msg)
                self.errors[key] = msg
                self.deployed.pop(key, None)
        for key in set(self.deployed) - seen:
            del self.deployed[key]  # deleted: its objects go with it (ownerReferences)
            self._synced_at.pop(key, None)
        for key in set(self.errors) - seen:
            del self.errors[key]
        self.passes += 1

    def sync(self, gw: dict[str, Any], image: str) -> None:
        meta = gw["metadata"]
        ns, name = meta["namespace"], meta["name"]
        key = f"{ns}/{name}"
        problem = _listener_problem(gw)
        desired: list[dict[str, Any]] = []
        if not problem:
            _, create_sa = service_account_of(gw)
            if create_sa:
                desired.append(service_account_obj(gw))
            desired += [service_of(gw), deployment_of(gw, image, self.xds_dir)]
        fp = hashlib.sha256(
            json.dumps([desired, problem, meta.get("generation")], sort_keys=True).encode()
        ).hexdigest()
        fresh = time.monotonic() - self._synced_at.get(key, -1e9) < self.resync
        if self.deployed.get(key) == fp and fresh and (gw.get("status") or {}).get("conditions"):
            return
        if problem:
            if self.deployed.get(key) != fp:
                log.warning("waypoint deployer: Gateway %s not accepted: %s", key, problem)
            self._write_status(gw, gateway_status(gw, problem, []))
        else:
            for obj in desired:
                self._apply(obj)
            svc = self.core.read_namespaced_service(name, ns, **T)
            ips = [
                ip for ip in (svc.spec.cluster_ips or [svc.spec.cluster_ip]) if ip and ip != "None"
            ]
            self._write_status(gw, gateway_status(gw, "", ips))
            if self.deployed.get(key) != fp:
                log.info("waypoint deployer: Gateway %s deployed (%s)", key, ", ".join(ips))
        self.deployed[key] = fp
        self._synced_at[key] = time.monotonic()

    def _apply(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        kw: dict[str, Any] = {
            "field_manager": FIELD_MANAGER,
            "force": True,
            "_content_type": APPLY,
            **T,
        }
        kind = obj["kind"]
        if kind == "Deployment":
            self.apps.patch_namespaced_deployment(meta["name"], meta["namespace"], obj, **kw)
        elif kind == "Service":
            self.core.patch_namespaced_service(meta["name"], meta["namespace"], obj, **kw)
        elif kind == "ServiceAccount":
            self.core.patch_namespaced_service_account(meta["name"], meta["namespace"], obj, **kw)
        else:  # pragma: no cover - programming error
            raise ValueError(kind)

    def _write_status(self, gw: dict[str, Any], status: dict[str, Any]) -> None:
        if _same_status(status, gw.get("status") or {}):
            return
        meta = gw["metadata"]
        self.custom.patch_namespaced_custom_object_status(
            GW_GROUP,
            GW_VERSION,
            meta["namespace"],
            "gateways",
            meta["name"],
            {"status": status},
            _content_type=MERGE,
            **T,
        )

    def describe(self) -> dict[str, Any]:
        return {
            "identity": self.elector.identity,
            "leading": self.elector.leading(),
            "holder": self.elector.holder,
            "lease_error": self.elector.error or None,
            "error": self.error or None,
            "deployed": sorted(self.deployed),
            "passes": self.passes,
            "errors": dict(self.errors),
        }
