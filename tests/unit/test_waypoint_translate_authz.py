"""AuthorizationPolicy (targetRefs, L7 fields) as RBAC filters and
RequestAuthentication as jwt_authn, one row per field."""

from __future__ import annotations

from typing import Any

import pytest
from waypoint_scenario import TO_BLOG_API, TO_WAYPOINT, contains, doc, http_filters, run, seeds

from waypoint.translate.authn import UNFETCHED_JWKS

USER_CHAIN = "inbound-vip|9090|http|user-service.blog.svc.cluster.local"
PEER = "io.istio.peer_principal"


def ap(
    rules: list[dict[str, Any]] | None,
    action: str = "ALLOW",
    refs: Any = TO_WAYPOINT,
    name: str = "p",
) -> dict[str, Any]:
    spec: dict[str, Any] = {"targetRefs": refs, "action": action}
    if rules is not None:
        spec["rules"] = rules
    return doc("AuthorizationPolicy", name, spec)


def rbac(
    res: Any, chain: str = "inbound-vip|8080|http|blog-api.blog.svc.cluster.local"
) -> list[dict[str, Any]]:
    return [
        f["typed_config"]["rules"]
        for f in http_filters(res, chain)
        if f["name"] == "envoy.filters.http.rbac"
    ]


def only_policy(res: Any) -> dict[str, Any]:
    (rules,) = rbac(res)
    (policy,) = rules["policies"].values()
    return dict(policy)


def peer(match: dict[str, Any]) -> dict[str, Any]:
    return {"filter_state": {"key": PEER, "string_match": match}}


def claim(path: list[str], match: dict[str, Any]) -> dict[str, Any]:
    meta = {
        "filter": "envoy.filters.http.jwt_authn",
        "path": [{"key": k} for k in ["payload", *path]],
    }
    return {
        "or_ids": {
            "ids": [
                {"metadata": {**meta, "value": {"string_match": match}}},
                {
                    "metadata": {
                        **meta,
                        "value": {"list_match": {"one_of": {"string_match": match}}},
                    }
                },
            ]
        }
    }


ANY = [{"any": True}]

