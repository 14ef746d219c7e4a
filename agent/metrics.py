"""Prometheus metrics with Istio's names and labels (ztunnel's set), plus the
datapath's BPF counters, served on :15020/metrics.

Dashboards and alerts written for Istio ambient work unchanged: the same
metric names, the same `reporter`, `*_principal`, `response_flags` and
`connection_security_policy` labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from agent.tunnel import limits
from agent.tunnel.conns import Connection

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
        limits.on_limited.append(self.on_limited)
        if bpf_stats is not None:
            r.register(_BpfCollector(bpf_stats))

    def on_limited(self, reason: str) -> None:
        self.limited.labels(reason=reason).inc()

    def on_open(self, c: Connection) -> None:
        self.opened.labels(**labels_of(c)).inc()

    def on_close(self, c: Connection) -> None:
        lab = labels_of(c)
        self.closed.labels(**lab).inc()
        self.sent.labels(**lab).inc(c.bytes_sent)
        self.received.labels(**lab).inc(c.bytes_received)

    def exposition(self) -> bytes:
        """The text format for /metrics (served by the agent's own HTTP
        listener, so it can be closed and handed over like the others)."""
        return bytes(generate_latest(self.registry))
