"""The access log service on the waypoint's xDS socket (no Envoy): an entry as Envoy
sends it becomes a RequestLog; a stream from a process outside the waypoint pod, or
naming another waypoint's node id, never reaches the sink."""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.waypoint.gate import require_waypoint_extra

require_waypoint_extra()

import grpc  # noqa: E402
from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.data.accesslog.v3 import accesslog_pb2  # noqa: E402
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc  # noqa: E402
from google.protobuf import any_pb2, wrappers_pb2  # noqa: E402

from waypoint import envoy as envoy_mod  # noqa: E402
from waypoint.als import RequestLog, flags, from_entry  # noqa: E402
from waypoint.peer import peer_in_netns  # noqa: E402
from waypoint.translate.hbone import PEER_PRINCIPAL_KEY  # noqa: E402
from waypoint.translate.telemetry import ALS_CLUSTER  # noqa: E402
from waypoint.xds import SnapshotCache, XdsServer, node_id, socket_path  # noqa: E402

NODE = node_id("shop", "wp")
CLIENT = "spiffe://cluster.local/ns/shop/sa/sa-client"


def entry(code: int = 200, **flag: bool) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry(protocol_version=2)
    c = e.common_properties
    c.downstream_remote_address.socket_address.address = "10.1.0.5"
    c.downstream_remote_address.socket_address.port_value = 40000
    c.downstream_local_address.socket_address.address = "10.96.88.8"
    c.downstream_local_address.socket_address.port_value = 80
    c.upstream_remote_address.envoy_internal_address.server_listener_name = "connect_originate"
    c.upstream_remote_address.envoy_internal_address.endpoint_id = "10.2.0.7:8080"
    c.upstream_cluster = "outbound|80||echo.shop.svc.cluster.local"
    c.route_name = "default"
    c.duration.FromMilliseconds(12)
    principal = any_pb2.Any()
    principal.Pack(wrappers_pb2.StringValue(value=CLIENT))
    c.filter_state_objects[PEER_PRINCIPAL_KEY].CopyFrom(principal)
    for name, on in flag.items():
        setattr(c.response_flags, name, on)
    e.request.request_method = base_pb2.RequestMethod.Value("DELETE")
    e.request.path = "/admin/users"
    e.request.authority = "echo"
    e.request.request_headers_bytes = 100
    e.request.request_body_bytes = 20
    e.response.response_code.value = code
    e.response.response_headers_bytes = 50
    e.response.response_body_bytes = 19
    e.response.response_trailers["grpc-status"] = "14"
    return e


def test_an_entry_becomes_a_request_log() -> None:
    rec = from_entry(
        entry(503, upstream_connection_failure=True, upstream_retry_limit_exceeded=True)
    )
    assert rec == RequestLog(
        response_code=503,
        response_flags="UF,URX",
        duration_ms=12.0,
        request_bytes=120,
        response_bytes=69,
        peer_principal=CLIENT,
        downstream_remote="10.1.0.5:40000",
        downstream_local="10.96.88.8:80",
        upstream_cluster="outbound|80||echo.shop.svc.cluster.local",
        upstream_host="10.2.0.7:8080",
        route_name="default",
        method="DELETE",
        path="/admin/users",
        authority="echo",
        protocol="HTTP/1.1",
        grpc_status="14",
    )


def test_no_flags_is_a_dash_and_unset_fields_are_empty() -> None:
    assert flags(accesslog_pb2.ResponseFlags()) == "-"
    rec = from_entry(accesslog_pb2.HTTPAccessLogEntry())
    assert (rec.response_code, rec.peer_principal, rec.upstream_host, rec.method) == (0, "", "", "")


def test_the_log_cluster_is_the_bootstrap_ads_cluster() -> None:
    """The access logs go over the agent's per-waypoint socket, nowhere else."""
    assert ALS_CLUSTER == envoy_mod.XDS_CLUSTER


# -- over the gated socket ------------------------------------------------------------


@pytest.fixture
def xds_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="wpals-") as d:
        yield Path(d)


class Sink:
    def __init__(self) -> None:
        self.got: list[tuple[str, RequestLog]] = []
        self.lock = threading.Lock()

    def __call__(self, node: str, rec: RequestLog) -> None:
        with self.lock:
            self.got.append((node, rec))


def serve(xds_dir: Path, sink: Sink) -> XdsServer:
    srv = XdsServer(
        SnapshotCache(),
        socket_path(xds_dir, "shop", "wp"),
        [NODE],
        peer_check=peer_in_netns("/proc/self/ns/net"),  # this test process plays the pod
        access_log=sink,
    )
    srv.start()
    return srv


def send(path: Path, node: str, batches: list[list[accesslog_pb2.HTTPAccessLogEntry]]) -> None:
    msgs = []
    for i, batch in enumerate(batches):
        m = als_pb2.StreamAccessLogsMessage()
        if i == 0:
            m.identifier.node.id = node
            m.identifier.log_name = "tether-waypoint"
        m.http_logs.log_entry.extend(batch)
        msgs.append(m)
    with grpc.insecure_channel(f"unix:{path}") as ch:
        als_pb2_grpc.AccessLogServiceStub(ch).StreamAccessLogs(iter(msgs), timeout=10)


def test_entries_from_the_waypoint_pod_reach_the_sink(xds_dir: Path) -> None:
    sink = Sink()
    srv = serve(xds_dir, sink)
    try:
        send(srv.path, NODE, [[entry(200), entry(403)], [entry(200)]])
        assert [(n, r.response_code) for n, r in sink.got] == [
            (NODE, 200),
            (NODE, 403),
            (NODE, 200),
        ]
        assert all(r.peer_principal == CLIENT for _, r in sink.got)
    finally:
        srv.stop(grace=0)


def test_another_waypoints_node_id_is_refused(xds_dir: Path) -> None:
    sink = Sink()
    srv = serve(xds_dir, sink)
    try:
        with pytest.raises(grpc.RpcError) as err:
            send(srv.path, node_id("bank", "wp"), [[entry(200)]])
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert sink.got == []
    finally:
        srv.stop(grace=0)


def test_a_process_outside_the_waypoint_pod_is_refused_before_grpc(xds_dir: Path) -> None:
    sink = Sink()
    srv = serve(xds_dir, sink)
    assert srv.gate is not None
    srv.gate.check = lambda p: False  # the peer is not in the waypoint's pod
    try:
        with pytest.raises(grpc.RpcError) as err:
            send(srv.path, NODE, [[entry(200)]])
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert srv.gate.refused >= 1 and sink.got == []
    finally:
        srv.stop(grace=0)
