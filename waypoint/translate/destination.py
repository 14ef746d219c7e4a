"""Service clusters (Istio's ``outbound|<port>|<subset>|<host>``) with
DestinationRule traffic policy: subsets, load balancing, connection pool
limits, outlier detection."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.model import Service, ServicePort, Workload
from waypoint.translate import hbone
from waypoint.translate.common import Doc, Report, duration, show
from waypoint.translate.mesh import Mesh, namespace_of, spec_of

LB = {
    "ROUND_ROBIN": "ROUND_ROBIN",
    "LEAST_REQUEST": "LEAST_REQUEST",
    "LEAST_CONN": "LEAST_REQUEST",  # Istio's deprecated alias
    "RANDOM": "RANDOM",
}
DEFAULT_LB = "LEAST_REQUEST"  # Istio's default since 1.14
POLICY_FIELDS = ("loadBalancer", "connectionPool", "outlierDetection", "tls")


def cluster_name(s: Service, port: int, subset: str = "") -> str:
    return f"outbound|{port}|{subset}|{s.hostname}"


class DestinationRules:
    """The DestinationRule of each service (first by namespace/name when
    several name one host, as Istio merges none of them either), with every
    field it cannot apply reported once."""

    def __init__(self, mesh: Mesh, report: Report) -> None:
        self.by_service: dict[str, Doc] = {}
        for doc in mesh.kind("DestinationRule"):
            spec = spec_of(doc)
            host = spec.get("host")
            svc = mesh.resolve(host, namespace_of(doc)) if isinstance(host, str) else None
            if svc is None:
                report.add(doc, "spec.host", f"{show(host)} names no known Service")
                continue
            if svc.key in self.by_service:
                report.add(
                    doc,
                    "spec.host",
                    f"{svc.hostname} already has DestinationRule "
                    f"{namespace_of(self.by_service[svc.key])}/"
                    f"{self.by_service[svc.key]['metadata']['name']}; this one is ignored",
                )
                continue
            self.by_service[svc.key] = doc
            _check(doc, spec, report)

    def of(self, s: Service) -> Doc | None:
        return self.by_service.get(s.key)

    def subsets(self, s: Service) -> dict[str, Mapping[str, Any]]:
        doc = self.of(s)
        out: dict[str, Mapping[str, Any]] = {}
        raw = spec_of(doc).get("subsets") if doc else None
        for sub in raw if isinstance(raw, list) else []:
            if isinstance(sub, Mapping) and isinstance(sub.get("name"), str):
                out[sub["name"]] = sub
        return out


# ---------------------------------------------------------------------------
# validation: one report per field, on the document's own paths


def _unknown(doc: Doc, m: Mapping[str, Any], path: str, known: tuple[str, ...], r: Report) -> None:
    for key in m:
        if key not in known:
            if key == "circuitBreaker":
                r.add(
                    doc,
                    f"{path}.circuitBreaker",
                    "not an Istio field (Istio has no circuitBreaker); ejection settings go "
                    "in outlierDetection (consecutive5xxErrors, interval, baseEjectionTime, "
                    "maxEjectionPercent), request limits in connectionPool",
                )
            else:
                r.add(doc, f"{path}.{key}", f"unknown field (expected one of: {', '.join(known)})")


_TCP = ("maxConnections", "connectTimeout", "tcpKeepalive", "maxConnectionDuration", "idleTimeout")
_HTTP = (
    "http1MaxPendingRequests",
    "http2MaxRequests",
    "maxRequestsPerConnection",
    "maxRetries",
    "idleTimeout",
    "h2UpgradePolicy",
    "useClientProtocol",
    "maxConcurrentStreams",
)
_TCP_APPLIED = ("maxConnections", "connectTimeout")
_HTTP_APPLIED = (
    "http1MaxPendingRequests",
    "http2MaxRequests",
    "maxRequestsPerConnection",
    "maxRetries",
    "idleTimeout",
)
_OUTLIER = (
    "consecutive5xxErrors",
    "consecutiveGatewayErrors",
    "consecutiveErrors",
    "interval",
    "baseEjectionTime",
    "maxEjectionPercent",
    "minHealthPercent",
    "splitExternalLocalOriginErrors",
    "consecutiveLocalOriginFailures",
)


def _check_policy(doc: Doc, pol: object, path: str, r: Report, *, port_level: bool) -> None:
    if not isinstance(pol, Mapping):
        r.add(doc, path, "expected a mapping")
        return
    known = (
        ("port", *POLICY_FIELDS)
        if port_level
        else (*POLICY_FIELDS, "portLevelSettings", "tunnel", "proxyProtocol")
    )
    _unknown(doc, pol, path, known, r)
    for key in ("tunnel", "proxyProtocol"):
        if key in pol:
            r.add(doc, f"{path}.{key}", "not supported by tether's waypoint")
    lb = pol.get("loadBalancer")
    if isinstance(lb, Mapping):
        for key in lb:
            if key == "simple":
                if lb[key] == "PASSTHROUGH":
                    r.add(
                        doc,
                        f"{path}.loadBalancer.simple",
                        "PASSTHROUGH is not supported "
                        "(endpoints are always the service's pods); the default "
                        "LEAST_REQUEST is used",
                    )
                elif lb[key] not in LB and lb[key] != "UNSPECIFIED":
                    r.add(
                        doc,
                        f"{path}.loadBalancer.simple",
                        f"unknown value {show(lb[key])} (ROUND_ROBIN, LEAST_REQUEST, RANDOM)",
                    )
            else:
                r.add(
                    doc,
                    f"{path}.loadBalancer.{key}",
                    "not supported yet; only "
                    "loadBalancer.simple (ROUND_ROBIN, LEAST_REQUEST, RANDOM) is applied",
                )
    cp = pol.get("connectionPool")
    if isinstance(cp, Mapping):
        _unknown(doc, cp, f"{path}.connectionPool", ("tcp", "http"), r)
        for part, known_f, applied in (("tcp", _TCP, _TCP_APPLIED), ("http", _HTTP, _HTTP_APPLIED)):
            sub = cp.get(part)
            if isinstance(sub, Mapping):
                _unknown(doc, sub, f"{path}.connectionPool.{part}", known_f, r)
                for key in sub:
                    if key in known_f and key not in applied:
                        r.add(
                            doc,
                            f"{path}.connectionPool.{part}.{key}",
                            "not applied by tether's waypoint",
                        )
    od = pol.get("outlierDetection")
    if isinstance(od, Mapping):
        _unknown(doc, od, f"{path}.outlierDetection", _OUTLIER, r)
        if "consecutiveErrors" in od:
            r.add(
                doc,
                f"{path}.outlierDetection.consecutiveErrors",
                "deprecated and removed from Istio's API: not applied; use "
                "consecutive5xxErrors (or consecutiveGatewayErrors for 502/503/504 only)",
            )
        for key in ("interval", "baseEjectionTime"):
            if key in od and duration(od[key]) is None:
                r.add(doc, f"{path}.outlierDetection.{key}", f"{show(od[key])} is not a duration")
    tls = pol.get("tls")
    if isinstance(tls, Mapping) and tls.get("mode") != "ISTIO_MUTUAL":
        r.add(
            doc,
            f"{path}.tls",
            "not applied: the waypoint always reaches mesh pods over "
            "HBONE mTLS (ISTIO_MUTUAL) and others in plaintext",
        )
    pls = pol.get("portLevelSettings")
    if not port_level and isinstance(pls, list):
        for i, p in enumerate(pls):
            _check_policy(doc, p, f"{path}.portLevelSettings[{i}]", r, port_level=True)


def _check(doc: Doc, spec: Mapping[str, Any], r: Report) -> None:
    _unknown(
        doc, spec, "spec", ("host", "trafficPolicy", "subsets", "exportTo", "workloadSelector"), r
    )
    if "exportTo" in spec:
        r.add(doc, "spec.exportTo", "ignored: every document is visible mesh-wide")
    if "workloadSelector" in spec:
        r.add(doc, "spec.workloadSelector", "applies to sidecars only; ignored by waypoints")
    if "trafficPolicy" in spec:
        _check_policy(doc, spec["trafficPolicy"], "spec.trafficPolicy", r, port_level=False)
    subsets = spec.get("subsets")
    for i, sub in enumerate(subsets if isinstance(subsets, list) else []):
        path = f"spec.subsets[{i}]"
        if not isinstance(sub, Mapping) or not isinstance(sub.get("name"), str):
            r.add(doc, path, "a subset needs a name")
            continue
        _unknown(doc, sub, path, ("name", "labels", "trafficPolicy"), r)
        if "trafficPolicy" in sub:
            _check_policy(doc, sub["trafficPolicy"], f"{path}.trafficPolicy", r, port_level=False)


# ---------------------------------------------------------------------------
# the effective policy for one port of one subset, and its cluster


def _merge(base: Mapping[str, Any], over: object) -> dict[str, Any]:
    """Istio's merge: a field set at the narrower level replaces the wider one's."""
    out = dict(base)
    if isinstance(over, Mapping):
        for key in (*POLICY_FIELDS, "portLevelSettings"):
            if key in over:
                out[key] = over[key]
    return out


def _at_port(pol: Mapping[str, Any], port: int) -> dict[str, Any]:
    out = {k: v for k, v in pol.items() if k in POLICY_FIELDS}
    pls = pol.get("portLevelSettings")
    for p in pls if isinstance(pls, list) else []:
        if not isinstance(p, Mapping):
            continue
        num = p.get("port", {}).get("number") if isinstance(p.get("port"), Mapping) else None
        if num == port:
            out = _merge(out, p)
    return out


def effective_policy(
    doc: Doc | None, subset: Mapping[str, Any] | None, port: int
) -> dict[str, Any]:
    top = spec_of(doc).get("trafficPolicy") if doc else None
    pol = _at_port(top if isinstance(top, Mapping) else {}, port)
    if subset is not None and isinstance(subset.get("trafficPolicy"), Mapping):
        sub = subset["trafficPolicy"]
        pol = _merge(pol, {k: v for k, v in sub.items() if k in POLICY_FIELDS})
        pol = _merge(pol, _at_port(sub, port))
    return pol


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def apply_policy(
    cluster: dict[str, Any], pol: Mapping[str, Any], http_opts: dict[str, Any]
) -> None:
    lb = pol.get("loadBalancer")
    simple = lb.get("simple") if isinstance(lb, Mapping) else None
    cluster["lb_policy"] = LB.get(simple, DEFAULT_LB) if isinstance(simple, str) else DEFAULT_LB
    cp = pol.get("connectionPool")
    if isinstance(cp, Mapping):
        tcp: Mapping[str, Any] = cp["tcp"] if isinstance(cp.get("tcp"), Mapping) else {}
        http: Mapping[str, Any] = cp["http"] if isinstance(cp.get("http"), Mapping) else {}
        threshold: dict[str, Any] = {}
        for field, src, key in (
            ("max_connections", tcp, "maxConnections"),
            ("max_pending_requests", http, "http1MaxPendingRequests"),
            ("max_requests", http, "http2MaxRequests"),
            ("max_retries", http, "maxRetries"),
        ):
            n = _int(src.get(key))
            if n is not None:
                threshold[field] = n
        if threshold:
            cluster["circuit_breakers"] = {"thresholds": [threshold]}
        if duration(tcp.get("connectTimeout")):
            cluster["connect_timeout"] = duration(tcp.get("connectTimeout"))
        common: dict[str, Any] = {}
        n = _int(http.get("maxRequestsPerConnection"))
        if n:
            common["max_requests_per_connection"] = n
        if duration(http.get("idleTimeout")):
            common["idle_timeout"] = duration(http.get("idleTimeout"))
        if common:
            http_opts["common_http_protocol_options"] = common
    od = pol.get("outlierDetection")
    if isinstance(od, Mapping):
        out: dict[str, Any] = {}
        n = _int(od.get("consecutive5xxErrors"))
        # Envoy's consecutive_5xx defaults to 5 when unset: Istio sets 0 to turn
        # it off when the user asked only for gateway errors.
        out["consecutive_5xx"] = n if n is not None else 0
        out["enforcing_consecutive_5xx"] = 100 if n else 0
        n = _int(od.get("consecutiveGatewayErrors"))
        if n is not None:
            out["consecutive_gateway_failure"] = n
            out["enforcing_consecutive_gateway_failure"] = 100 if n else 0
        for field, key in (("interval", "interval"), ("base_ejection_time", "baseEjectionTime")):
            d = duration(od.get(key))
            if d:
                out[field] = d
        n = _int(od.get("maxEjectionPercent"))
        if n is not None:
            out["max_ejection_percent"] = min(n, 100)
        if od.get("splitExternalLocalOriginErrors") is True:
            out["split_external_local_origin_errors"] = True
            n = _int(od.get("consecutiveLocalOriginFailures"))
            if n is not None:
                out["consecutive_local_origin_failure"] = n
        out["enforcing_success_rate"] = 0
        cluster["outlier_detection"] = out
        n = _int(od.get("minHealthPercent"))
        if n is not None:
            cluster["common_lb_config"] = {"healthy_panic_threshold": {"value": float(n)}}


def endpoints_of(
    mesh: Mesh, s: Service, port: ServicePort, report: Report
) -> list[tuple[str, int, Workload]]:
    """(ip, target port, workload) of the service's pods, sorted."""
    view = mesh.view
    out: list[tuple[str, int, Workload]] = []
    if s.endpoints is None:
        for w in view.endpoints(s):
            out.extend((a, port.target_port, w) for a in w.addresses)
    else:
        for ep in s.endpoints:
            wl = view.workload_by_ip(ep.address)
            if wl is None:
                report.add(
                    f"Service {s.key}",
                    f"endpoints[{ep.address}]",
                    "no known pod has this address: its identity is unknown, so the "
                    "waypoint cannot open HBONE to it; left out",
                )
                continue
            out.append((ep.address, ep.ports.get(port.name, port.target_port), wl))
    return sorted(out, key=lambda e: (e[0], e[1]))


