"""Istio's request metrics from the waypoint's access log entries: labels resolved
from the agent's state, the JSON access log line, and the bound on label values that
a client (paths, headers, principals, status codes) cannot lift."""

from __future__ import annotations

import dataclasses
import json
import logging

import pytest

from tests.waypoint.gate import require_waypoint_extra

require_waypoint_extra()

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from agent.metrics import UNKNOWN_CAP, Metrics, RequestLabels  # noqa: E402
from agent.model import Service, ServicePort, Snapshot, Workload  # noqa: E402
from agent.model.waypoint import Waypoint  # noqa: E402
from agent.state.state import StateView, build_view  # noqa: E402
from waypoint.als import RequestLog  # noqa: E402

TD = "cluster.local"
CLIENT = Workload("client", "shop", "sa-client", "n1", ("10.1.0.5",), {"app": "client"})
ECHO = Workload("echo-v1", "shop", "echo", "n2", ("10.2.0.7",), {"app": "echo", "version": "v1"})
ECHO_SVC = Service(
    "echo", "shop", ("10.96.88.8", "fd00:96::8"), (ServicePort(80, 8080, "http"),), {"app": "echo"}
)
WP = Waypoint("wp", "shop", ("10.1.0.9",), "n1")
CLIENT_ID = f"spiffe://{TD}/ns/shop/sa/sa-client"
ECHO_ID = f"spiffe://{TD}/ns/shop/sa/echo"

OK = RequestLog(
    response_code=200,
    duration_ms=3.5,
    request_bytes=120,
    response_bytes=300,
    peer_principal=CLIENT_ID,
    downstream_remote="10.1.0.5:40000",
    downstream_local="10.96.88.8:80",
    upstream_cluster="outbound|80|v1|echo.shop.svc.cluster.local",
    upstream_host="10.2.0.7:8080",
    route_name="default",
    method="GET",
    path="/items/1",
    authority="echo",
    protocol="HTTP/1.1",
)
DENIED = dataclasses.replace(
    OK, response_code=403, upstream_cluster="", upstream_host="", method="DELETE"
)


@pytest.fixture
def view() -> StateView:
    snap = Snapshot("n1", {"shop": {}}, (CLIENT, ECHO), (ECHO_SVC,), (), (WP,))
    return build_view(snap, TD, None, 1)


def test_an_allowed_request_is_labelled_from_the_agents_state(view: StateView) -> None:
    assert RequestLabels().labels(view, OK) == {
        "reporter": "waypoint",
        "source_workload": "client",
        "source_workload_namespace": "shop",
        "source_principal": CLIENT_ID,
        "source_app": "client",
        "destination_workload": "echo-v1",
        "destination_workload_namespace": "shop",
        "destination_principal": ECHO_ID,
        "destination_app": "echo",
        "destination_service": "echo.shop.svc.cluster.local",
        "destination_service_name": "echo",
        "destination_service_namespace": "shop",
        "request_protocol": "http",
        "response_code": "200",
        "response_flags": "-",
        "grpc_response_status": "",
        "connection_security_policy": "mutual_tls",
    }


def test_a_denied_request_has_the_service_but_no_destination_pod(view: StateView) -> None:
    lab = RequestLabels().labels(view, DENIED)
    assert lab["response_code"] == "403" and lab["source_principal"] == CLIENT_ID
    assert lab["destination_service"] == "echo.shop.svc.cluster.local"
    assert lab["destination_workload"] == "unknown" and lab["destination_principal"] == "unknown"


def test_an_ipv6_vip_in_any_spelling_and_garbage_addresses(view: StateView) -> None:
    rl = RequestLabels()
    v6 = rl.labels(view, dataclasses.replace(OK, downstream_local="[fd00:96:0:0::8]:80"))
    assert v6["destination_service_name"] == "echo"
    bad = dataclasses.replace(
        OK, downstream_local="nope:80", downstream_remote="[::zz]:1", upstream_host="x"
    )
    lab = rl.labels(view, bad)
    assert lab["destination_service"] == lab["source_workload"] == "unknown"
    assert lab["destination_workload"] == "unknown"


def test_a_source_address_is_trusted_only_with_its_pods_identity(view: StateView) -> None:
    """The client's IP with the echo pods' certificate: not the client workload."""
    lab = RequestLabels().labels(view, dataclasses.replace(OK, peer_principal=ECHO_ID))
    assert lab["source_workload"] == "unknown" and lab["source_principal"] == ECHO_ID


def test_grpc_status_makes_it_grpc_and_odd_values_are_dropped(view: StateView) -> None:
    rl = RequestLabels()
    assert rl.labels(view, dataclasses.replace(OK, grpc_status="14"))["request_protocol"] == "grpc"
    for bad in ("99", "-1", "OK", "1" * 50):
        lab = rl.labels(view, dataclasses.replace(OK, grpc_status=bad))
        assert lab["grpc_response_status"] == "" and lab["request_protocol"] == "http"
    assert rl.labels(view, dataclasses.replace(OK, response_code=1234))["response_code"] == "0"
    assert rl.labels(view, dataclasses.replace(OK, response_flags="UF,URX"))["response_flags"] == (
        "UF,URX"
    )
    assert rl.labels(view, dataclasses.replace(OK, response_flags="<x>"))["response_flags"] == (
        "unknown"
    )


