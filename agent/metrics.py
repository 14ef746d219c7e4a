"""Prometheus metrics with Istio's names and labels (ztunnel's set, and the
waypoint's request metrics), plus the datapath's BPF counters, served on
:15020/metrics.

Dashboards and alerts written for Istio ambient work unchanged: the same
metric names, the same `reporter`, `*_principal`, `response_flags` and
`connection_security_policy` labels.

Request metrics (``reporter="waypoint"``) come from the local waypoints'
Envoys through the access log service (waypoint/als.py): one entry per HTTP
request, turned into labels here.  Label values come from the agent's own
state (workloads, services, identities) or from small fixed sets (status
codes, response flags, gRPC statuses); never from a path, a header or an
authority, which any client chooses.  A value the state does not know (a
peer principal of no known workload, say) is kept as it is for the first
``UNKNOWN_CAP`` distinct values of its label and is ``unknown`` after that, so
a hostile or careless client cannot create series without bound.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from agent.identity.spiffe import SpiffeId, SpiffeIdError
from agent.model import Service, Workload
from agent.model.addr import norm_ip
from agent.state.state import StateView
from agent.tunnel import limits, tlssock
from agent.tunnel.conns import Connection, access_log, parse_endpoint

if TYPE_CHECKING:
    from waypoint.als import RequestLog

LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "destination_service",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "request_protocol",
    "response_flags",
    "connection_security_policy",
)


REQUEST_LABELS = (
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "request_protocol",
    "response_code",
    "response_flags",
    "grpc_response_status",
    "connection_security_policy",
)
#: Istio's buckets for istio_request_duration_milliseconds
DURATION_BUCKETS_MS = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
    300000, 600000, 1800000, 3600000,
)  # fmt: skip
#: Istio's buckets for istio_request_bytes / istio_response_bytes (1 B to 1 GB, x10)
BYTES_BUCKETS = tuple(float(10**i) for i in range(10))
#: distinct values a label may take that the agent's state does not vouch for
UNKNOWN_CAP = 64
UNKNOWN = "unknown"
#: Envoy's short response flag names (waypoint/als.py FLAG_CODES)
_FLAG_CODES = frozenset(
    {
        "LH",
        "UH",
        "UT",
        "LR",
        "UR",
        "UF",
        "UC",
        "UO",
        "NR",
        "DI",
        "FI",
        "RL",
        "UAEX",
        "RLSE",
        "DC",
        "URX",
        "SI",
        "IH",
        "DPE",
        "UMSDR",
        "RFCF",
        "NFCF",
        "DT",
        "UPE",
        "NC",
        "OM",
        "DF",
        "DR",
    }
)
#: how much of a path or authority a JSON access log line keeps
LOG_FIELD_MAX = 512


class Capped:
    """The values one label has taken that nothing vouches for: the first
    ``cap`` distinct ones pass, later new ones become ``unknown``."""

    def __init__(self, cap: int = UNKNOWN_CAP) -> None:
        self.cap = cap
        self.seen: set[str] = set()
        self.capped = 0  # values turned into "unknown" (a sign of abuse or a bug)
        self._lock = threading.Lock()

    def __call__(self, value: str) -> str:
        if not value:
            return UNKNOWN
        with self._lock:
            if value in self.seen:
                return value
            if len(self.seen) < self.cap:
                self.seen.add(value)
                return value
            self.capped += 1
            return UNKNOWN


class RequestLabels:
    """A waypoint's request log entry → Istio's request labels, resolved from
    the agent's state; unknown values bounded (module docstring)."""

    def __init__(self, cap: int = UNKNOWN_CAP) -> None:
        self.principals = Capped(cap)
        self.flags = Capped(cap)
        self._identities: tuple[StateView | None, frozenset[tuple[str, str]]] = (None, frozenset())

    def _known(self, view: StateView) -> frozenset[tuple[str, str]]:
        """(namespace, service account) of every workload and waypoint in ``view``."""
        seen, ids = self._identities
        if seen is not view:
            snap = view.snapshot
            ids = frozenset(
                [(w.namespace, w.service_account) for w in snap.workloads]
                + [(wp.namespace, wp.account) for wp in snap.waypoints]
            )
            self._identities = (view, ids)
        return ids

    def _principal(self, view: StateView, value: str) -> str:
        """A SPIFFE ID of the mesh's trust domain, else ``unknown``: one the
        state knows as is, others bounded."""
        try:
            ident = SpiffeId.parse(value)
        except (SpiffeIdError, ValueError):
            return UNKNOWN
        if ident.trust_domain != view.trust_domain:
            return UNKNOWN
        if (ident.namespace, ident.service_account) in self._known(view):
            return ident.uri
        return self.principals(ident.uri)

    def _source(self, view: StateView, rec: RequestLog) -> Workload | None:
        """The pod the HBONE client connected from, if its identity is the peer's."""
        try:
            ip, _ = parse_endpoint(rec.downstream_remote)
        except ValueError:
            return None
        w = view.workload_by_ip(ip)
        if w is not None and _uri(view, w) == rec.peer_principal:
            return w
        return None

    def _service(self, view: StateView, rec: RequestLog) -> Service | None:
        """The service whose VIP:port the request was sent to (the CONNECT target)."""
        try:
            ip, port = parse_endpoint(rec.downstream_local)
            hit = view.vips.get((norm_ip(ip), port))
        except ValueError:
            return None
        return hit[0] if hit is not None else None

    def _destination(self, view: StateView, rec: RequestLog) -> Workload | None:
        """The pod that served it (upstream host), else the pod addressed directly."""
        for addr in (rec.upstream_host, rec.downstream_local):
            try:
                ip, _ = parse_endpoint(addr)
            except ValueError:
                continue
            w = view.workload_by_ip(ip)
            if w is not None:
                return w
        return None

    def labels(self, view: StateView, rec: RequestLog) -> dict[str, str]:
        src = self._source(view, rec)
        svc = self._service(view, rec)
        dst = self._destination(view, rec)
        code = rec.response_code if 100 <= rec.response_code < 600 else 0
        flags = rec.response_flags
        if flags != "-" and not set(flags.split(",")) <= _FLAG_CODES:
            flags = UNKNOWN
        grpc = rec.grpc_status if rec.grpc_status.isdigit() and int(rec.grpc_status) <= 16 else ""
        return {
            "reporter": "waypoint",
            "source_workload": src.name if src else UNKNOWN,
            "source_workload_namespace": src.namespace if src else UNKNOWN,
            "source_principal": (
                _uri(view, src) if src else self._principal(view, rec.peer_principal)
            ),
            "source_app": _app(src),
            "destination_workload": dst.name if dst else UNKNOWN,
            "destination_workload_namespace": dst.namespace if dst else UNKNOWN,
            "destination_principal": _uri(view, dst) if dst else UNKNOWN,
            "destination_app": _app(dst),
            "destination_service": svc.hostname if svc else UNKNOWN,
            "destination_service_name": svc.name if svc else UNKNOWN,
            "destination_service_namespace": svc.namespace if svc else UNKNOWN,
            "request_protocol": "grpc" if grpc else "http",
            "response_code": str(code),
            "response_flags": self.flags(flags) if flags != "-" else "-",
            "grpc_response_status": grpc,
            "connection_security_policy": "mutual_tls",
        }


