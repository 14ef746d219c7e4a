"""Prometheus metrics with Istio's names and labels (ztunnel's set), plus the
datapath's BPF counters, served on :15020/metrics.

Dashboards and alerts written for Istio ambient work unchanged: the same
metric names, the same `reporter`, `*_principal`, `response_flags` and
`connection_security_policy` labels.

The text exposition (format 0.0.4, counters only) is written here rather
than with prometheus_client, whose import (exposition servers, wsgiref,
urllib, http.client) cost the agent ~3 MiB resident for five counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

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


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _family(
    name: str, doc: str, labelnames: Sequence[str], samples: Iterable[tuple[Sequence[str], float]]
) -> list[str]:
    """One counter family as prometheus_client writes it: `<name>_total`."""
    full = f"{name}_total"
    doc = doc.replace("\\", "\\\\").replace("\n", "\\n")
    lines = [f"# HELP {full} {doc}", f"# TYPE {full} counter"]
    for values, v in samples:
        labels = ",".join(f'{k}="{_escape(x)}"' for k, x in zip(labelnames, values, strict=True))
        lines.append(f"{full}{{{labels}}} {float(v)!r}" if labels else f"{full} {float(v)!r}")
    return lines


class Counter:
    """A labelled counter: `labels(**values).inc(n)`, as prometheus_client's."""

    def __init__(self, name: str, doc: str, labelnames: Sequence[str]) -> None:
        self.name, self.doc, self.labelnames = name, doc, tuple(labelnames)
        self.values: dict[tuple[str, ...], float] = {}

    def labels(self, **values: str) -> _Child:
        return _Child(self, tuple(str(values[k]) for k in self.labelnames))

    def render(self) -> list[str]:
        return _family(self.name, self.doc, self.labelnames, list(self.values.items()))


class _Child:
    __slots__ = ("counter", "key")

    def __init__(self, counter: Counter, key: tuple[str, ...]) -> None:
        self.counter, self.key = counter, key

    def inc(self, n: float = 1.0) -> None:
        if n < 0:
            raise ValueError("counters only go up")
        v = self.counter.values
        v[self.key] = v.get(self.key, 0.0) + n


class Metrics:
    def __init__(self, bpf_stats: Callable[[], dict[str, int]] | None = None) -> None:
        self.bpf_stats = bpf_stats
        self.opened = Counter("istio_tcp_connections_opened", "TCP connections opened", LABELS)
        self.closed = Counter("istio_tcp_connections_closed", "TCP connections closed", LABELS)
        self.sent = Counter(
            "istio_tcp_sent_bytes", "Bytes sent by the source, per connection", LABELS
        )
        self.received = Counter(
            "istio_tcp_received_bytes", "Bytes received by the source, per connection", LABELS
        )
        self.limited = Counter(
            "tether_hbone_limited",
            "Inbound HBONE connections or streams turned away by a limit "
            "(per_source, per_pod, per_agent connections; stream_resets: GOAWAY ENHANCE_YOUR_CALM)",
            ["reason"],
        )
        limits.on_limited.append(self.on_limited)

    def on_limited(self, reason: str) -> None:
        self.limited.labels(reason=reason).inc()

    def on_open(self, c: Connection) -> None:
        self.opened.labels(**labels_of(c)).inc()

    def on_close(self, c: Connection) -> None:
        lab = labels_of(c)
        self.closed.labels(**lab).inc()
        self.sent.labels(**lab).inc(c.bytes_sent)
        self.received.labels(**lab).inc(c.bytes_received)

    def _bpf(self) -> list[str]:
        if self.bpf_stats is None:
            return []
        try:
            stats = self.bpf_stats()
        except Exception:  # datapath not started yet: export nothing, never fail a scrape
            return []
        return _family(
            "tether_bpf_events",
            "Datapath events counted by the BPF programs (tether_stats map)",
            ["event"],
            (([k], v) for k, v in stats.items()),
        )

    def exposition(self) -> bytes:
        """The text format for /metrics (served by the agent's own HTTP
        listener, so it can be closed and handed over like the others)."""
        lines: list[str] = []
        for c in (self.opened, self.closed, self.sent, self.received, self.limited):
            lines += c.render()
        lines += self._bpf()
        return ("\n".join(lines) + "\n").encode()