AP_TABLE: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "methods",
        {"to": [{"operation": {"methods": ["GET", "POST"]}}]},
        {
            "permissions": [
                {
                    "or_rules": {
                        "rules": [
                            {"header": {"name": ":method", "string_match": {"exact": "GET"}}},
                            {"header": {"name": ":method", "string_match": {"exact": "POST"}}},
                        ]
                    }
                }
            ],
            "principals": ANY,
        },
    ),
    (
        "notMethods",
        {"to": [{"operation": {"notMethods": ["DELETE"]}}]},
        {
            "permissions": [
                {"not_rule": {"header": {"name": ":method", "string_match": {"exact": "DELETE"}}}}
            ]
        },
    ),
    (
        "paths exact prefix suffix",
        {"to": [{"operation": {"paths": ["/a", "/api/*", "*.png"]}}]},
        {
            "permissions": [
                {
                    "or_rules": {
                        "rules": [
                            {"url_path": {"path": {"exact": "/a"}}},
                            {"url_path": {"path": {"prefix": "/api/"}}},
                            {"url_path": {"path": {"suffix": ".png"}}},
                        ]
                    }
                }
            ]
        },
    ),
    (
        "notPaths",
        {"to": [{"operation": {"notPaths": ["/admin*"]}}]},
        {"permissions": [{"not_rule": {"url_path": {"path": {"prefix": "/admin"}}}}]},
    ),
    (
        "hosts, with or without a port",
        {"to": [{"operation": {"hosts": ["blog.example.com", "*.example.org"]}}]},
        {
            "permissions": [
                {
                    "or_rules": {
                        "rules": [
                            {
                                "header": {
                                    "name": ":authority",
                                    "string_match": {
                                        "safe_regex": {
                                            "regex": "(?i)blog\\.example\\.com(:[0-9]+)?"
                                        }
                                    },
                                }
                            },
                            {
                                "header": {
                                    "name": ":authority",
                                    "string_match": {
                                        "safe_regex": {"regex": "(?i).*\\.example\\.org(:[0-9]+)?"}
                                    },
                                }
                            },
                        ]
                    }
                }
            ]
        },
    ),
    (
        "ports",
        {"to": [{"operation": {"ports": ["8080"]}}]},
        {"permissions": [{"destination_port": 8080}]},
    ),
    (
        "principals via the HBONE peer",
        {"from": [{"source": {"principals": ["cluster.local/ns/blog/sa/blog-frontend"]}}]},
        {
            "permissions": ANY,
            "principals": [peer({"exact": "spiffe://cluster.local/ns/blog/sa/blog-frontend"})],
        },
    ),
    (
        "notPrincipals wildcard suffix",
        {"from": [{"source": {"notPrincipals": ["*/sa/bad"]}}]},
        {"principals": [{"not_id": peer({"suffix": "/sa/bad"})}]},
    ),
    (
        "namespaces as a regex on the peer",
        {"from": [{"source": {"namespaces": ["istio-system"]}}]},
        {
            "principals": [
                peer({"safe_regex": {"regex": "spiffe://[^/]+/ns/istio-system/sa/[^/]+"}})
            ]
        },
    ),
    (
        "serviceAccounts",
        {"from": [{"source": {"serviceAccounts": ["other/sa1"]}}]},
        {"principals": [peer({"safe_regex": {"regex": "spiffe://[^/]+/ns/other/sa/sa1"}})]},
    ),
    (
        "ipBlocks",
        {"from": [{"source": {"ipBlocks": ["10.0.0.0/8"]}}]},
        {"principals": [{"direct_remote_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}}]},
    ),
    (
        "when request.headers",
        {"when": [{"key": "request.headers[authorization]", "values": ["Bearer *"]}]},
        {
            "principals": [
                {"header": {"name": "authorization", "string_match": {"prefix": "Bearer "}}}
            ]
        },
    ),
    (
        "when claims",
        {"when": [{"key": "request.auth.claims[role]", "values": ["admin"]}]},
        {"principals": [claim(["role"], {"exact": "admin"})]},
    ),
    (
        "when notValues source.namespace",
        {"when": [{"key": "source.namespace", "notValues": ["evil"]}]},
        {
            "principals": [
                {"not_id": peer({"safe_regex": {"regex": "spiffe://[^/]+/ns/evil/sa/[^/]+"}})}
            ]
        },
    ),
    (
        "when destination.port",
        {"when": [{"key": "destination.port", "values": ["8080"]}]},
        {"permissions": [{"destination_port": 8080}]},
    ),
    (
        "remoteIpBlocks",
        {"from": [{"source": {"remoteIpBlocks": ["192.0.2.0/24"]}}]},
        {"principals": [{"remote_ip": {"address_prefix": "192.0.2.0", "prefix_len": 24}}]},
    ),
    (
        "when source.principal",
        {"when": [{"key": "source.principal", "values": ["cluster.local/ns/a/sa/b"]}]},
        {"principals": [peer({"exact": "spiffe://cluster.local/ns/a/sa/b"})]},
    ),
    (
        "when nested claim",
        {"when": [{"key": "request.auth.claims[realm][role]", "values": ["x"]}]},
        {"principals": [claim(["realm", "role"], {"exact": "x"})]},
    ),
    ("empty rule matches everything", {}, {"permissions": ANY, "principals": ANY}),
]


@pytest.mark.parametrize(
    ("rule", "want"), [(r, w) for _, r, w in AP_TABLE], ids=[i for i, _, _ in AP_TABLE]
)
def test_authorization_policy_field(rule: dict[str, Any], want: dict[str, Any]) -> None:
    res, report = run([ap([rule])])
    got = only_policy(res)
    assert contains(got, want), got
    assert not report.for_document("AuthorizationPolicy blog/p"), report


def jwt_str(claim_name: str, op: str, value: str) -> dict[str, Any]:
    path = [{"key": "payload"}, {"key": claim_name}]
    match = (
        {"present_match": True} if op != "exact" and not value else {"string_match": {op: value}}
    )
    return {"metadata": {"filter": "envoy.filters.http.jwt_authn", "path": path, "value": match}}


def both(*ids: dict[str, Any]) -> dict[str, Any]:
    return {"and_ids": {"ids": list(ids)}}


@pytest.mark.parametrize(
    ("value", "want"),
    [
        (
            "*",
            {
                "metadata": {
                    "filter": "envoy.filters.http.jwt_authn",
                    "path": [{"key": "payload"}, {"key": "iss"}],
                    "value": {"present_match": True},
                }
            },
        ),
        # <iss>/<sub> == "https://a/b/alice": the "/" between them can be any of these
        (
            "https://a/b/alice",
            {
                "or_ids": {
                    "ids": [
                        both(
                            jwt_str("iss", "exact", "https:"), jwt_str("sub", "exact", "/a/b/alice")
                        ),
                        both(
                            jwt_str("iss", "exact", "https:/"), jwt_str("sub", "exact", "a/b/alice")
                        ),
                        both(
                            jwt_str("iss", "exact", "https://a"), jwt_str("sub", "exact", "b/alice")
                        ),
                        both(
                            jwt_str("iss", "exact", "https://a/b"), jwt_str("sub", "exact", "alice")
                        ),
                    ]
                }
            },
        ),
        # starts with "https://x/": the issuer https://x (any subject), or any longer issuer
        (
            "https://x/*",
            {
                "or_ids": {
                    "ids": [
                        jwt_str("iss", "prefix", "https://x/"),
                        both(jwt_str("iss", "exact", "https:"), jwt_str("sub", "prefix", "/x/")),
                        both(jwt_str("iss", "exact", "https:/"), jwt_str("sub", "prefix", "x/")),
                        both(jwt_str("iss", "exact", "https://x"), jwt_str("sub", "prefix", "")),
                    ]
                }
            },
        ),
        (
            "*/alice",
            {
                "or_ids": {
                    "ids": [
                        jwt_str("sub", "suffix", "/alice"),
                        both(jwt_str("iss", "suffix", ""), jwt_str("sub", "exact", "alice")),
                    ]
                }
            },
        ),
    ],
)
def test_request_principals_match_istio_iss_slash_sub(value: str, want: dict[str, Any]) -> None:
    for rule, field in (
        ({"from": [{"source": {"requestPrincipals": [value]}}]}, "requestPrincipals"),
        ({"when": [{"key": "request.auth.principal", "values": [value]}]}, "when"),
    ):
        res, report = run([ap([rule])])
        assert only_policy(res)["principals"] == [want], field
        assert not report


def test_deny_before_allow_and_audit_logs() -> None:
    res, _ = run(
        [
            ap([{"to": [{"operation": {"methods": ["GET"]}}]}], "ALLOW", name="a"),
            ap([{"to": [{"operation": {"paths": ["/admin"]}}]}], "DENY", name="d"),
            ap([{}], "AUDIT", name="l"),
        ]
    )
    assert [r.get("action", "ALLOW") for r in rbac(res)] == ["LOG", "DENY", "ALLOW"]
    assert list(rbac(res)[2]["policies"]) == ["ns[blog]-policy[a]-rule[0]"]


def test_no_allow_policy_means_no_allow_filter() -> None:
    res, _ = run([ap([{"to": [{"operation": {"paths": ["/admin"]}}]}], "DENY")])
    assert [r.get("action", "ALLOW") for r in rbac(res)] == ["DENY"]


def test_allow_nothing_policy_denies_everything() -> None:
    res, _ = run([ap(None)])
    (rules,) = rbac(res)
    assert rules.get("action", "ALLOW") == "ALLOW"
    assert "policies" not in rules


def test_service_target_reaches_only_that_service() -> None:
    res, _ = run([ap([{}], refs=TO_BLOG_API)])
    assert len(rbac(res)) == 1
    assert rbac(res, USER_CHAIN) == []


def test_policy_for_another_waypoint_is_not_applied() -> None:
    other = [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "other"}]
    res, report = run([ap([{}], refs=other)])
    assert rbac(res) == []
    (issue,) = report.for_document("AuthorizationPolicy blog/p")
    assert issue.field == "spec.targetRefs[0]" and "no waypoint blog/other" in issue.reason


def test_policy_for_a_service_without_waypoint_is_reported() -> None:
    _, report = run([ap([{}], refs=TO_BLOG_API)], namespaces={})
    (issue,) = report.for_document("AuthorizationPolicy blog/p")
    assert "uses no waypoint" in issue.reason


def test_custom_is_reported_not_applied() -> None:
    d = ap([{}], "CUSTOM")
    d["spec"]["provider"] = {"name": "ext"}
    res, report = run([d])
    assert rbac(res) == []
    assert [i.field for i in report.for_document("AuthorizationPolicy blog/p")] == ["spec.action"]


def test_untranslatable_allow_rule_is_dropped_and_reported() -> None:
    res, report = run([ap([{"when": [{"key": "connection.sni", "values": ["x"]}]}])])
    (rules,) = rbac(res)
    assert "policies" not in rules  # the ALLOW filter remains: nothing is allowed
    (issue,) = report.for_document("AuthorizationPolicy blog/p")
    assert issue.field == "spec.rules[0].when[0].values[0]" and "fails closed" in issue.reason


def test_untranslatable_deny_condition_is_dropped_so_it_denies_more() -> None:
    res, report = run(
        [
            ap(
                [
                    {
                        "to": [{"operation": {"methods": ["GET"]}}],
                        "when": [{"key": "connection.sni", "values": ["x"]}],
                    }
                ],
                "DENY",
            )
        ]
    )
    got = only_policy(res)
    assert got["principals"] == ANY
    assert "fails closed" in report.for_document("AuthorizationPolicy blog/p")[0].reason


def test_invalid_attached_policy_denies_its_reach() -> None:
    res, report = run([ap([{"from": [{"source": {"ipBlocks": ["not-an-ip"]}}]}])])
    (rules,) = rbac(res)
    assert rules["action"] == "DENY"
    assert list(rules["policies"]) == ["ns[blog]-policy[p]-invalid"]
    assert report.for_document("AuthorizationPolicy blog/p")


def test_selector_policy_with_l7_fields_is_reported_with_the_fix() -> None:
    d = doc(
        "AuthorizationPolicy",
        "sel",
        {
            "selector": {"matchLabels": {"app": "blog-api"}},
            "rules": [{"to": [{"operation": {"methods": ["GET"]}}]}],
        },
    )
    res, report = run([d])
    assert rbac(res) == []
    (issue,) = report.for_document("AuthorizationPolicy blog/sel")
    assert "targetRefs" in issue.reason and "methods" in issue.reason
    assert "spiffe://cluster.local/ns/blog/sa/waypoint" in issue.reason


# -- RequestAuthentication -----------------------------------------------------------


def ra(rule: dict[str, Any], refs: Any = TO_WAYPOINT) -> dict[str, Any]:
    return doc("RequestAuthentication", "jwt", {"targetRefs": refs, "jwtRules": [rule]})


def jwt(res: Any) -> dict[str, Any]:
    (f,) = [f for f in http_filters(res) if f["name"] == "envoy.filters.http.jwt_authn"]
    return dict(f["typed_config"])


JWKS = '{"keys":[{"kty":"RSA","e":"AQAB","n":"xyz"}]}'
RA_TABLE: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "issuer audiences inline jwks",
        {"issuer": "https://a", "audiences": ["blog-api"], "jwks": JWKS},
        {
            "issuer": "https://a",
            "audiences": ["blog-api"],
            "local_jwks": {"inline_string": JWKS},
            "payload_in_metadata": "payload",
        },
    ),
    (
        "forwardOriginalToken",
        {"issuer": "i", "jwks": JWKS, "forwardOriginalToken": True},
        {"forward": True},
    ),
    (
        "outputPayloadToHeader",
        {"issuer": "i", "jwks": JWKS, "outputPayloadToHeader": "x-jwt"},
        {"forward_payload_header": "x-jwt"},
    ),
    (
        "fromHeaders fromParams",
        {
            "issuer": "i",
            "jwks": JWKS,
            "fromHeaders": [{"name": "x-token", "prefix": "Bearer "}],
            "fromParams": ["tok"],
        },
        {"from_headers": [{"name": "x-token", "value_prefix": "Bearer "}], "from_params": ["tok"]},
    ),
    (
        "outputClaimToHeaders",
        {
            "issuer": "i",
            "jwks": JWKS,
            "outputClaimToHeaders": [{"header": "x-sub", "claim": "sub"}],
        },
        {"claim_to_headers": [{"header_name": "x-sub", "claim_name": "sub"}]},
    ),
]