def series(m: Metrics, name: str) -> list[dict[str, str]]:
    text = m.exposition().decode()
    return [
        s.labels
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == name
    ]


def test_hostile_requests_cannot_grow_the_series_without_bound(view: StateView) -> None:
    m = Metrics()
    n = 2000
    for i in range(n):
        rec = dataclasses.replace(
            OK,
            path=f"/p/{i}",
            authority=f"h{i}.example",
            method=f"M{i}",
            route_name=f"r{i}",
            upstream_cluster=f"outbound|80||x{i}",
            peer_principal=f"spiffe://{TD}/ns/evil/sa/sa{i}",  # a fresh identity each time
            downstream_remote=f"10.9.{i // 250}.{i % 250}:1",
            upstream_host=f"10.8.{i // 250}.{i % 250}:1",
            response_code=600 + i,
            grpc_status=str(i),
        )
        m.on_request("shop/wp", rec, view)
    got = series(m, "istio_requests_total")
    assert sum(1 for _ in got) <= UNKNOWN_CAP + 1
    principals = {s["source_principal"] for s in got}
    assert len(principals) == UNKNOWN_CAP + 1 and "unknown" in principals
    assert m.request_labels.principals.capped == n - UNKNOWN_CAP
    text = m.exposition().decode()
    assert "/p/1" not in text and "example" not in text and "M1" not in text
    total = sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "istio_requests_total"
    )
    assert total == n  # every request counted, just not in its own series


def test_foreign_and_malformed_principals_are_unknown_and_uncounted(view: StateView) -> None:
    rl = RequestLabels(cap=2)
    for p in ("spiffe://other.td/ns/a/sa/b", "not a uri", "spiffe://cluster.local/x", ""):
        assert rl.labels(view, dataclasses.replace(OK, peer_principal=p))["source_principal"] == (
            "unknown"
        )
    assert rl.principals.seen == set()
    # a known identity never uses up the cap
    for _ in range(3):
        lab = rl.labels(
            view,
            dataclasses.replace(OK, peer_principal=ECHO_ID, downstream_remote="10.3.3.3:1"),
        )
        assert lab["source_principal"] == ECHO_ID
    assert rl.principals.seen == set()


def test_metrics_and_the_json_access_log_line(
    view: StateView, caplog: pytest.LogCaptureFixture
) -> None:
    m = Metrics()
    with caplog.at_level(logging.INFO, logger="tether.access"):
        for rec in (OK, OK, DENIED):
            m.on_request("shop/wp", rec, view)
    counts = {s["response_code"]: s for s in series(m, "istio_requests_total")}
    assert set(counts) == {"200", "403"}
    text = m.exposition().decode()
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    req = {s.labels["response_code"]: s.value for s in fams["istio_requests"].samples}
    assert req == {"200": 2.0, "403": 1.0}
    dur = fams["istio_request_duration_milliseconds"]
    ok_count = next(
        s.value
        for s in dur.samples
        if s.name.endswith("_count") and s.labels["response_code"] == "200"
    )
    le5 = next(
        s.value
        for s in dur.samples
        if s.name.endswith("_bucket")
        and s.labels["response_code"] == "200"
        and s.labels["le"] == "5.0"
    )
    assert ok_count == 2.0 and le5 == 2.0
    rb = next(
        s.value
        for s in fams["istio_response_bytes"].samples
        if s.name.endswith("_sum") and s.labels["response_code"] == "200"
    )
    assert rb == 600.0
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tether.access"]
    assert len(lines) == 3
    assert lines[2] == {
        "reporter": "waypoint",
        "waypoint": "shop/wp",
        "method": "DELETE",
        "path": "/items/1",
        "authority": "echo",
        "protocol": "HTTP/1.1",
        "response_code": 403,
        "response_flags": "-",
        "grpc_status": "",
        "duration_ms": 3.5,
        "request_bytes": 120,
        "response_bytes": 300,
        "src": "10.1.0.5:40000",
        "src_principal": CLIENT_ID,
        "src_workload": "shop/client",
        "dst_service": "echo.shop.svc.cluster.local",
        "dst_workload": None,
        "dst_principal": "unknown",
        "upstream_cluster": "",
        "upstream_host": "",
        "route_name": "default",
    }


def test_a_long_path_is_clipped_in_the_log_line(
    view: StateView, caplog: pytest.LogCaptureFixture
) -> None:
    m = Metrics()
    with caplog.at_level(logging.INFO, logger="tether.access"):
        m.on_request("shop/wp", dataclasses.replace(OK, path="/" + "a" * 10000), view)
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tether.access"]
    assert len(line["path"]) < 600