def _uri(view: StateView, w: Workload) -> str:
    """``view.identity_of(w).uri`` without building (and checking) a SpiffeId per request."""
    return f"spiffe://{view.trust_domain}/ns/{w.namespace}/sa/{w.service_account}"


def _app(w: Workload | None) -> str:
    if w is None:
        return UNKNOWN
    return w.labels.get("app.kubernetes.io/name") or w.labels.get("app") or w.name


def _clip(value: str) -> str:
    return value if len(value) <= LOG_FIELD_MAX else value[:LOG_FIELD_MAX] + "..."


def request_record(waypoint: str, rec: RequestLog, labels: dict[str, str]) -> dict[str, object]:
    """One JSON access log line for an HTTP request through a waypoint."""
    return {
        "reporter": "waypoint",
        "waypoint": waypoint,
        "method": rec.method,
        "path": _clip(rec.path),
        "authority": _clip(rec.authority),
        "protocol": rec.protocol,
        "response_code": rec.response_code,
        "response_flags": rec.response_flags,
        "grpc_status": labels["grpc_response_status"],
        "duration_ms": round(rec.duration_ms, 3),
        "request_bytes": rec.request_bytes,
        "response_bytes": rec.response_bytes,
        "src": rec.downstream_remote,
        "src_principal": _clip(rec.peer_principal),
        "src_workload": _key(labels, "source"),
        "dst_service": labels["destination_service"],
        "dst_workload": _key(labels, "destination"),
        "dst_principal": labels["destination_principal"],
        "upstream_cluster": _clip(rec.upstream_cluster),
        "upstream_host": rec.upstream_host,
        "route_name": _clip(rec.route_name),
    }


def _key(labels: dict[str, str], side: str) -> str | None:
    name = labels[f"{side}_workload"]
    return None if name == UNKNOWN else f"{labels[f'{side}_workload_namespace']}/{name}"


def _split(key: str | None) -> tuple[str, str]:
    if not key or "/" not in key:
        return "unknown", "unknown"
    ns, name = key.split("/", 1)
    return name, ns


def labels_of(c: Connection) -> dict[str, str]:
    sw, sns = _split(c.src_workload)
    dw, dns = _split(c.dst_workload)
    return {
        "reporter": c.reporter,
        "source_workload": sw,
        "source_workload_namespace": sns,
        "source_principal": c.src_identity or "unknown",
        "source_app": sw,
        "destination_service": c.dst_service or "unknown",
        "destination_workload": dw,
        "destination_workload_namespace": dns,
        "destination_principal": c.dst_identity or "unknown",
        "request_protocol": "tcp",
        "response_flags": c.flag,
        "connection_security_policy": c.security,
    }