@pytest.mark.parametrize(
    ("rule", "want"), [(r, w) for _, r, w in RA_TABLE], ids=[i for i, _, _ in RA_TABLE]
)
def test_request_authentication_field(rule: dict[str, Any], want: dict[str, Any]) -> None:
    res, report = run([ra(rule)])
    cfg = jwt(res)
    (provider,) = cfg["providers"].values()
    assert contains(provider, want), provider
    assert cfg["rules"][0]["requires"]["requires_any"]["requirements"] == [
        {"provider_name": "blog/jwt/0"},
        {"allow_missing": {}},
    ]
    assert not report.for_document("RequestAuthentication blog/jwt")


def test_jwks_uri_comes_from_the_agent() -> None:
    rule = {"issuer": "https://a", "jwksUri": "https://a/jwks.json"}
    res, report = run([ra(rule)], jwks={"https://a/jwks.json": JWKS})
    assert jwt(res)["providers"]["blog/jwt/0"]["local_jwks"] == {"inline_string": JWKS}
    assert not report
    res, report = run([ra(rule)])
    assert jwt(res)["providers"]["blog/jwt/0"]["local_jwks"] == {"inline_string": UNFETCHED_JWKS}
    assert [i.field for i in report] == ["spec.jwtRules[0].jwksUri"]


