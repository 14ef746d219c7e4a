"""VirtualService and HTTPRoute fields as Envoy routes: one row per field,
asserting on the generated RouteConfiguration."""

from __future__ import annotations

from typing import Any

import pytest
from waypoint_scenario import contains, doc, routes, run

from waypoint.translate import ROUTE

API = "blog-api.blog.svc.cluster.local"
C = f"outbound|8080||{API}"
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
TO_API = {"destination": {"host": "blog-api"}}


def vs(*http: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return doc("VirtualService", "r", {"hosts": ["blog-api"], "http": list(http), **spec})


VS_TABLE: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "uri exact",
        {"match": [{"uri": {"exact": "/a"}}], "route": [TO_API]},
        {"match": {"path": "/a"}, "route": {"cluster": C}},
    ),
    (
        "uri prefix",
        {"match": [{"uri": {"prefix": "/api/"}}], "route": [TO_API]},
        {"match": {"prefix": "/api/"}},
    ),
    (
        "uri regex",
        {"match": [{"uri": {"regex": "/a/[0-9]+"}}], "route": [TO_API]},
        {"match": {"safe_regex": {"regex": "/a/[0-9]+"}}},
    ),
    (
        "ignoreUriCase",
        {"match": [{"uri": {"prefix": "/A"}, "ignoreUriCase": True}], "route": [TO_API]},
        {"match": {"prefix": "/A", "case_sensitive": False}},
    ),
    (
        "headers exact/prefix/regex/present",
        {
            "match": [
                {
                    "headers": {
                        "a": {"exact": "1"},
                        "b": {"prefix": "x"},
                        "c": {"regex": "y.*"},
                        "d": {},
                    }
                }
            ],
            "route": [TO_API],
        },
        {
            "match": {
                "prefix": "/",
                "headers": [
                    {"name": "a", "string_match": {"exact": "1"}},
                    {"name": "b", "string_match": {"prefix": "x"}},
                    {"name": "c", "string_match": {"safe_regex": {"regex": "y.*"}}},
                    {"name": "d", "present_match": True},
                ],
            }
        },
    ),
    (
        "withoutHeaders",
        {"match": [{"withoutHeaders": {"x": {"exact": "1"}}}], "route": [TO_API]},
        {
            "match": {
                "headers": [{"name": "x", "string_match": {"exact": "1"}, "invert_match": True}]
            }
        },
    ),
    (
        "method",
        {"match": [{"method": {"exact": "GET"}}], "route": [TO_API]},
        {"match": {"headers": [{"name": ":method", "string_match": {"exact": "GET"}}]}},
    ),
    (
        "queryParams",
        {"match": [{"queryParams": {"q": {"exact": "1"}}}], "route": [TO_API]},
        {"match": {"query_parameters": [{"name": "q", "string_match": {"exact": "1"}}]}},
    ),
    (
        "weights and subsets",
        {
            "route": [
                {"destination": {"host": "blog-api", "subset": "v1"}, "weight": 90},
                {"destination": {"host": "blog-api", "subset": "v2"}, "weight": 10},
            ]
        },
        {
            "route": {
                "weighted_clusters": {
                    "clusters": [
                        {"name": f"outbound|8080|v1|{API}", "weight": 90},
                        {"name": f"outbound|8080|v2|{API}", "weight": 10},
                    ]
                }
            }
        },
    ),
    (
        "destination port",
        {"route": [{"destination": {"host": "user-service", "port": {"number": 9090}}}]},
        {"route": {"cluster": "outbound|9090||user-service.blog.svc.cluster.local"}},
    ),
    ("timeout", {"route": [TO_API], "timeout": "30s"}, {"route": {"timeout": "30s"}}),
    (
        "retries",
        {
            "route": [TO_API],
            "retries": {"attempts": 3, "perTryTimeout": "10s", "retryOn": "gateway-error,503"},
        },
        {
            "route": {
                "retry_policy": {
                    "num_retries": 3,
                    "per_try_timeout": "10s",
                    "retry_on": "gateway-error,retriable-status-codes",
                    "retriable_status_codes": [503],
                }
            }
        },
    ),
    (
        "fault delay",
        {"route": [TO_API], "fault": {"delay": {"fixedDelay": "5s", "percentage": {"value": 10}}}},
        {
            "typed_per_filter_config": {
                "envoy.filters.http.fault": {
                    "delay": {
                        "fixed_delay": "5s",
                        "percentage": {"numerator": 100000, "denominator": "MILLION"},
                    }
                }
            }
        },
    ),
    (
        "fault abort",
        {"route": [TO_API], "fault": {"abort": {"httpStatus": 503, "percentage": {"value": 0.5}}}},
        {
            "typed_per_filter_config": {
                "envoy.filters.http.fault": {
                    "abort": {
                        "http_status": 503,
                        "percentage": {"numerator": 5000, "denominator": "MILLION"},
                    }
                }
            }
        },
    ),
    (
        "rewrite",
        {"route": [TO_API], "rewrite": {"uri": "/v2/", "authority": "new.host"}},
        {"route": {"prefix_rewrite": "/v2/", "host_rewrite_literal": "new.host"}},
    ),
    (
        "mirror",
        {
            "route": [TO_API],
            "mirror": {"host": "blog-api", "subset": "v2"},
            "mirrorPercentage": {"value": 25},
        },
        {
            "route": {
                "request_mirror_policies": [
                    {
                        "cluster": f"outbound|8080|v2|{API}",
                        "runtime_fraction": {
                            "default_value": {"numerator": 250000, "denominator": "MILLION"}
                        },
                    }
                ]
            }
        },
    ),
    (
        "headers",
        {
            "route": [TO_API],
            "headers": {
                "request": {"set": {"x-a": "1"}, "add": {"x-b": "2"}, "remove": ["x-c"]},
                "response": {"set": {"x-d": "3"}, "remove": ["server"]},
            },
        },
        {
            "request_headers_to_add": [
                {
                    "header": {"key": "x-a", "value": "1"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                },
                {"header": {"key": "x-b", "value": "2"}},
            ],
            "request_headers_to_remove": ["x-c"],
            "response_headers_to_add": [
                {
                    "header": {"key": "x-d", "value": "3"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
            "response_headers_to_remove": ["server"],
        },
    ),
    (
        "redirect",
        {"redirect": {"uri": "/new", "redirectCode": 302}},
        {"redirect": {"path_redirect": "/new", "response_code": "FOUND"}},
    ),
    (
        "directResponse",
        {"directResponse": {"status": 418, "body": {"string": "teapot"}}},
        {"direct_response": {"status": 418, "body": {"inline_string": "teapot"}}},
    ),
]


@pytest.mark.parametrize(
    ("http", "want"), [(h, w) for _, h, w in VS_TABLE], ids=[i for i, _, _ in VS_TABLE]
)
def test_virtual_service_field(http: dict[str, Any], want: dict[str, Any]) -> None:
    res, report = run([vs(http), SUBSETS])
    (r,) = routes(res)
    assert contains(r, want), r
    assert not report.for_document("VirtualService blog/r"), report


def test_virtual_service_one_route_per_match_in_order() -> None:
    res, _ = run(
        [
            vs(
                {
                    "match": [{"uri": {"prefix": "/a"}}, {"uri": {"prefix": "/b"}}],
                    "route": [TO_API],
                },
                {"route": [TO_API]},
            )
        ]
    )
    assert [r["name"] for r in routes(res)] == ["blog.r.0.0", "blog.r.0.1", "blog.r.1.0"]


@pytest.mark.parametrize(
    ("http", "field", "status"),
    [
        (
            {"route": [{"destination": {"host": "nope"}}]},
            "spec.http[0].route[0].destination.host",
            503,
        ),
        (
            {"route": [{"destination": {"host": "blog-api", "subset": "v9"}}]},
            "spec.http[0].route[0].destination.subset",
            503,
        ),
    ],
)
def test_unroutable_destination_answers_an_error_and_is_reported(
    http: dict[str, Any], field: str, status: int
) -> None:
    res, report = run([vs(http)])
    (r,) = routes(res)
    assert r["direct_response"] == {"status": status}
    assert [i.field for i in report.for_document("VirtualService blog/r")] == [field]


@pytest.mark.parametrize(
    ("http", "field"),
    [
        ({"route": [TO_API], "corsPolicy": {}}, "spec.http[0].corsPolicy"),
        (
            {"match": [{"sourceLabels": {"app": "x"}}], "route": [TO_API]},
            "spec.http[0].match[0].sourceLabels",
        ),
        (
            {"route": [TO_API], "retries": {"attempts": 2, "retryRemoteLocalities": True}},
            "spec.http[0].retries.retryRemoteLocalities",
        ),
        (
            {"route": [TO_API], "fault": {"abort": {"grpcStatus": "UNAVAILABLE"}}},
            "spec.http[0].fault.abort",
        ),
        ({"route": [TO_API], "bogus": 1}, "spec.http[0].bogus"),
    ],
)
def test_virtual_service_fields_not_applied_are_reported(http: dict[str, Any], field: str) -> None:
    _, report = run([vs(http)])
    assert field in [i.field for i in report.for_document("VirtualService blog/r")], report


def test_virtual_service_bound_to_a_gateway_only_is_reported() -> None:
    res, report = run([vs({"route": [TO_API]}, gateways=["blog-gateway"])])
    assert routes(res)[0]["name"] == "default"
    assert [i.field for i in report.for_document("VirtualService blog/r")] == ["spec.gateways"]


def test_virtual_service_for_a_service_elsewhere_is_reported() -> None:
    _, report = run([doc("VirtualService", "r", {"hosts": ["nope.example.com"], "http": []})])
    assert [i.field for i in report.for_document("VirtualService blog/r")] == ["spec.hosts[0]"]


# -- HTTPRoute -------------------------------------------------------------------

PARENT = [{"group": "", "kind": "Service", "name": "blog-api", "port": 8080}]
BACKEND = {"name": "blog-api", "port": 8080}


def hr(*rules: dict[str, Any]) -> dict[str, Any]:
    return doc("HTTPRoute", "h", {"parentRefs": PARENT, "rules": list(rules)})


HR_TABLE: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "path exact",
        {"matches": [{"path": {"type": "Exact", "value": "/a"}}], "backendRefs": [BACKEND]},
        {"match": {"path": "/a"}, "route": {"cluster": C}},
    ),
    (
        "path prefix",
        {"matches": [{"path": {"type": "PathPrefix", "value": "/api/"}}], "backendRefs": [BACKEND]},
        {"match": {"path_separated_prefix": "/api"}},
    ),
    (
        "path regex",
        {
            "matches": [{"path": {"type": "RegularExpression", "value": "/a.*"}}],
            "backendRefs": [BACKEND],
        },
        {"match": {"safe_regex": {"regex": "/a.*"}}},
    ),
    (
        "headers, query, method",
        {
            "matches": [
                {
                    "headers": [{"name": "canary", "value": "true"}],
                    "queryParams": [{"type": "RegularExpression", "name": "q", "value": "x+"}],
                    "method": "POST",
                }
            ],
            "backendRefs": [BACKEND],
        },
        {
            "match": {
                "prefix": "/",
                "headers": [
                    {"name": ":method", "string_match": {"exact": "POST"}},
                    {"name": "canary", "string_match": {"exact": "true"}},
                ],
                "query_parameters": [
                    {"name": "q", "string_match": {"safe_regex": {"regex": "x+"}}}
                ],
            }
        },
    ),
    (
        "weighted backends",
        {
            "backendRefs": [
                {**BACKEND, "weight": 90},
                {"name": "user-service", "port": 9090, "weight": 10},
            ]
        },
        {
            "route": {
                "weighted_clusters": {
                    "clusters": [
                        {"name": C, "weight": 90},
                        {
                            "name": "outbound|9090||user-service.blog.svc.cluster.local",
                            "weight": 10,
                        },
                    ]
                }
            }
        },
    ),
    (
        "request header modifier",
        {
            "filters": [
                {
                    "type": "RequestHeaderModifier",
                    "requestHeaderModifier": {
                        "set": [{"name": "x-a", "value": "1"}],
                        "add": [{"name": "x-b", "value": "2"}],
                        "remove": ["x-c"],
                    },
                }
            ],
            "backendRefs": [BACKEND],
        },
        {
            "request_headers_to_add": [
                {
                    "header": {"key": "x-a", "value": "1"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                },
                {"header": {"key": "x-b", "value": "2"}},
            ],
            "request_headers_to_remove": ["x-c"],
        },
    ),
    (
        "response header modifier",
        {
            "filters": [
                {
                    "type": "ResponseHeaderModifier",
                    "responseHeaderModifier": {"set": [{"name": "x-a", "value": "1"}]},
                }
            ],
            "backendRefs": [BACKEND],
        },
        {
            "response_headers_to_add": [
                {
                    "header": {"key": "x-a", "value": "1"},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ]
        },
    ),
    (
        "request redirect",
        {
            "filters": [
                {
                    "type": "RequestRedirect",
                    "requestRedirect": {
                        "scheme": "https",
                        "hostname": "x.example",
                        "statusCode": 302,
                        "path": {"type": "ReplaceFullPath", "replaceFullPath": "/n"},
                    },
                }
            ]
        },
        {
            "redirect": {
                "scheme_redirect": "https",
                "host_redirect": "x.example",
                "path_redirect": "/n",
                "response_code": "FOUND",
            }
        },
    ),
    (
        "url rewrite prefix",
        {
            "matches": [{"path": {"type": "PathPrefix", "value": "/old"}}],
            "filters": [
                {
                    "type": "URLRewrite",
                    "urlRewrite": {
                        "hostname": "h",
                        "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"},
                    },
                }
            ],
            "backendRefs": [BACKEND],
        },
        {"route": {"prefix_rewrite": "/new", "host_rewrite_literal": "h"}},
    ),
    (
        "url rewrite full path",
        {
            "filters": [
                {
                    "type": "URLRewrite",
                    "urlRewrite": {"path": {"type": "ReplaceFullPath", "replaceFullPath": "/x"}},
                }
            ],
            "backendRefs": [BACKEND],
        },
        {"route": {"regex_rewrite": {"pattern": {"regex": "^/.*$"}, "substitution": "/x"}}},
    ),
    (
        "request mirror",
        {
            "filters": [
                {
                    "type": "RequestMirror",
                    "requestMirror": {
                        "backendRef": {"name": "user-service", "port": 9090},
                        "percent": 50,
                    },
                }
            ],
            "backendRefs": [BACKEND],
        },
        {
            "route": {
                "request_mirror_policies": [
                    {
                        "cluster": "outbound|9090||user-service.blog.svc.cluster.local",
                        "runtime_fraction": {
                            "default_value": {"numerator": 500000, "denominator": "MILLION"}
                        },
                    }
                ]
            }
        },
    ),
    (
        "timeouts",
        {"timeouts": {"request": "10s", "backendRequest": "2s"}, "backendRefs": [BACKEND]},
        {"route": {"timeout": "10s", "retry_policy": {"per_try_timeout": "2s"}}},
    ),
    (
        "retry",
        {
            "retry": {"attempts": 4, "codes": [502, 503], "backoff": "100ms"},
            "backendRefs": [BACKEND],
        },
        {
            "route": {
                "retry_policy": {
                    "num_retries": 4,
                    "retriable_status_codes": [502, 503],
                    "retry_back_off": {"base_interval": "0.100s"},
                }
            }
        },
    ),
    ("no backends", {}, {"direct_response": {"status": 500}}),
]


@pytest.mark.parametrize(
    ("rule", "want"), [(r, w) for _, r, w in HR_TABLE], ids=[i for i, _, _ in HR_TABLE]
)
def test_httproute_field(rule: dict[str, Any], want: dict[str, Any]) -> None:
    res, report = run([hr(rule)])
    (r,) = routes(res)
    assert contains(r, want), r
    assert not report.for_document("HTTPRoute blog/h"), report


def test_httproute_precedence_exact_then_longest_prefix() -> None:
    res, _ = run(
        [
            hr(
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/a"}}],
                    "backendRefs": [BACKEND],
                },
                {
                    "matches": [{"path": {"type": "PathPrefix", "value": "/a/b"}}],
                    "backendRefs": [BACKEND],
                },
                {"matches": [{"path": {"type": "Exact", "value": "/z"}}], "backendRefs": [BACKEND]},
            )
        ]
    )
    assert [r["name"] for r in routes(res)] == ["blog.h.2.0", "blog.h.1.0", "blog.h.0.0"]


def test_httproute_wins_over_virtual_service_and_says_so() -> None:
    res, report = run([hr({"backendRefs": [BACKEND]}), vs({"route": [TO_API]})])
    assert [r["name"] for r in routes(res)] == ["blog.h.0.0"]
    assert [i.field for i in report.for_document("VirtualService blog/r")] == ["spec.hosts"]


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        (
            {"filters": [{"type": "CORS", "cors": {}}], "backendRefs": [BACKEND]},
            "spec.rules[0].filters[0].type",
        ),
        (
            {"backendRefs": [{**BACKEND, "namespace": "other"}]},
            "spec.rules[0].backendRefs[0].namespace",
        ),
        ({"backendRefs": [{"name": "nope", "port": 1}]}, "spec.rules[0].backendRefs[0].name"),
        ({"sessionPersistence": {}, "backendRefs": [BACKEND]}, "spec.rules[0].sessionPersistence"),
    ],
)
def test_httproute_fields_not_applied_are_reported(rule: dict[str, Any], field: str) -> None:
    _, report = run([hr(rule)])
    assert field in [i.field for i in report.for_document("HTTPRoute blog/h")], report


def test_httproute_to_a_gateway_parent_is_reported() -> None:
    d = doc("HTTPRoute", "h", {"parentRefs": [{"name": "waypoint"}], "rules": [{}]})
    res, report = run([d])
    assert [i.field for i in report.for_document("HTTPRoute blog/h")] == ["spec.parentRefs[0]"]
    assert routes(res)[0]["name"] == "default"
    assert ROUTE in res