def _children(
    cache: dict[tuple[str, ...], tuple[Any, ...]], key: tuple[str, ...], metrics: tuple[Any, ...]
) -> tuple[Any, ...]:
    """Each metric's child for the label values `key`, looked up once and
    kept (bounded like the label values it is keyed by)."""
    series = cache.get(key)
    if series is None:
        series = cache[key] = tuple(m.labels(*key) for m in metrics)
    return series


class _BpfCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        fam = CounterMetricFamily(
            "tether_bpf_events",
            "Datapath events counted by the BPF programs (tether_stats map)",
            labels=["event"],
        )
        try:
            for k, v in self.stats().items():
                fam.add_metric([k], v)
        except Exception:  # datapath not started yet: export nothing, never fail a scrape
            return
        yield fam


class Metrics:
    def __init__(self, bpf_stats: Callable[[], dict[str, int]] | None = None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.opened = Counter(
            "istio_tcp_connections_opened", "TCP connections opened", LABELS, registry=r
        )
        self.closed = Counter(
            "istio_tcp_connections_closed", "TCP connections closed", LABELS, registry=r
        )
        self.sent = Counter(
            "istio_tcp_sent_bytes", "Bytes sent by the source, per connection", LABELS, registry=r
        )
        self.received = Counter(
            "istio_tcp_received_bytes",
            "Bytes received by the source, per connection",
            LABELS,
            registry=r,
        )
        self.limited = Counter(
            "tether_hbone_limited",
            "Inbound HBONE connections or streams turned away by a limit "
            "(per_source, per_pod, per_agent connections; stream_resets: GOAWAY ENHANCE_YOUR_CALM)",
            ["reason"],
            registry=r,
        )
        self.tls = Counter(
            "tether_hbone_tls_connections",
            "HBONE TLS connections established, by side (client, server) and path "
            "(kernel_tx: the kernel encrypts what is sent; socket: user-space TLS on "
            "the socket; loop: the event loop's TLS)",
            ["side", "path"],
            registry=r,
        )
        self.requests = Counter(
            "istio_requests", "Requests through a waypoint", REQUEST_LABELS, registry=r
        )
        self.request_duration = Histogram(
            "istio_request_duration_milliseconds",
            "Request durations through a waypoint",
            REQUEST_LABELS,
            buckets=DURATION_BUCKETS_MS,
            registry=r,
        )
        self.request_bytes = Histogram(
            "istio_request_bytes",
            "Request sizes (headers and body) through a waypoint",
            REQUEST_LABELS,
            buckets=BYTES_BUCKETS,
            registry=r,
        )
        self.response_bytes = Histogram(
            "istio_response_bytes",
            "Response sizes (headers and body) through a waypoint",
            REQUEST_LABELS,
            buckets=BYTES_BUCKETS,
            registry=r,
        )
        self.request_labels = RequestLabels()
        # label values -> the four metrics' children (labels() costs more than the update)
        self._request_series: dict[tuple[str, ...], tuple[Any, ...]] = {}
        self._tcp_series: dict[tuple[str, ...], tuple[Any, ...]] = {}
        limits.on_limited.append(self.on_limited)
        tlssock.on_established.append(self.on_tls)
        if bpf_stats is not None:
            r.register(_BpfCollector(bpf_stats))

    def on_limited(self, reason: str) -> None:
        self.limited.labels(reason=reason).inc()

    def on_tls(self, side: str, path: str) -> None:
        self.tls.labels(side=side, path=path).inc()

    def _tcp(self, c: Connection) -> tuple[Any, ...]:
        """The four TCP metrics' children for c's labels (labels() with
        twelve keyword labels cost more than the four updates, twice per
        connection)."""
        lab = labels_of(c)
        key = tuple(lab[k] for k in LABELS)
        return _children(
            self._tcp_series, key, (self.opened, self.closed, self.sent, self.received)
        )

    def on_open(self, c: Connection) -> None:
        self._tcp(c)[0].inc()

    def on_close(self, c: Connection) -> None:
        _, closed, sent, received = self._tcp(c)
        closed.inc()
        sent.inc(c.bytes_sent)
        received.inc(c.bytes_received)

    def on_request(self, waypoint: str, rec: RequestLog, view: StateView) -> None:
        """One HTTP request through a local waypoint (an xDS server thread)."""
        lab = self.request_labels.labels(view, rec)
        key = tuple(lab[k] for k in REQUEST_LABELS)
        count, duration, req_bytes, resp_bytes = _children(
            self._request_series,
            key,
            (self.requests, self.request_duration, self.request_bytes, self.response_bytes),
        )
        count.inc()
        duration.observe(rec.duration_ms)
        req_bytes.observe(rec.request_bytes)
        resp_bytes.observe(rec.response_bytes)
        if access_log.isEnabledFor(logging.INFO):
            line = request_record(waypoint, rec, lab)
            access_log.info("%s", json.dumps(line, separators=(",", ":")))

    def exposition(self) -> bytes:
        """The text format for /metrics (served by the agent's own HTTP
        listener, so it can be closed and handed over like the others)."""
        return bytes(generate_latest(self.registry))