def test_jwt_filter_runs_before_rbac() -> None:
    res, _ = run([ra({"issuer": "i", "jwks": JWKS}), ap([{}])])
    assert [f["name"] for f in http_filters(res)] == [
        "envoy.filters.http.jwt_authn",
        "envoy.filters.http.rbac",
        "envoy.filters.http.fault",
        "envoy.filters.http.router",
    ]


def test_seed_policies_apply_once_attached_with_target_refs() -> None:
    """The seeds' L7 policies (written with selectors, which only the node
    reads) translate without a report once given targetRefs instead."""
    docs = [
        d
        for name in ("blog-api-authz", "jwt-authz", "allow-frontend")
        for d in seeds("AuthorizationPolicy", name, "blog")
    ]
    if len(docs) != 3:
        pytest.skip("seed fixtures not found")
    attached = []
    for d in docs:
        spec = dict(d["spec"])
        spec.pop("selector")
        attached.append({**d, "spec": {**spec, "targetRefs": TO_BLOG_API}})
    res, report = run(attached)
    assert not report, report
    (rules,) = rbac(res)
    assert sorted(rules["policies"]) == [
        "ns[blog]-policy[allow-frontend]-rule[0]",
        "ns[blog]-policy[blog-api-authz]-rule[0]",
        "ns[blog]-policy[blog-api-authz]-rule[1]",
        "ns[blog]-policy[blog-api-authz]-rule[2]",
        "ns[blog]-policy[jwt-authz]-rule[0]",
        "ns[blog]-policy[jwt-authz]-rule[1]",
    ]
    rule2 = rules["policies"]["ns[blog]-policy[blog-api-authz]-rule[2]"]
    assert contains(
        rule2["principals"],
        [{"header": {"name": "authorization", "string_match": {"prefix": "Bearer "}}}],
    )
