"""The waypoint's Envoy layout and clusters (waypoint/translate): HBONE in,
one chain per service VIP:port, HBONE out per destination identity,
DestinationRule settings; determinism and minimal change; the seeds; the
golden resources of the blog-api canary."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from waypoint_scenario import (
    SERVICES,
    WORKLOADS,
    as_dict,
    chain,
    cluster,
    contains,
    doc,
    listener,
    load_seeds,
    routes,
    run,
    seed_dir,
    seeds,
    view_of,
)

from agent.model import Workload
from agent.model.waypoint import Waypoint
from waypoint.translate import CLUSTER, LISTENER, ROUTE, encode, translate
from waypoint.translate.common import duration, message
from waypoint.translate.mesh import HANDLED, NOT_APPLIED, OTHER_MESH_KINDS, group_of
from waypoint.translate.protos import Cluster

GOLDEN = Path(__file__).parent / "golden" / "waypoint_blog_api_canary.json"
BLOG_API = "blog-api.blog.svc.cluster.local"


# -- layout -------------------------------------------------------------------


def test_hbone_listener_terminates_mtls_connect_into_main_internal() -> None:
    res, _ = run([])
    hb = listener(res, "hbone")
    assert hb["address"]["socket_address"] == {"address": "10.1.0.9", "port_value": 15008}
    fc = hb["filter_chains"][0]
    tls = fc["transport_socket"]["typed_config"]
    assert tls["require_client_certificate"] is True
    ctx = tls["common_tls_context"]
    assert ctx["alpn_protocols"] == ["h2"]
    assert ctx["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_3"
    assert ctx["tls_certificate_sds_secret_configs"][0]["name"] == "default"
    cvc = ctx["combined_validation_context"]
    assert cvc["validation_context_sds_secret_config"]["name"] == "ROOTCA"
    assert cvc["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"prefix": "spiffe://cluster.local/"}}
    ]
    hcm = fc["filters"][0]["typed_config"]
    assert hcm["codec_type"] == "HTTP2"
    assert hcm["http2_protocol_options"] == {"allow_connect": True}
    assert hcm["upgrade_configs"] == [{"upgrade_type": "CONNECT"}]
    route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]
    assert route["match"] == {"connect_matcher": {}}
    assert route["route"]["cluster"] == "main_internal"
    assert route["route"]["upgrade_configs"] == [{"upgrade_type": "CONNECT", "connect_config": {}}]
    sfs = hcm["http_filters"][0]
    assert sfs["name"] == "envoy.filters.http.set_filter_state"
    states = {s["object_key"]: s for s in sfs["typed_config"]["on_request_headers"]}
    assert states["envoy.filters.listener.original_dst.local_ip"]["format_string"] == {
        "text_format_source": {"inline_string": "%REQ(:AUTHORITY)%"}
    }
    assert "envoy.filters.listener.original_dst.remote_ip" in states
    peer = states["io.istio.peer_principal"]
    assert peer["factory_key"] == "envoy.string"
    assert peer["shared_with_upstream"] == "ONCE"
    assert peer["format_string"]["text_format_source"]["inline_string"] == (
        "%DOWNSTREAM_PEER_URI_SAN%"
    )


def test_main_internal_cluster_is_the_internal_listener() -> None:
    res, _ = run([])
    mi = cluster(res, "main_internal")
    ep = mi["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert ep["address"] == {"envoy_internal_address": {"server_listener_name": "main_internal"}}
    assert mi["transport_socket"]["name"] == "envoy.transport_sockets.internal_upstream"


def test_one_chain_per_service_vip_and_port_codec_auto() -> None:
    res, _ = run([])
    main = listener(res, "main_internal")
    assert main["internal_listener"] == {}
    assert main["listener_filters"][0]["name"] == "envoy.filters.listener.original_dst"
    names = [fc["name"] for fc in main["filter_chains"]]
    assert names == [
        f"inbound-vip|8080|http|{BLOG_API}",
        "inbound-vip|9090|http|user-service.blog.svc.cluster.local",
        "inbound-vip|80|http|myapp.default.svc.cluster.local",
        "inbound-vip|80|http|myapp.production.svc.cluster.local",
    ]
    fc = chain(res)
    assert fc["filter_chain_match"] == {
        "prefix_ranges": [{"address_prefix": "10.96.0.10", "prefix_len": 32}],
        "destination_port": 8080,
    }
    hcm = fc["filters"][0]["typed_config"]
    assert hcm.get("codec_type", "AUTO") == "AUTO"  # the enum default: omitted in JSON
    assert hcm["rds"]["route_config_name"] == f"inbound-vip|8080|http|{BLOG_API}"
    assert [f["name"] for f in hcm["http_filters"]] == [
        "envoy.filters.http.fault",
        "envoy.filters.http.router",
    ]


def test_service_not_using_the_waypoint_gets_no_chain() -> None:
    res, _ = run([], namespaces={"blog": {"istio.io/use-waypoint": "waypoint"}})
    names = [fc["name"] for fc in listener(res, "main_internal")["filter_chains"]]
    assert "inbound-vip|80|http|myapp.default.svc.cluster.local" not in names


def test_default_route_and_cluster_endpoints_through_hbone() -> None:
    res, _ = run([])
    (r,) = routes(res)
    assert r["match"] == {"prefix": "/"}
    assert r["route"]["cluster"] == f"outbound|8080||{BLOG_API}"
    assert r["route"]["timeout"] == "0s"
    assert r["route"]["retry_policy"]["num_retries"] == 2
    c = cluster(res, f"outbound|8080||{BLOG_API}")
    assert c["type"] == "STATIC"
    assert c["lb_policy"] == "LEAST_REQUEST"
    eps = c["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["envoy_internal_address"] for e in eps] == [
        {
            "server_listener_name": "connect_originate|blog|blog-api",
            "endpoint_id": "10.1.0.11:8080",
        },
        {
            "server_listener_name": "connect_originate|blog|blog-api",
            "endpoint_id": "10.1.0.12:8080",
        },
    ]
    assert eps[0]["metadata"]["filter_metadata"] == {
        "envoy.filters.listener.original_dst": {"local": "10.1.0.11:8080"},
        "envoy.transport_socket_match": {"tunnel": "hbone"},
    }
    (tsm,) = c["transport_socket_matches"]
    assert tsm["match"] == {"tunnel": "hbone"}
    assert tsm["transport_socket"]["typed_config"]["passthrough_metadata"] == [
        {"kind": {"host": {}}, "name": "envoy.filters.listener.original_dst"}
    ]


def test_originate_listener_and_cluster_per_destination_identity() -> None:
    res, _ = run([])
    lis = listener(res, "connect_originate|blog|blog-api")
    assert lis["internal_listener"] == {}
    assert lis["listener_filters"][0]["name"] == "envoy.filters.listener.original_dst"
    tcp = lis["filter_chains"][0]["filters"][0]["typed_config"]
    assert tcp["cluster"] == "connect_originate_cluster|blog|blog-api"
    assert tcp["tunneling_config"] == {"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"}
    c = cluster(res, "connect_originate_cluster|blog|blog-api")
    assert c["type"] == "ORIGINAL_DST"
    assert c["lb_policy"] == "CLUSTER_PROVIDED"
    assert c["original_dst_lb_config"] == {"upstream_port_override": 15008}
    opts = c["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
    ]
    assert opts["explicit_http_config"] == {"http2_protocol_options": {}}
    ctx = c["transport_socket"]["typed_config"]["common_tls_context"]
    assert ctx["alpn_protocols"] == ["h2"]
    assert ctx["combined_validation_context"]["default_validation_context"][
        "match_typed_subject_alt_names"
    ] == [{"san_type": "URI", "matcher": {"exact": "spiffe://cluster.local/ns/blog/sa/blog-api"}}]
    assert sorted(n for n in res[LISTENER] if n.startswith("connect_originate")) == [
        "connect_originate|blog|blog-api",
        "connect_originate|blog|user-service",
        "connect_originate|default|myapp",
        "connect_originate|production|myapp",
    ]


def test_pod_outside_the_mesh_is_reached_in_plaintext() -> None:
    wls = (
        *WORKLOADS[:1],
        Workload(
            "legacy",
            "blog",
            "legacy",
            "n2",
            ("10.1.0.30",),
            {"app": "blog-api", "istio.io/dataplane-mode": "none"},
        ),
    )
    res, _ = run([], workloads=wls)
    eps = cluster(res, f"outbound|8080||{BLOG_API}")["load_assignment"]["endpoints"][0][
        "lb_endpoints"
    ]
    assert eps[1] == {
        "endpoint": {"address": {"socket_address": {"address": "10.1.0.30", "port_value": 8080}}}
    }


def test_workload_addressed_waypoint_gets_a_pod_chain() -> None:
    wp = Waypoint("waypoint", "blog", ("10.1.0.9",), "n1", traffic_for="all")
    from waypoint_scenario import view_of

    res, _ = translate(view_of([], waypoints=(wp,)), wp)
    fc = chain(res, "inbound-pod|blog/blog-api-v1")
    assert fc["filter_chain_match"] == {
        "prefix_ranges": [{"address_prefix": "10.1.0.11", "prefix_len": 32}]
    }
    c = cluster(res, "inbound-pod|blog/blog-api-v1")
    assert c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] == {
        "envoy_internal_address": {"server_listener_name": "connect_originate|blog|blog-api"}
    }


def test_unknown_field_is_refused_when_building_a_message() -> None:
    with pytest.raises(json_format.ParseError):
        message(Cluster, {"name": "x", "no_such_field": 1})


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("30s", "30s"),
        ("1.5s", "1.5s"),
        ("100ms", "0.1s"),
        ("1h30m", "5400s"),
        ("0s", "0s"),
        ("10", None),
        ("s", None),
        ("-1s", None),
    ],
)
def test_duration(text: str, want: str | None) -> None:
    assert duration(text) == want


# -- DestinationRule ------------------------------------------------------------


def lb_policy(res: Any, name: str) -> str:
    """The enum by name (ROUND_ROBIN is the default, so JSON leaves it out)."""
    msg = res[CLUSTER][name]
    return str(
        msg.DESCRIPTOR.fields_by_name["lb_policy"].enum_type.values_by_number[msg.lb_policy].name
    )


DR_TABLE: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("lb round robin", {"loadBalancer": {"simple": "ROUND_ROBIN"}}, {"lb_policy": "ROUND_ROBIN"}),
    (
        "lb least request",
        {"loadBalancer": {"simple": "LEAST_REQUEST"}},
        {"lb_policy": "LEAST_REQUEST"},
    ),
    (
        "lb least conn alias",
        {"loadBalancer": {"simple": "LEAST_CONN"}},
        {"lb_policy": "LEAST_REQUEST"},
    ),
    ("lb random", {"loadBalancer": {"simple": "RANDOM"}}, {"lb_policy": "RANDOM"}),
    (
        "tcp maxConnections",
        {"connectionPool": {"tcp": {"maxConnections": 100}}},
        {"circuit_breakers": {"thresholds": [{"max_connections": 100}]}},
    ),
    (
        "http limits",
        {
            "connectionPool": {
                "http": {"http1MaxPendingRequests": 50, "http2MaxRequests": 10, "maxRetries": 3}
            }
        },
        {
            "circuit_breakers": {
                "thresholds": [{"max_pending_requests": 50, "max_requests": 10, "max_retries": 3}]
            }
        },
    ),
    (
        "maxRequestsPerConnection",
        {"connectionPool": {"http": {"maxRequestsPerConnection": 2}}},
        {
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "common_http_protocol_options": {"max_requests_per_connection": 2}
                }
            }
        },
    ),
    (
        "connectTimeout",
        {"connectionPool": {"tcp": {"connectTimeout": "3s"}}},
        {"connect_timeout": "3s"},
    ),
    (
        "outlier 5xx",
        {
            "outlierDetection": {
                "consecutive5xxErrors": 5,
                "interval": "30s",
                "baseEjectionTime": "30s",
                "maxEjectionPercent": 50,
            }
        },
        {
            "outlier_detection": {
                "consecutive_5xx": 5,
                "enforcing_consecutive_5xx": 100,
                "interval": "30s",
                "base_ejection_time": "30s",
                "max_ejection_percent": 50,
            }
        },
    ),
    (
        "outlier gateway",
        {"outlierDetection": {"consecutiveGatewayErrors": 3}},
        {
            "outlier_detection": {
                "consecutive_gateway_failure": 3,
                "enforcing_consecutive_gateway_failure": 100,
            }
        },
    ),
]


@pytest.mark.parametrize(
    ("policy", "want"), [(p, w) for _, p, w in DR_TABLE], ids=[i for i, _, _ in DR_TABLE]
)
def test_destination_rule_traffic_policy(policy: dict[str, Any], want: dict[str, Any]) -> None:
    res, report = run(
        [doc("DestinationRule", "blog-api", {"host": "blog-api", "trafficPolicy": policy})]
    )
    got = cluster(res, f"outbound|8080||{BLOG_API}")
    got["lb_policy"] = lb_policy(res, f"outbound|8080||{BLOG_API}")
    assert contains(got, want), got
    assert not report.for_document("DestinationRule blog/blog-api")


def test_destination_rule_subsets_select_by_labels_with_own_policy() -> None:
    dr = doc(
        "DestinationRule",
        "blog-api",
        {
            "host": "blog-api.blog.svc.cluster.local",
            "trafficPolicy": {"loadBalancer": {"simple": "LEAST_CONN"}},
            "subsets": [
                {"name": "v1", "labels": {"version": "v1"}},
                {
                    "name": "v2",
                    "labels": {"version": "v2"},
                    "trafficPolicy": {
                        "portLevelSettings": [
                            {"port": {"number": 8080}, "loadBalancer": {"simple": "RANDOM"}}
                        ]
                    },
                },
            ],
        },
    )
    res, _ = run([dr])
    v1 = cluster(res, f"outbound|8080|v1|{BLOG_API}")
    v2 = cluster(res, f"outbound|8080|v2|{BLOG_API}")
    ids = [
        e["endpoint"]["address"]["envoy_internal_address"]["endpoint_id"]
        for e in v1["load_assignment"]["endpoints"][0]["lb_endpoints"]
    ]
    assert ids == ["10.1.0.11:8080"]
    assert v1["lb_policy"] == "LEAST_REQUEST"
    assert v2["lb_policy"] == "RANDOM"


@pytest.mark.parametrize(
    ("policy", "field", "words"),
    [
        (
            {"loadBalancer": {"simple": "PASSTHROUGH"}},
            "spec.trafficPolicy.loadBalancer.simple",
            "PASSTHROUGH",
        ),
        (
            {"loadBalancer": {"consistentHash": {"httpHeaderName": "x"}}},
            "spec.trafficPolicy.loadBalancer.consistentHash",
            "not supported",
        ),
        (
            {"outlierDetection": {"consecutiveErrors": 5}},
            "spec.trafficPolicy.outlierDetection.consecutiveErrors",
            "consecutive5xxErrors",
        ),
        (
            {"circuitBreaker": {"consecutiveErrors": 5}},
            "spec.trafficPolicy.circuitBreaker",
            "outlierDetection",
        ),
        ({"tls": {"mode": "SIMPLE"}}, "spec.trafficPolicy.tls", "HBONE"),
        (
            {"connectionPool": {"tcp": {"tcpKeepalive": {"time": "1s"}}}},
            "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive",
            "not applied",
        ),
    ],
)
def test_destination_rule_fields_not_applied_are_reported(
    policy: dict[str, Any], field: str, words: str
) -> None:
    _, report = run(
        [doc("DestinationRule", "blog-api", {"host": "blog-api", "trafficPolicy": policy})]
    )
    issues = [i for i in report.for_document("DestinationRule blog/blog-api") if i.field == field]
    assert issues and words in issues[0].reason, report


def test_seed_blog_api_destination_rule() -> None:
    dr = seeds("DestinationRule", "blog-api", "blog")
    if not dr:
        pytest.skip("seed fixtures not found")
    res, report = run(dr)
    top = cluster(res, f"outbound|8080||{BLOG_API}")
    assert top["lb_policy"] == "LEAST_REQUEST"  # LEAST_CONN
    assert top["circuit_breakers"]["thresholds"] == [
        {"max_connections": 100, "max_pending_requests": 50}
    ]
    assert lb_policy(res, f"outbound|8080|v1|{BLOG_API}") == "ROUND_ROBIN"
    assert cluster(res, f"outbound|8080|v2|{BLOG_API}")["lb_policy"] == "RANDOM"
    (issue,) = report.for_document("DestinationRule blog/blog-api")
    assert issue.field == "spec.trafficPolicy.circuitBreaker"
    assert "not an Istio field" in issue.reason and "outlierDetection" in issue.reason


# -- determinism and minimal change ----------------------------------------------


def _serialized(res: Any) -> dict[tuple[str, str], bytes]:
    return {(t, n): encode(m) for t, by in res.items() for n, m in by.items()}


def _canary(weight_v1: int) -> dict[str, Any]:
    return doc(
        "VirtualService",
        "blog-api-canary",
        {
            "hosts": ["blog-api"],
            "http": [
                {
                    "match": [{"headers": {"canary": {"exact": "true"}}}],
                    "route": [{"destination": {"host": "blog-api", "subset": "v2"}}],
                },
                {
                    "route": [
                        {"destination": {"host": "blog-api", "subset": "v1"}, "weight": weight_v1},
                        {
                            "destination": {"host": "blog-api", "subset": "v2"},
                            "weight": 100 - weight_v1,
                        },
                    ]
                },
            ],
        },
    )


SUBSETS = doc(
    "DestinationRule",
    "blog-api",
    {
        "host": "blog-api",
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ],
    },
)


def test_same_input_gives_byte_identical_resources() -> None:
    a, ra = run([_canary(90), SUBSETS])
    b, rb = run([SUBSETS, _canary(90)])
    assert _serialized(a) == _serialized(b)
    assert ra == rb


def test_changing_one_route_changes_only_that_route_configuration() -> None:
    a, _ = run([_canary(90), SUBSETS])
    b, _ = run([_canary(80), SUBSETS])
    sa, sb = _serialized(a), _serialized(b)
    assert sa.keys() == sb.keys()
    assert [k for k in sa if sa[k] != sb[k]] == [(ROUTE, f"inbound-vip|8080|http|{BLOG_API}")]


def test_a_new_pod_changes_only_the_clusters_it_is_in() -> None:
    a, _ = run([SUBSETS])
    more = (
        *WORKLOADS,
        Workload(
            "blog-api-v1b",
            "blog",
            "blog-api",
            "n2",
            ("10.1.0.14",),
            {"app": "blog-api", "version": "v1"},
        ),
    )
    b, _ = run([SUBSETS], workloads=more)
    sa, sb = _serialized(a), _serialized(b)
    assert sorted(k[1] for k in sa if sa[k] != sb.get(k)) == [
        f"outbound|8080|v1|{BLOG_API}",
        f"outbound|8080||{BLOG_API}",
    ]


# -- the seeds ---------------------------------------------------------------------

L7_KINDS = {k for _, k in HANDLED} | {k for _, k in NOT_APPLIED} | OTHER_MESH_KINDS


def _applied(res: Any, d: dict[str, Any]) -> bool:
    """Did the document leave a mark in the resources (a route or an RBAC name)?"""
    ns, name = d["metadata"].get("namespace", "default"), d["metadata"]["name"]
    text = json.dumps({t: {n: as_dict(m) for n, m in by.items()} for t, by in res.items()})
    return f"{ns}.{name}." in text or f"policy[{name}]" in text or f"{ns}/{name}/" in text


def test_every_seed_of_an_l7_kind_is_applied_or_reported() -> None:
    docs = load_seeds()
    if not docs:
        pytest.skip(f"seed fixtures not found ({seed_dir()})")
    res, report = run(docs)
    labels = {i.document for i in report}
    missing = []
    for d in docs:
        if d.get("kind") not in L7_KINDS:
            continue
        if (group_of(d), d["kind"]) not in HANDLED | set(NOT_APPLIED) and d[
            "kind"
        ] not in OTHER_MESH_KINDS:
            continue
        label = f"{d['kind']} {d['metadata'].get('namespace', 'default')}/{d['metadata']['name']}"
        if label not in labels and not _applied(res, d):
            missing.append(label)
    assert not missing, missing
    for issue in report:
        assert issue.reason, issue


def test_seed_canary_golden() -> None:
    vs = seeds("VirtualService", "blog-api-canary", "blog")
    dr = seeds("DestinationRule", "blog-api", "blog")
    if not vs or not dr:
        pytest.skip("seed fixtures not found")
    res, report = run([*vs, *dr], services=SERVICES[:1], workloads=WORKLOADS[:2])
    got = {t: {n: as_dict(m) for n, m in by.items()} for t, by in res.items()}
    assert [str(i) for i in report] == [
        "DestinationRule blog/blog-api: spec.trafficPolicy.circuitBreaker: not an Istio field "
        "(Istio has no circuitBreaker); ejection settings go in outlierDetection "
        "(consecutive5xxErrors, interval, baseEjectionTime, maxEjectionPercent), request "
        "limits in connectionPool"
    ]
    if not GOLDEN.exists():  # pragma: no cover - regenerate: delete the file, run, review
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert got == json.loads(GOLDEN.read_text())
    # the parts a reader checks first
    r_canary, r_split = routes(res)
    assert r_canary["match"]["headers"] == [{"name": "canary", "string_match": {"exact": "true"}}]
    assert r_canary["route"]["cluster"] == f"outbound|8080|v2|{BLOG_API}"
    assert r_split["route"]["weighted_clusters"]["clusters"] == [
        {"name": f"outbound|8080|v1|{BLOG_API}", "weight": 90},
        {"name": f"outbound|8080|v2|{BLOG_API}", "weight": 10},
    ]
    assert r_split["route"]["timeout"] == "0s"
    assert r_split["route"]["retry_policy"]["num_retries"] == 2
    assert set(res[CLUSTER]) >= {f"outbound|8080|v1|{BLOG_API}", f"outbound|8080|v2|{BLOG_API}"}


def test_every_l7_chain_logs_to_the_agent_unless_turned_off() -> None:
    """Service chains and pod chains alike send each request to the agent's
    access log service over the bootstrap's ADS cluster; access_log=False: none."""
    wp = Waypoint("waypoint", "blog", ("10.1.0.9",), "n1", traffic_for="all")
    view = view_of([], waypoints=(wp,))

    def loggers(access_log: bool) -> dict[str, list[dict[str, Any]]]:
        res, _ = translate(view, wp, access_log=access_log)
        main = as_dict(res[LISTENER]["main_internal"])
        return {
            c["name"]: c["filters"][0]["typed_config"].get("access_log", [])
            for c in main["filter_chains"]
        }

    on = loggers(True)
    assert any(n.startswith("inbound-vip|") for n in on)
    assert any(n.startswith("inbound-pod|") for n in on)
    for name, logs in on.items():
        (log,) = logs
        assert log["name"] == "envoy.access_loggers.http_grpc", name
        common = log["typed_config"]["common_config"]
        assert common["grpc_service"] == {"envoy_grpc": {"cluster_name": "xds_cluster"}}
        assert common["filter_state_objects_to_log"] == ["io.istio.peer_principal"]
        assert common["buffer_flush_interval"] == "0.200s"
    assert all(logs == [] for logs in loggers(False).values())
