"""Envoy's access log service (ALS) on the waypoint's xDS socket: one record per HTTP request.

Why here: the agent already serves each local waypoint ADS on a unix socket
that only that waypoint's pod can reach (waypoint/xds.py, waypoint/peer.py).
The access logs ride the same socket and the same grpc server, so they pass
the same SO_PEERCRED gate (a process outside the waypoint pod is
disconnected before grpc sees a byte) and the same node id check (a stream
whose identifier names another waypoint is refused).  No new port, no token.

What the translation asks Envoy for (``waypoint/translate/telemetry.py``) is
what ``RequestLog`` carries: response code and flags, duration, bytes, the
HBONE peer's SPIFFE ID (filter state ``io.istio.peer_principal``), upstream
cluster and host, route, method, path, authority, ``grpc-status``.

Threads: StreamAccessLogs runs on the xDS server's grpc pool (one thread per
Envoy worker's stream); ``sink`` is called there, never on the agent's loop.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from google.protobuf import wrappers_pb2

from waypoint.translate.hbone import PEER_PRINCIPAL_KEY

log = logging.getLogger(__name__)

#: Envoy's short response flag names, by the field of ``accesslog.v3.ResponseFlags``
#: (the same letters as ``%RESPONSE_FLAGS%`` and Istio's ``response_flags`` label).
FLAG_CODES = {
    "failed_local_healthcheck": "LH",
    "no_healthy_upstream": "UH",
    "upstream_request_timeout": "UT",
    "local_reset": "LR",
    "upstream_remote_reset": "UR",
    "upstream_connection_failure": "UF",
    "upstream_connection_termination": "UC",
    "upstream_overflow": "UO",
    "no_route_found": "NR",
    "delay_injected": "DI",
    "fault_injected": "FI",
    "rate_limited": "RL",
    "unauthorized_details": "UAEX",
    "rate_limit_service_error": "RLSE",
    "downstream_connection_termination": "DC",
    "upstream_retry_limit_exceeded": "URX",
    "stream_idle_timeout": "SI",
    "invalid_envoy_request_headers": "IH",
    "downstream_protocol_error": "DPE",
    "upstream_max_stream_duration_reached": "UMSDR",
    "response_from_cache_filter": "RFCF",
    "no_filter_config_found": "NFCF",
    "duration_timeout": "DT",
    "upstream_protocol_error": "UPE",
    "no_cluster_found": "NC",
    "overload_manager": "OM",
    "dns_resolution_failure": "DF",
    "downstream_remote_reset": "DR",
}
#: the order Envoy prints them in (a stable label value for a set of flags)
_FLAG_ORDER = tuple(FLAG_CODES)

GRPC_STATUS = "grpc-status"

#: sink(node id, record): called on a grpc thread for every HTTP log entry
Sink = Callable[[str, "RequestLog"], None]


@dataclasses.dataclass(frozen=True)
class RequestLog:
    """One HTTP request as the waypoint's Envoy logged it (raw: nothing here
    is trusted or bounded; ``agent/metrics.py`` decides what becomes a label)."""

    response_code: int = 0
    response_flags: str = "-"
    duration_ms: float = 0.0
    request_bytes: int = 0
    response_bytes: int = 0
    peer_principal: str = ""
    downstream_remote: str = ""  # ip:port (the HBONE client, restored by original_dst)
    downstream_local: str = ""  # ip:port (the CONNECT target: a VIP or a pod)
    upstream_cluster: str = ""
    upstream_host: str = ""  # ip:port of the endpoint ("" when none was picked)
    route_name: str = ""
    method: str = ""
    path: str = ""
    authority: str = ""
    protocol: str = ""
    grpc_status: str = ""


def _addr(a: Any) -> str:
    """``ip:port`` of an envoy Address; an internal address's endpoint id
    (the translation puts the pod's ``ip:port`` there)."""
    which = a.WhichOneof("address")
    if which == "socket_address":
        sa = a.socket_address
        host = f"[{sa.address}]" if ":" in sa.address else sa.address
        return f"{host}:{sa.port_value}"
    if which == "envoy_internal_address":
        return str(a.envoy_internal_address.endpoint_id)
    return ""


def flags(f: accesslog_pb2.ResponseFlags) -> str:
    """Envoy's short names, comma separated, ``-`` for none (as Istio labels them)."""
    set_ = {d.name for d, v in f.ListFields() if v}
    out = [FLAG_CODES[n] for n in _FLAG_ORDER if n in set_]
    return ",".join(out) if out else "-"


def _filter_state_string(common: accesslog_pb2.AccessLogCommon, key: str) -> str:
    any_ = common.filter_state_objects.get(key)
    if any_ is None:
        return ""
    s = wrappers_pb2.StringValue()
    if any_.Is(s.DESCRIPTOR) and any_.Unpack(s):
        return str(s.value)
    return ""


def _ms(d: Any) -> float:
    return float(d.seconds) * 1000.0 + float(d.nanos) / 1e6


_PROTOCOLS = {1: "HTTP/1.0", 2: "HTTP/1.1", 3: "HTTP/2", 4: "HTTP/3"}


def from_entry(e: accesslog_pb2.HTTPAccessLogEntry) -> RequestLog:
    c, rq, rs = e.common_properties, e.request, e.response
    grpc_status = rs.response_trailers.get(GRPC_STATUS) or rs.response_headers.get(GRPC_STATUS, "")
    duration = c.duration if c.HasField("duration") else c.time_to_last_downstream_tx_byte
    return RequestLog(
        response_code=rs.response_code.value if rs.HasField("response_code") else 0,
        response_flags=flags(c.response_flags),
        duration_ms=_ms(duration),
        request_bytes=int(rq.request_headers_bytes + rq.request_body_bytes),
        response_bytes=int(rs.response_headers_bytes + rs.response_body_bytes),
        peer_principal=_filter_state_string(c, PEER_PRINCIPAL_KEY),
        downstream_remote=_addr(c.downstream_remote_address),
        downstream_local=_addr(c.downstream_local_address),
        upstream_cluster=c.upstream_cluster,
        upstream_host=_addr(c.upstream_remote_address),
        route_name=c.route_name,
        method=base_pb2.RequestMethod.Name(rq.request_method) if rq.request_method else "",
        path=rq.path,
        authority=rq.authority,
        protocol=_PROTOCOLS.get(e.protocol_version, ""),
        grpc_status=grpc_status,
    )


class AccessLogServicer(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """StreamAccessLogs for the node ids one socket serves; records go to ``sink``."""

    def __init__(self, node_ids: Iterable[str], sink: Sink, name: str = "") -> None:
        self.node_ids = frozenset(node_ids)
        self.sink = sink
        self.name = name

    def StreamAccessLogs(
        self, request_iterator: Iterator[als_pb2.StreamAccessLogsMessage], context: Any
    ) -> als_pb2.StreamAccessLogsResponse:
        node = ""
        for msg in request_iterator:
            if not node:
                # Envoy sends the identifier on a stream's first message only
                node = msg.identifier.node.id
                if node not in self.node_ids:
                    log.warning(
                        "als: refused node id %r on %s (serves %s)",
                        node,
                        self.name,
                        sorted(self.node_ids),
                    )
                    context.abort(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"node {node!r} is not served on this socket",
                    )
            for entry in msg.http_logs.log_entry:
                try:
                    rec = from_entry(entry)
                except Exception:  # one odd entry must not end the stream
                    log.exception("als: undecodable entry from %s", node)
                    continue
                try:
                    self.sink(node, rec)
                except Exception:
                    log.exception("als: sink failed")
        return als_pb2.StreamAccessLogsResponse()


def add_to_server(servicer: AccessLogServicer, server: grpc.Server) -> None:
    als_pb2_grpc.add_AccessLogServiceServicer_to_server(servicer, server)