def upstream_protocol(port: ServicePort) -> dict[str, Any]:
    """Istio's protocol selection by port name: grpc*/http2*/h2c* speak HTTP/2
    to the pod, http* HTTP/1.1, anything else what the client spoke."""
    name = port.name.lower()
    if name.startswith(("grpc", "http2", "h2c")):
        return {"explicit_http_config": {"http2_protocol_options": {}}}
    if name.startswith("http"):
        return {"explicit_http_config": {"http_protocol_options": {}}}
    return {
        "use_downstream_protocol_config": {
            "http_protocol_options": {},
            "http2_protocol_options": {},
        }
    }


def service_cluster(
    mesh: Mesh,
    s: Service,
    port: ServicePort,
    subset: str,
    rules: DestinationRules,
    report: Report,
    identities: set[tuple[str, str]],
) -> dict[str, Any]:
    doc = rules.of(s)
    sub = rules.subsets(s).get(subset) if subset else None
    labels: Mapping[str, Any] = {}
    if sub is not None and isinstance(sub.get("labels"), Mapping):
        labels = sub["labels"]
    name = cluster_name(s, port.port, subset)
    lb_endpoints = []
    for ip, target, w in endpoints_of(mesh, s, port, report):
        if any(w.labels.get(k) != v for k, v in labels.items()):
            continue
        if mesh.view.captured(w):
            identities.add((w.namespace, w.service_account))
            lb_endpoints.append(hbone.hbone_endpoint(ip, target, w.namespace, w.service_account))
        else:
            lb_endpoints.append(hbone.plain_endpoint(ip, target))
    http_opts = upstream_protocol(port)
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": hbone.CONNECT_TIMEOUT,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": lb_endpoints}] if lb_endpoints else [],
        },
        "transport_socket_matches": [
            {
                "name": "hbone",
                "match": hbone.TUNNEL_MATCH,
                "transport_socket": hbone.internal_upstream([hbone.ORIGINAL_DST_FILTER]),
            }
        ],
    }
    apply_policy(cluster, effective_policy(doc, sub, port.port), http_opts)
    cluster["typed_extension_protocol_options"] = {
        hbone.HTTP_OPTIONS: {"@type": f"type.googleapis.com/{hbone.HTTP_OPTIONS}", **http_opts}
    }
    return cluster
