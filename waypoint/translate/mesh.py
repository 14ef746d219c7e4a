"""The documents and services one waypoint's translation reads: L7 kinds
indexed by name (duplicates reported, never guessed between), hostnames
resolved to services, and which services and pods this waypoint serves."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

from agent.model import Service, ServicePort, Workload
from agent.model.waypoint import Waypoint
from agent.policy.hints import unhandled_reason
from agent.policy.parse import document_label
from agent.state.state import StateView
from waypoint.translate.common import Doc, Report

NETWORKING = "networking.istio.io"
SECURITY = "security.istio.io"
GATEWAY_API = "gateway.networking.k8s.io"
# (group, kind) the translation applies
HANDLED = {
    (NETWORKING, "VirtualService"),
    (NETWORKING, "DestinationRule"),
    (GATEWAY_API, "HTTPRoute"),
    (SECURITY, "AuthorizationPolicy"),
    (SECURITY, "RequestAuthentication"),
}
# Kinds that configure L7 but that the waypoint translation does not apply:
# reported so that nothing a user wrote for L7 is silently ignored.
NOT_APPLIED = {
    (NETWORKING, "Gateway"): (
        "an Istio ingress/egress Gateway (spec.selector picks gateway pods); tether runs "
        "no ingress gateway. A waypoint is a Gateway API Gateway "
        "(gateway.networking.k8s.io/v1) with gatewayClassName istio-waypoint"
    ),
    (NETWORKING, "EnvoyFilter"): (
        "EnvoyFilter patches are not supported on tether waypoints (they patch Istio's "
        "generated configuration, which tether does not produce)"
    ),
    (NETWORKING, "ServiceEntry"): "ServiceEntry is not supported yet: only Kubernetes Services",
    (NETWORKING, "Sidecar"): "Sidecar configures sidecar proxies; ambient mode has none",
    (NETWORKING, "WorkloadEntry"): "WorkloadEntry is not supported",
    ("telemetry.istio.io", "Telemetry"): (
        "Telemetry is not applied to tether waypoints yet (metrics and access logs use "
        "tether's defaults)"
    ),
    ("extensions.istio.io", "WasmPlugin"): "WasmPlugin is not supported on tether waypoints",
    (GATEWAY_API, "GRPCRoute"): "GRPCRoute is not supported yet; use HTTPRoute",
    (GATEWAY_API, "TCPRoute"): "TCPRoute is not applied by the waypoint (L4 only)",
}
OTHER_MESH_KINDS = {
    "ServiceProfile",
    "TrafficSplit",
    "TrafficTarget",
    "HTTPRouteGroup",
    "ServiceIntentions",
    "ServiceSplitter",
    "ServiceResolver",
    "ServiceRouter",
    "ServiceDefaults",
}


def group_of(doc: Doc) -> str:
    api = doc.get("apiVersion")
    return api.split("/")[0] if isinstance(api, str) and "/" in api else ""


def namespace_of(doc: Doc) -> str:
    meta = doc.get("metadata")
    ns = meta.get("namespace") if isinstance(meta, Mapping) else None
    return ns if isinstance(ns, str) and ns else "default"


def name_of(doc: Doc) -> str:
    meta = doc.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    return name if isinstance(name, str) else ""


def spec_of(doc: Doc) -> Mapping[str, Any]:
    spec = doc.get("spec")
    return spec if isinstance(spec, Mapping) else {}


def index_documents(policies: Sequence[object], report: Report) -> dict[str, list[Doc]]:
    """Documents of the handled kinds by kind, sorted by namespace/name.  A
    name given twice is reported for every copy and none is used (which one
    the author meant is unknown, as agent.policy treats security documents);
    kinds that configure L7 but are not applied are reported."""
    seen: dict[tuple[str, str, str], list[Doc]] = {}
    for doc in policies:
        if not isinstance(doc, Mapping):
            continue
        kind = doc.get("kind")
        if not isinstance(kind, str):
            continue
        group = group_of(doc)
        if (group, kind) in NOT_APPLIED:
            report.add(doc, "", NOT_APPLIED[(group, kind)])
            continue
        if kind in OTHER_MESH_KINDS:
            report.add(doc, "", unhandled_reason(doc, namespace_of(doc)))
            continue
        if (group, kind) not in HANDLED:
            continue
        seen.setdefault((kind, namespace_of(doc), name_of(doc)), []).append(doc)
    out: dict[str, list[Doc]] = {}
    for (kind, _, _), docs in sorted(seen.items()):
        if len(docs) > 1:
            for i, doc in enumerate(docs):
                report.add(
                    doc,
                    "metadata.name",
                    f"{len(docs)} documents share this name (copy {i + 1}); none of them "
                    "is applied: delete all but one",
                )
            continue
        out.setdefault(kind, []).append(docs[0])
    return out


@dataclasses.dataclass(frozen=True)
class Mesh:
    """The services, pods and documents one waypoint is configured from."""

    view: StateView
    waypoint: Waypoint
    trust_domain: str
    docs: dict[str, list[Doc]]

    @functools.cached_property
    def services(self) -> list[Service]:
        """Services whose traffic goes through this waypoint, by key."""
        snap = self.view.snapshot
        return sorted(
            (s for s in snap.services if snap.waypoint_of_service(s) == self.waypoint),
            key=lambda s: s.key,
        )

    @functools.cached_property
    def workloads(self) -> list[Workload]:
        """Pods addressed directly whose traffic goes through this waypoint."""
        snap = self.view.snapshot
        return sorted(
            (w for w in snap.workloads if snap.waypoint_of_workload(w) == self.waypoint),
            key=lambda w: w.key,
        )

    def kind(self, kind: str) -> list[Doc]:
        return self.docs.get(kind, [])

    def resolve(self, host: str, namespace: str) -> Service | None:
        """A Service by the names Istio accepts: ``name`` (in ``namespace``),
        ``name.ns``, ``name.ns.svc``, ``name.ns.svc.cluster.local``."""
        parts = host.split(".")
        if len(parts) == 1:
            name, ns = host, namespace
        elif (
            len(parts) == 2
            or (len(parts) == 3 and parts[2] == "svc")
            or (host.endswith(".svc.cluster.local") and len(parts) == 5)
        ):
            name, ns = parts[0], parts[1]
        else:
            return None
        return self._by_key.get(f"{ns}/{name}")

    @functools.cached_property
    def _by_key(self) -> dict[str, Service]:
        out: dict[str, Service] = {}
        for s in self.view.snapshot.services:
            out.setdefault(s.key, s)
        return out

    def port_of(self, s: Service, number: int | None) -> ServicePort | None:
        """The service port ``number``, or its only port when none is named."""
        if number is None:
            return s.ports[0] if len(s.ports) == 1 else None
        for p in s.ports:
            if p.port == number:
                return p
        return None

    def label(self, doc: Doc) -> str:
        return document_label(doc)
