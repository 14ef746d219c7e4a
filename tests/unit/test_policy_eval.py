"""L4 authorization: the decisions ztunnel makes, case by case.

Each case names the Istio/ztunnel behaviour it pins down, so a failure says which
piece of semantics broke rather than just "wrong answer".
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from agent.identity.spiffe import SpiffeId
from agent.model import Workload
from agent.policy import (
    Action,
    Conn,
    Enforcement,
    Mode,
    PolicyError,
    PolicySet,
    Scope,
    WorkloadRef,
    compile_policies,
    compile_policy,
    parse_authorization_policy,
    parse_peer_authentication,
)

API = "security.istio.io/v1"
FOO_APP = WorkloadRef("foo", {"app": "web", "version": "v1"}, "web-1")
FOO_DB = WorkloadRef("foo", {"app": "db"}, "db-1")
BAR_APP = WorkloadRef("bar", {"app": "web"}, "web-2")
SLEEP = "cluster.local/ns/foo/sa/sleep"
OTHER = "cluster.local/ns/other/sa/client"


def ap(name: str, ns: str = "foo", **spec: Any) -> dict[str, Any]:
    """An AuthorizationPolicy document; keyword arguments are spec fields."""
    return {
        "apiVersion": API,
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def pa(
    name: str,
    ns: str,
    mode: str | None = None,
    labels: dict[str, str] | None = None,
    ports: dict[Any, str] | None = None,
    created: str | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if mode is not None:
        spec["mtls"] = {"mode": mode}
    if labels is not None:
        spec["selector"] = {"matchLabels": labels}
    if ports is not None:
        spec["portLevelMtls"] = {p: {"mode": m} for p, m in ports.items()}
    meta: dict[str, Any] = {"name": name, "namespace": ns}
    if created is not None:
        meta["creationTimestamp"] = created
    return {
        "apiVersion": "security.istio.io/v1beta1",
        "kind": "PeerAuthentication",
        "metadata": meta,
        "spec": spec,
    }


def conn(
    principal: str | None = SLEEP,
    src_ip: str = "10.0.0.5",
    dst_port: int = 8080,
    dst: WorkloadRef = FOO_APP,
    dst_ip: str = "10.1.0.7",
) -> Conn:
    return Conn.make(src_ip, principal, dst_ip, dst_port, dst)


def store(*docs: dict[str, Any], root: str = "istio-system") -> PolicySet:
    s, report = compile_policies(docs, root_namespace=root)
    assert report.ok, [str(e) for e in report.errors]
    return s


def allow_from(**source: Any) -> dict[str, Any]:
    return ap(
        "allow", selector={"matchLabels": {"app": "web"}}, rules=[{"from": [{"source": source}]}]
    )


def allow_rule(rule: dict[str, Any]) -> dict[str, Any]:
    return ap("allow", selector={"matchLabels": {"app": "web"}}, rules=[rule])


# ---------------------------------------------------------------------------
# The allow/deny matrix
# ---------------------------------------------------------------------------

MATRIX: list[tuple[str, list[dict[str, Any]], Conn, bool]] = [
    ("no policy: allow", [], conn(), True),
    ("no policy: plaintext allowed (PERMISSIVE default)", [], conn(None), True),
    ("principal exact match", [allow_from(principals=[SLEEP])], conn(SLEEP), True),
    ("principal exact mismatch", [allow_from(principals=[SLEEP])], conn(OTHER), False),
    ("principal never matches plaintext", [allow_from(principals=[SLEEP])], conn(None), False),
    ("notPrincipals excludes", [allow_from(notPrincipals=[SLEEP])], conn(SLEEP), False),
    ("notPrincipals admits others", [allow_from(notPrincipals=[SLEEP])], conn(OTHER), True),
    ("notPrincipals admits plaintext", [allow_from(notPrincipals=[SLEEP])], conn(None), True),
    ("namespaces match", [allow_from(namespaces=["foo"])], conn(SLEEP), True),
    ("namespaces mismatch", [allow_from(namespaces=["foo"])], conn(OTHER), False),
    ("namespaces never match plaintext", [allow_from(namespaces=["foo"])], conn(None), False),
    ("notNamespaces", [allow_from(notNamespaces=["foo"])], conn(OTHER), True),
    ("notNamespaces excludes", [allow_from(notNamespaces=["foo"])], conn(SLEEP), False),
    ("namespace wildcard '*' needs an identity", [allow_from(namespaces=["*"])], conn(None), False),
    ("namespace wildcard '*' any identity", [allow_from(namespaces=["*"])], conn(OTHER), True),
    ("namespace prefix", [allow_from(namespaces=["oth*"])], conn(OTHER), True),
    (
        "serviceAccounts relative to policy ns",
        [allow_from(serviceAccounts=["sleep"])],
        conn(SLEEP),
        True,
    ),
    (
        "serviceAccounts other ns needs ns/sa",
        [allow_from(serviceAccounts=["sleep"])],
        conn("cluster.local/ns/other/sa/sleep"),
        False,
    ),
    ("serviceAccounts ns/sa", [allow_from(serviceAccounts=["other/client"])], conn(OTHER), True),
    (
        "serviceAccounts never match plaintext",
        [allow_from(serviceAccounts=["sleep"])],
        conn(None),
        False,
    ),
    ("ipBlocks v4 CIDR", [allow_from(ipBlocks=["10.0.0.0/24"])], conn(src_ip="10.0.0.99"), True),
    (
        "ipBlocks v4 CIDR outside",
        [allow_from(ipBlocks=["10.0.0.0/24"])],
        conn(src_ip="10.0.1.1"),
        False,
    ),
    ("ipBlocks single v4", [allow_from(ipBlocks=["10.0.0.5"])], conn(src_ip="10.0.0.5"), True),
    (
        "ipBlocks single v4 other",
        [allow_from(ipBlocks=["10.0.0.5"])],
        conn(src_ip="10.0.0.6"),
        False,
    ),
    (
        "ipBlocks host bits allowed (Go ParsePrefix)",
        [allow_from(ipBlocks=["10.0.0.77/24"])],
        conn(src_ip="10.0.0.1"),
        True,
    ),
    ("ipBlocks v6 CIDR", [allow_from(ipBlocks=["fd00:1::/64"])], conn(src_ip="fd00:1::42"), True),
    (
        "ipBlocks v6 outside",
        [allow_from(ipBlocks=["fd00:1::/64"])],
        conn(src_ip="fd00:2::42"),
        False,
    ),
    ("ipBlocks single v6", [allow_from(ipBlocks=["fd00::1"])], conn(src_ip="fd00::1"), True),
    (
        "v4 source never in a v6 block",
        [allow_from(ipBlocks=["::/0"])],
        conn(src_ip="10.0.0.5"),
        False,
    ),
    (
        "v6 source never in a v4 block",
        [allow_from(ipBlocks=["0.0.0.0/0"])],
        conn(src_ip="fd00::1"),
        False,
    ),
    (
        "IPv4-mapped source folds to IPv4",
        [allow_from(ipBlocks=["10.0.0.0/8"])],
        conn(src_ip="::ffff:10.0.0.5"),
        True,
    ),
    (
        "notIpBlocks excludes",
        [allow_from(notIpBlocks=["10.0.0.0/8"])],
        conn(src_ip="10.9.9.9"),
        False,
    ),
    (
        "notIpBlocks admits",
        [allow_from(notIpBlocks=["10.0.0.0/8"])],
        conn(src_ip="192.168.1.1"),
        True,
    ),
    (
        "source fields AND-ed",
        [allow_from(namespaces=["foo"], ipBlocks=["192.168.0.0/16"])],
        conn(SLEEP, src_ip="10.0.0.5"),
        False,
    ),
    (
        "from entries OR-ed",
        [
            allow_rule(
                {"from": [{"source": {"namespaces": ["x"]}}, {"source": {"principals": [SLEEP]}}]}
            )
        ],
        conn(SLEEP),
        True,
    ),
    (
        "ports match",
        [allow_rule({"to": [{"operation": {"ports": ["8080"]}}]})],
        conn(dst_port=8080),
        True,
    ),
    (
        "ports mismatch",
        [allow_rule({"to": [{"operation": {"ports": ["8080"]}}]})],
        conn(dst_port=9090),
        False,
    ),
    (
        "numeric ports accepted",
        [allow_rule({"to": [{"operation": {"ports": [8080]}}]})],
        conn(),
        True,
    ),
    (
        "notPorts excludes",
        [allow_rule({"to": [{"operation": {"notPorts": ["8080"]}}]})],
        conn(),
        False,
    ),
    (
        "notPorts admits others",
        [allow_rule({"to": [{"operation": {"notPorts": ["8080"]}}]})],
        conn(dst_port=9090),
        True,
    ),
    (
        "from AND to",
        [
            allow_rule(
                {
                    "from": [{"source": {"principals": [SLEEP]}}],
                    "to": [{"operation": {"ports": ["80"]}}],
                }
            )
        ],
        conn(SLEEP, dst_port=8080),
        False,
    ),
    (
        "rules OR-ed",
        [
            ap(
                "allow",
                selector={"matchLabels": {"app": "web"}},
                rules=[
                    {"to": [{"operation": {"ports": ["80"]}}]},
                    {"from": [{"source": {"principals": [SLEEP]}}]},
                ],
            )
        ],
        conn(SLEEP, dst_port=8080),
        True,
    ),
    ("empty rule allows all", [allow_rule({})], conn(None), True),
    (
        "when source.ip",
        [allow_rule({"when": [{"key": "source.ip", "values": ["10.0.0.0/8"]}]})],
        conn(),
        True,
    ),
    (
        "when source.ip notValues",
        [allow_rule({"when": [{"key": "source.ip", "notValues": ["10.0.0.5"]}]})],
        conn(src_ip="10.0.0.5"),
        False,
    ),
    (
        "when source.namespace",
        [allow_rule({"when": [{"key": "source.namespace", "values": ["other"]}]})],
        conn(OTHER),
        True,
    ),
    (
        "when source.principal wildcard",
        [allow_rule({"when": [{"key": "source.principal", "values": ["*/sa/client"]}]})],
        conn(OTHER),
        True,
    ),
    (
        "when destination.ip",
        [allow_rule({"when": [{"key": "destination.ip", "values": ["10.1.0.0/16"]}]})],
        conn(dst_ip="10.2.0.1"),
        False,
    ),
    (
        "when destination.port",
        [allow_rule({"when": [{"key": "destination.port", "values": ["8080", "9090"]}]})],
        conn(dst_port=9090),
        True,
    ),
    (
        "when conditions AND-ed",
        [
            allow_rule(
                {
                    "when": [
                        {"key": "destination.port", "values": ["8080"]},
                        {"key": "source.namespace", "values": ["bar"]},
                    ]
                }
            )
        ],
        conn(SLEEP),
        False,
    ),
    (
        "ALLOW with L7 when key never matches",
        [allow_rule({"when": [{"key": "request.headers[x-id]", "values": ["1"]}]})],
        conn(),
        False,
    ),
    (
        "ALLOW with connection.sni never matches (not an L4 key in ambient)",
        [allow_rule({"when": [{"key": "connection.sni", "values": ["a.example"]}]})],
        conn(),
        False,
    ),
    (
        "ALLOW with remoteIpBlocks never matches (X-Forwarded-For is L7)",
        [allow_from(remoteIpBlocks=["10.0.0.0/8"])],
        conn(),
        False,
    ),
    (
        "ALLOW with methods never matches",
        [
            allow_rule(
                {
                    "from": [{"source": {"principals": [SLEEP]}}],
                    "to": [{"operation": {"methods": ["GET"]}}],
                }
            )
        ],
        conn(SLEEP),
        False,
    ),
    (
        "L7 ALLOW rule dropped, L4 sibling rule still allows",
        [
            ap(
                "allow",
                rules=[
                    {"to": [{"operation": {"paths": ["/x"]}}]},
                    {"from": [{"source": {"namespaces": ["foo"]}}]},
                ],
            )
        ],
        conn(SLEEP),
        True,
    ),
    (
        "DENY beats ALLOW",
        [
            allow_rule({}),
            ap("deny", action="DENY", rules=[{"from": [{"source": {"principals": [SLEEP]}}]}]),
        ],
        conn(SLEEP),
        False,
    ),
    (
        "non-matching DENY leaves ALLOW",
        [
            allow_rule({}),
            ap("deny", action="DENY", rules=[{"from": [{"source": {"principals": [SLEEP]}}]}]),
        ],
        conn(OTHER),
        True,
    ),
    (
        "DENY alone, non-matching: default allow",
        [ap("deny", action="DENY", rules=[{"to": [{"operation": {"ports": ["22"]}}]}])],
        conn(),
        True,
    ),
    ("DENY rules [{}] denies all", [ap("deny", action="DENY", rules=[{}])], conn(), False),
    ("allow-nothing: spec {}", [ap("deny-all")], conn(), False),
    ("allow-nothing: rules []", [ap("deny-all", rules=[])], conn(), False),
    (
        "allow-nothing plus a matching ALLOW",
        [ap("deny-all"), allow_from(principals=[SLEEP])],
        conn(SLEEP),
        True,
    ),
    (
        "AUDIT is not applied",
        [ap("audit", action="AUDIT", rules=[{"from": [{"source": {"principals": [SLEEP]}}]}])],
        conn(OTHER),
        True,
    ),
    (
        "CUSTOM is not applied",
        [ap("ext", action="CUSTOM", provider={"name": "opa"}, rules=[{}])],
        conn(OTHER),
        True,
    ),
    (
        "targetRefs policy is for a waypoint",
        [
            ap(
                "wp",
                targetRefs=[
                    {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}
                ],
                rules=[{"from": [{"source": {"principals": [SLEEP]}}]}],
            )
        ],
        conn(OTHER),
        True,
    ),
    (
        "principal written with spiffe:// never matches",
        [allow_from(principals=["spiffe://" + SLEEP])],
        conn(SLEEP),
        False,
    ),
]


@pytest.mark.parametrize(
    ("policies", "c", "allowed"), [m[1:] for m in MATRIX], ids=[m[0] for m in MATRIX]
)
def test_matrix(policies: list[dict[str, Any]], c: Conn, allowed: bool) -> None:
    decision = store(*policies).evaluate(c)
    assert decision.allowed is allowed, decision.reason


@pytest.mark.parametrize(
    ("pattern", "principal", "matches"),
    [
        ("*", SLEEP, True),
        ("cluster.local/ns/foo/*", SLEEP, True),
        ("cluster.local/ns/foo/*", OTHER, False),
        ("*/sa/sleep", SLEEP, True),
        ("*/sa/sleep", "cluster.local/ns/foo/sa/sleeper", False),
        ("*sleep", SLEEP, True),
        ("cluster.local/*/sa/sleep", SLEEP, False),  # '*' in the middle is a literal
        ("td2/ns/foo/sa/sleep", SLEEP, False),  # trust domain is part of the principal
    ],
)
def test_principal_wildcards(pattern: str, principal: str, matches: bool) -> None:
    s = store(allow_from(principals=[pattern]))
    assert s.evaluate(conn(principal)).allowed is matches


def test_decision_names_the_deciding_policy() -> None:
    s = store(
        allow_from(principals=[SLEEP]),
        ap("deny", action="DENY", rules=[{"from": [{"source": {"namespaces": ["other"]}}]}]),
    )
    d = s.evaluate(conn(SLEEP))
    assert (d.allowed, d.policy) == (True, "foo/allow")
    assert "rule 0" in d.reason
    d = s.evaluate(conn(OTHER))
    assert (d.allowed, d.policy) == (False, "foo/deny")
    d = s.evaluate(conn("cluster.local/ns/foo/sa/nobody"))
    assert (d.allowed, d.policy) == (False, "foo/allow")
    assert "no ALLOW policy matched" in d.reason


def test_no_allow_policy_decision_has_no_policy() -> None:
    d = store().evaluate(conn())
    assert d == type(d)(True, None, d.reason)


# ---------------------------------------------------------------------------
# L7 content: ALLOW drops the rule, DENY keeps the L4 part (ztunnel semantics)
# ---------------------------------------------------------------------------


def test_l7_allow_rule_note_and_never_matches() -> None:
    s = store(
        ap(
            "get-only",
            selector={"matchLabels": {"app": "web"}},
            rules=[
                {
                    "from": [{"source": {"principals": [SLEEP]}}],
                    "to": [{"operation": {"methods": ["GET"]}}],
                }
            ],
        )
    )
    (pol,) = s.authorization_policies
    assert pol.rules == ()
    assert pol.notes[0] == (
        "rule 0: ALLOW rule uses L7 field 'methods'; it never matches at L4 (ztunnel "
        "semantics); attach the policy to a waypoint"
    )
    assert "allows nothing" in pol.notes[1]
    assert not s.evaluate(conn(SLEEP)).allowed


def test_l7_fields_listed_in_note() -> None:
    pol = compile_policy(
        parse_authorization_policy(
            ap(
                "x",
                rules=[
                    {
                        "from": [
                            {
                                "source": {
                                    "requestPrincipals": ["*"],
                                    "notRemoteIpBlocks": ["1.2.3.4"],
                                }
                            }
                        ],
                        "to": [{"operation": {"hosts": ["a"], "notPaths": ["/b"]}}],
                        "when": [{"key": "request.auth.claims[iss]", "values": ["me"]}],
                    }
                ],
            )
        )
    )
    assert (
        "uses L7 fields 'hosts', 'notPaths', 'requestPrincipals', 'notRemoteIpBlocks', "
        "'request.auth.claims[iss]'" in pol.notes[0]
    )


def test_deny_with_l7_keeps_l4_part() -> None:
    s = store(
        ap(
            "deny-post-9000",
            action="DENY",
            rules=[{"to": [{"operation": {"ports": ["9000"], "methods": ["POST"]}}]}],
        )
    )
    # Denies every connection to 9000 (GETs too): more restrictive than written.
    assert not s.evaluate(conn(dst_port=9000)).allowed
    assert s.evaluate(conn(dst_port=8080)).allowed
    (pol,) = s.authorization_policies
    assert "denies more than written" in pol.notes[0]


def test_deny_with_l7_keeps_l4_source_part() -> None:
    s = store(
        ap(
            "deny",
            action="DENY",
            rules=[
                {
                    "from": [{"source": {"namespaces": ["other"]}}],
                    "to": [{"operation": {"paths": ["/admin"]}}],
                }
            ],
        )
    )
    # The `to` clause held only L7 content, so ztunnel can never match the rule.
    assert s.evaluate(conn(OTHER)).allowed
    (pol,) = s.authorization_policies
    assert "has NO effect at the node" in pol.notes[0]
    assert "its to has nothing left" in pol.notes[0]


def test_deny_with_only_l7_fields_has_no_effect_in_ztunnel() -> None:
    # istio/istio#61126: the empty match istiod sends is skipped by ztunnel, so a DENY
    # rule whose clause had only L7 content never fires (fails open).
    s = store(
        ap(
            "deny-no-jwt",
            action="DENY",
            rules=[{"from": [{"source": {"notRequestPrincipals": ["*"]}}]}],
        )
    )
    assert s.evaluate(conn(None)).allowed
    assert s.evaluate(conn(SLEEP)).allowed
    (pol,) = s.authorization_policies
    assert "NO effect" in pol.notes[0]
    assert "istio/istio#61126" in pol.notes[0]
    assert pol.notes[-1] == "no rule can match at L4: this DENY policy has no effect at the node"


def test_deny_with_l7_when_has_no_effect() -> None:
    s = store(
        ap(
            "deny",
            action="DENY",
            rules=[
                {
                    "from": [{"source": {"namespaces": ["other"]}}],
                    "when": [{"key": "request.headers[x-debug]", "values": ["1"]}],
                }
            ],
        )
    )
    assert s.evaluate(conn(OTHER)).allowed


def test_deny_from_entries_l7_entry_ignored_l4_entry_kept() -> None:
    s = store(
        ap(
            "deny",
            action="DENY",
            rules=[
                {
                    "from": [
                        {"source": {"principals": [OTHER]}},
                        {"source": {"requestPrincipals": ["*"]}},
                    ]
                }
            ],
        )
    )
    assert not s.evaluate(conn(OTHER)).allowed
    assert s.evaluate(conn(SLEEP)).allowed
    (pol,) = s.authorization_policies
    assert "from[1] had only L7 fields and never match" in pol.notes[0]


def test_deny_mixing_l4_and_l7_in_one_source_keeps_l4() -> None:
    s = store(
        ap(
            "deny",
            action="DENY",
            rules=[{"from": [{"source": {"namespaces": ["other"], "requestPrincipals": ["x/y"]}}]}],
        )
    )
    assert not s.evaluate(conn(OTHER)).allowed
    assert s.evaluate(conn(SLEEP)).allowed


# ---------------------------------------------------------------------------
# Scope: selector, namespace, root namespace
# ---------------------------------------------------------------------------


def test_selector_scoping() -> None:
    s = store(
        ap(
            "web-only",
            selector={"matchLabels": {"app": "web"}},
            rules=[{"from": [{"source": {"principals": [SLEEP]}}]}],
        )
    )
    assert not s.evaluate(conn(OTHER, dst=FOO_APP)).allowed
    assert s.evaluate(conn(OTHER, dst=FOO_DB)).allowed  # not selected
    assert s.evaluate(conn(OTHER, dst=BAR_APP)).allowed  # same labels, other namespace
    assert [p.key for p in s.policies_for(FOO_APP)] == ["foo/web-only"]
    assert s.policies_for(FOO_DB) == ()


def test_selector_needs_every_label() -> None:
    s = store(ap("v2", selector={"matchLabels": {"app": "web", "version": "v2"}}))
    assert s.evaluate(conn(dst=FOO_APP)).allowed


def test_namespace_policy_applies_to_every_workload_in_namespace() -> None:
    s = store(ap("deny-all"))
    assert not s.evaluate(conn(dst=FOO_APP)).allowed
    assert not s.evaluate(conn(dst=FOO_DB)).allowed
    assert s.evaluate(conn(dst=BAR_APP)).allowed
    assert s.authorization_policies[0].scope is Scope.NAMESPACE


def test_root_namespace_policy_is_mesh_wide() -> None:
    s = store(
        ap(
            "mesh-deny",
            "istio-system",
            action="DENY",
            rules=[{"from": [{"source": {"namespaces": ["other"]}}]}],
        )
    )
    assert s.authorization_policies[0].scope is Scope.MESH
    for wl in (FOO_APP, FOO_DB, BAR_APP):
        assert not s.evaluate(conn(OTHER, dst=wl)).allowed
        assert s.evaluate(conn(SLEEP, dst=wl)).allowed


def test_root_namespace_selector_reaches_every_namespace() -> None:
    s = store(
        ap(
            "web-deny",
            "istio-system",
            action="DENY",
            selector={"matchLabels": {"app": "web"}},
            rules=[{}],
        )
    )
    assert not s.evaluate(conn(dst=FOO_APP)).allowed
    assert not s.evaluate(conn(dst=BAR_APP)).allowed
    assert s.evaluate(conn(dst=FOO_DB)).allowed


def test_root_namespace_is_configurable() -> None:
    s = store(ap("deny-all", "mesh-root"), root="mesh-root")
    assert not s.evaluate(conn(dst=BAR_APP)).allowed
    s = store(ap("deny-all", "mesh-root"))
    assert s.evaluate(conn(dst=BAR_APP)).allowed


def test_agent_config_workload_works_as_destination() -> None:
    wl = Workload("web-1", "foo", "web", "node-a", ("10.1.0.7",), {"app": "web"})
    s = store(allow_from(principals=[SLEEP]))
    assert s.evaluate(Conn.make("10.0.0.5", SLEEP, "10.1.0.7", 80, wl)).allowed
    assert not s.evaluate(Conn.make("10.0.0.5", OTHER, "10.1.0.7", 80, wl)).allowed


def test_enforcement_and_notes_for_unenforceable_policies() -> None:
    s = store(
        ap("audit", action="AUDIT", rules=[{}]),
        ap("ext", action="CUSTOM", provider={"name": "opa"}, rules=[{}]),
        ap(
            "wp",
            targetRefs=[
                {"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}
            ],
        ),
        ap("svc", targetRef={"kind": "Service", "group": "", "name": "web"}),
    )
    by_name = {p.policy.name: p for p in s.authorization_policies}
    assert by_name["audit"].enforcement is Enforcement.NONE
    assert "ztunnel does not support the AUDIT action" in by_name["audit"].notes[0]
    assert "policy not applied" in by_name["ext"].notes[0]
    assert by_name["wp"].enforcement is Enforcement.WAYPOINT
    assert (
        by_name["wp"]
        .notes[0]
        .startswith("for a waypoint: attached with targetRefs to Gateway foo/waypoint")
    )
    assert by_name["svc"].enforcement is Enforcement.WAYPOINT
    assert s.policies_for(FOO_APP) == ()


# ---------------------------------------------------------------------------
# Connections
# ---------------------------------------------------------------------------


def test_conn_derives_namespace_from_identity() -> None:
    c = Conn.make("10.0.0.1", "spiffe://cluster.local/ns/foo/sa/sleep", "10.0.0.2", 80, FOO_APP)
    assert c.src_namespace == "foo"
    assert c.src_principal == SpiffeId("cluster.local", "foo", "sleep")


def test_conn_refuses_inconsistent_namespace() -> None:
    with pytest.raises(ValueError, match="contradicts"):
        Conn.make("10.0.0.1", SLEEP, "10.0.0.2", 80, FOO_APP, src_namespace="bar")
    with pytest.raises(ValueError, match="plaintext"):
        Conn.make("10.0.0.1", None, "10.0.0.2", 80, FOO_APP, src_namespace="bar")
    with pytest.raises(ValueError, match="port"):
        Conn.make("10.0.0.1", None, "10.0.0.2", 70000, FOO_APP)


# ---------------------------------------------------------------------------
# PeerAuthentication
# ---------------------------------------------------------------------------


def test_peer_authentication_default_is_permissive() -> None:
    s = store()
    assert s.mtls_mode(FOO_APP) is Mode.PERMISSIVE
    assert s.plaintext_allowed(FOO_APP, 8080)


@pytest.mark.parametrize(
    ("docs", "expected"),
    [
        ([pa("default", "istio-system", "STRICT")], Mode.STRICT),
        ([pa("default", "istio-system", "STRICT"), pa("ns", "foo", "PERMISSIVE")], Mode.PERMISSIVE),
        ([pa("default", "istio-system", "STRICT"), pa("ns", "foo", "UNSET")], Mode.STRICT),
        ([pa("default", "istio-system", "STRICT"), pa("ns", "foo")], Mode.STRICT),
        (
            [pa("ns", "foo", "STRICT"), pa("wl", "foo", "PERMISSIVE", {"app": "web"})],
            Mode.PERMISSIVE,
        ),
        ([pa("ns", "foo", "PERMISSIVE"), pa("wl", "foo", "STRICT", {"app": "web"})], Mode.STRICT),
        ([pa("ns", "foo", "STRICT"), pa("wl", "foo", "UNSET", {"app": "web"})], Mode.STRICT),
        ([pa("ns", "foo", "STRICT"), pa("wl", "foo", "PERMISSIVE", {"app": "db"})], Mode.STRICT),
        ([pa("ns", "bar", "STRICT")], Mode.PERMISSIVE),  # other namespace
        ([pa("wl", "istio-system", "STRICT", {"app": "web"})], Mode.PERMISSIVE),  # ignored
        ([pa("ns", "foo", "DISABLE")], Mode.DISABLE),
    ],
)
def test_peer_authentication_precedence(docs: list[dict[str, Any]], expected: Mode) -> None:
    s = store(*docs)
    assert s.mtls_mode(FOO_APP) is expected
    assert s.plaintext_allowed(FOO_APP, 8080) is (expected is not Mode.STRICT)


def test_port_level_mtls_overrides() -> None:
    s = store(
        pa("ns", "foo", "STRICT"),
        pa(
            "wl",
            "foo",
            "UNSET",
            {"app": "web"},
            {8080: "PERMISSIVE", "9090": "STRICT", 7070: "DISABLE"},
        ),
    )
    assert s.mtls_mode(FOO_APP) is Mode.STRICT
    assert s.plaintext_allowed(FOO_APP, 8080)
    assert not s.plaintext_allowed(FOO_APP, 9090)
    assert s.plaintext_allowed(FOO_APP, 7070)
    assert not s.plaintext_allowed(FOO_APP, 443)  # inherits STRICT
    assert s.mtls_mode(FOO_APP, 8080) is Mode.PERMISSIVE
    # Port-level modes belong to the selected workload only.
    assert not s.plaintext_allowed(FOO_DB, 8080)


def test_port_level_strict_on_permissive_workload() -> None:
    s = store(pa("wl", "foo", "PERMISSIVE", {"app": "web"}, {9090: "STRICT"}))
    assert s.plaintext_allowed(FOO_APP, 8080)
    assert not s.plaintext_allowed(FOO_APP, 9090)


def test_oldest_peer_authentication_wins() -> None:
    s = store(
        pa("b-new", "foo", "PERMISSIVE", created="2024-05-01T00:00:00Z"),
        pa("a-old", "foo", "STRICT", created="2023-01-01T00:00:00Z"),
    )
    assert s.mtls_mode(FOO_APP) is Mode.STRICT
    notes = {p["name"]: p["notes"] for p in s.describe()["peerAuthentications"]}
    assert notes["b-new"] == ["shadowed by foo/a-old: with several, the oldest policy wins"]


def test_strict_refuses_plaintext_in_evaluate() -> None:
    s = store(
        pa("default", "foo", "STRICT"),
        pa("wl", "foo", labels={"app": "web"}, ports={8080: "PERMISSIVE"}),
    )
    d = s.evaluate(conn(None, dst_port=9090))
    assert not d.allowed
    assert d.policy == "foo/default"
    assert "plaintext connection refused" in d.reason
    d = s.evaluate(conn(None, dst_port=8080))
    assert d.allowed
    assert s.evaluate(conn(SLEEP, dst_port=9090)).allowed  # mTLS passes


def test_plaintext_meets_authorization_after_permissive() -> None:
    s = store(pa("default", "foo", "PERMISSIVE"), allow_from(namespaces=["foo"]))
    assert not s.evaluate(conn(None)).allowed  # no identity, no namespace
    assert s.evaluate(conn(SLEEP)).allowed


# ---------------------------------------------------------------------------
# Bad documents
# ---------------------------------------------------------------------------

BAD: list[tuple[str, dict[str, Any], str]] = [
    (
        "ip block",
        ap(
            "foo",
            "default",
            rules=[{"from": [{"source": {"ipBlocks": ["10.0.0.0/8", "10.0.0/8"]}}]}],
        ),
        "AuthorizationPolicy default/foo: spec.rules[0].from[0].source.ipBlocks[1]: "
        "'10.0.0/8' is not an IP or CIDR",
    ),
    (
        "port",
        ap("foo", rules=[{"to": [{"operation": {"ports": ["http"]}}]}]),
        "AuthorizationPolicy foo/foo: spec.rules[0].to[0].operation.ports[0]: "
        "'http' is not a port number (0-65535)",
    ),
    (
        "unknown rule field",
        ap("foo", rules=[{"form": [{"source": {"namespaces": ["a"]}}]}]),
        "AuthorizationPolicy foo/foo: spec.rules[0].form: "
        "unknown field (expected one of: from, to, when)",
    ),
    (
        "unknown source field",
        ap("foo", rules=[{"from": [{"source": {"principal": ["a"]}}]}]),
        "AuthorizationPolicy foo/foo: spec.rules[0].from[0].source.principal: unknown field",
    ),
    (
        "string instead of list",
        ap("foo", rules=[{"from": [{"source": {"principals": SLEEP}}]}]),
        "spec.rules[0].from[0].source.principals: expected a list, got a string",
    ),
    (
        "action",
        ap("foo", action="REJECT"),
        "spec.action: 'REJECT' is not one of ALLOW, DENY, AUDIT, CUSTOM",
    ),
    (
        "deny without rules",
        ap("foo", action="DENY"),
        "spec.rules: DENY action without rules is meaningless",
    ),
    (
        "selector and targetRefs",
        ap(
            "foo",
            selector={"matchLabels": {"a": "b"}},
            targetRefs=[{"kind": "Gateway", "name": "w"}],
        ),
        "spec: only one of targetRefs or selector can be set",
    ),
    (
        "empty source",
        ap("foo", rules=[{"from": [{"source": {}}]}]),
        "spec.rules[0].from[0].source: must not be empty",
    ),
    ("empty from", ap("foo", rules=[{"from": []}]), "spec.rules[0].from: must not be empty"),
    (
        "when without values",
        ap("foo", rules=[{"when": [{"key": "source.ip"}]}]),
        "at least one of values or notValues must be set",
    ),
    (
        "when unknown key",
        ap("foo", rules=[{"when": [{"key": "source.nope", "values": ["x"]}]}]),
        "spec.rules[0].when[0].key: unknown attribute 'source.nope'",
    ),
    (
        "when bad ip",
        ap("foo", rules=[{"when": [{"key": "destination.ip", "values": ["nope"]}]}]),
        "spec.rules[0].when[0].values[0]: 'nope' is not an IP or CIDR",
    ),
    (
        "serviceAccounts with principals",
        ap("foo", rules=[{"from": [{"source": {"serviceAccounts": ["a"], "principals": ["b"]}}]}]),
        "cannot set serviceAccounts with namespaces or principals",
    ),
    (
        "wildcard selector",
        ap("foo", selector={"matchLabels": {"app": "*"}}),
        "spec.selector.matchLabels.app: wildcard is not supported in selector",
    ),
    (
        "api version",
        {**ap("foo"), "apiVersion": "security.istio.io/v1alpha1"},
        "apiVersion: 'security.istio.io/v1alpha1' is not supported for AuthorizationPolicy",
    ),
    (
        "missing name",
        {**ap("foo"), "metadata": {"namespace": "foo"}},
        "metadata.name: must be a non-empty string",
    ),
    (
        "provider without CUSTOM",
        ap("foo", provider={"name": "x"}, rules=[{}]),
        "spec.provider: must not be set with action ALLOW",
    ),
    (
        "peer auth port on namespace policy",
        pa("ns", "foo", "STRICT", ports={8080: "PERMISSIVE"}),
        "PeerAuthentication foo/ns: spec.portLevelMtls: "
        "mesh/namespace peer authentication cannot have port level mTLS",
    ),
    (
        "peer auth mode",
        pa("ns", "foo", "ON"),
        "PeerAuthentication foo/ns: spec.mtls.mode: "
        "'ON' is not one of UNSET, DISABLE, PERMISSIVE, STRICT",
    ),
    (
        "peer auth port range",
        pa("wl", "foo", "STRICT", {"app": "web"}, {0: "STRICT"}),
        "spec.portLevelMtls.0: 0: port must be in range 1..65535",
    ),
]


@pytest.mark.parametrize(("doc", "message"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_document_reported_and_others_stay_in_force(doc: dict[str, Any], message: str) -> None:
    good = ap("deny-all", "bar")
    s, report = compile_policies([good, doc, allow_from(principals=[SLEEP])])
    assert any(message in str(e) for e in report.errors), [str(e) for e in report.errors]
    assert "AuthorizationPolicy bar/deny-all" in report.loaded
    assert "AuthorizationPolicy foo/allow" in report.loaded
    assert not s.evaluate(conn(dst=BAR_APP)).allowed
    # The valid ALLOW is in force; the broken document fails closed over what it could
    # reach (agent/policy/load.py), and a connection it denies says which document.
    decision = s.evaluate(conn(SLEEP))
    guarded = s.guards_for(FOO_APP, "AuthorizationPolicy")  # a PeerAuthentication's: plaintext
    assert decision.allowed is not bool(guarded)
    if guarded:
        assert "could not be applied" in decision.reason
    assert s.describe()["rejected"]


def test_ip_block_message_exact() -> None:
    with pytest.raises(PolicyError) as info:
        parse_authorization_policy(
            ap(
                "foo",
                "default",
                rules=[{"from": [{"source": {"ipBlocks": ["10.0.0.0/8", "10.0.0/8"]}}]}],
            )
        )
    assert str(info.value) == (
        "AuthorizationPolicy default/foo: spec.rules[0].from[0].source.ipBlocks[1]: "
        "'10.0.0/8' is not an IP or CIDR"
    )
    assert info.value.path == "spec.rules[0].from[0].source.ipBlocks[1]"


def test_every_error_in_a_document_is_reported() -> None:
    doc = ap(
        "foo",
        action="DENY",
        rules=[
            {"from": [{"source": {"ipBlocks": ["x"]}}], "to": [{"operation": {"ports": ["-1"]}}]}
        ],
    )
    with pytest.raises(PolicyError) as info:
        parse_authorization_policy(doc)
    assert len(info.value.all) == 2
    _, report = compile_policies([doc])
    assert len(report.errors) == 2


def test_invalid_update_of_an_allow_fails_closed() -> None:
    # It used to keep the previous ALLOW: a typo in the revocation of a grant kept the
    # grant.  Now the workloads it selects are denied until the document is fixed.
    s = store(allow_from(principals=[SLEEP]))
    s, report = compile_policies([allow_from(principals=[SLEEP], ipBlocks=["bad"])], s)
    assert not report.ok
    assert not s.evaluate(conn(SLEEP)).allowed
    assert not s.evaluate(conn(OTHER)).allowed
    assert s.evaluate(conn(SLEEP, dst=FOO_DB)).allowed


def test_invalid_update_of_a_deny_keeps_previous_version() -> None:
    deny = ap("deny", selector={"matchLabels": {"app": "web"}}, action="DENY")
    s = store(
        {
            **deny,
            "spec": {**deny["spec"], "rules": [{"from": [{"source": {"principals": [OTHER]}}]}]},
        }
    )
    bad = {
        **deny,
        "spec": {**deny["spec"], "rules": [{"from": [{"source": {"ipBlocks": ["bad"]}}]}]},
    }
    s, report = compile_policies([bad], s)
    assert not report.ok
    assert s.evaluate(conn(SLEEP)).allowed
    assert not s.evaluate(conn(OTHER)).allowed


def test_non_mapping_and_empty_documents() -> None:
    _, report = compile_policies([None, ["not", "a", "mapping"], "text"])
    assert [str(e) for e in report.errors] == [
        "document 1: expected a mapping, got a list",
        "document 2: expected a mapping, got a string",
    ]


def test_other_kinds_skipped_with_hints() -> None:
    docs = [
        {
            "apiVersion": "policy.linkerd.io/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "l5d", "namespace": "foo"},
        },
        {
            "apiVersion": "linkerd.io/v1alpha2",
            "kind": "ServiceProfile",
            "metadata": {"name": "sp", "namespace": "foo"},
        },
        {
            "apiVersion": "networking.istio.io/v1",
            "kind": "VirtualService",
            "metadata": {"name": "vs"},
        },
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "foo"}},
        {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}},
    ]
    _, report = compile_policies(docs)
    assert report.ok
    assert report.loaded == ()
    reasons = {s.document: s.reason for s in report.skipped}
    assert reasons["AuthorizationPolicy foo/l5d"].startswith(
        "not supported: Linkerd AuthorizationPolicy"
    )
    assert "use an Istio AuthorizationPolicy" in reasons["AuthorizationPolicy foo/l5d"]
    assert "VirtualService" in reasons["ServiceProfile foo/sp"]
    assert reasons["VirtualService default/vs"].startswith(
        "not applied: VirtualService is Istio traffic configuration"
    )
    assert "runs none yet" in reasons["VirtualService default/vs"]
    assert reasons["Namespace foo"].startswith("not handled")
    assert reasons["Widget default/w"] == "not handled by L4 authorization: Widget (example.com/v1)"


def test_each_compilation_is_the_full_set_and_leaves_the_previous_untouched() -> None:
    s = store(ap("deny-all"))
    assert not s.evaluate(conn()).allowed
    # A document absent from the next list is gone (a watch saw it deleted).
    s2, report = compile_policies([pa("default", "foo", "STRICT")], s)
    assert report.ok
    assert s2.evaluate(conn()).allowed
    assert s2.mtls_mode(FOO_APP) is Mode.STRICT
    # The previous set is immutable: readers holding it see no change.
    assert not s.evaluate(conn()).allowed
    assert s.mtls_mode(FOO_APP) is Mode.PERMISSIVE
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.authorization_policies = ()  # type: ignore[misc]


def test_describe_is_json_and_carries_notes() -> None:
    s = store(
        allow_from(principals=[SLEEP], ipBlocks=["fd00::/8"]),
        ap("l7", rules=[{"to": [{"operation": {"methods": ["GET"]}}]}]),
        pa("wl", "foo", "STRICT", {"app": "web"}, {9090: "STRICT"}),
        pa("ns", "foo", "STRICT"),
    )
    dump = json.loads(json.dumps(s.describe()))
    allow = next(p for p in dump["authorizationPolicies"] if p["name"] == "allow")
    assert allow["rules"] == [
        {
            "rule": 0,
            "clauses": [
                [{"principals": [{"exact": SLEEP}], "sourceIps": ["fd00::/8"]}],
            ],
        }
    ]
    l7 = next(p for p in dump["authorizationPolicies"] if p["name"] == "l7")
    assert l7["notes"][0].startswith("rule 0: ALLOW rule uses L7 field 'methods'")
    wl = next(p for p in dump["peerAuthentications"] if p["name"] == "wl")
    assert wl["portLevelMtls"] == {"9090": "STRICT"}
    assert "portLevelMtls 9090: STRICT repeats the workload mode" in wl["notes"]
    assert "mode STRICT repeats the namespace/mesh mode set by foo/ns" in wl["notes"]


def test_parse_typed_model() -> None:
    pol = parse_authorization_policy(
        ap(
            "p",
            action="DENY",
            selector={"matchLabels": {"b": "2", "a": "1"}},
            rules=[
                {
                    "from": [{"source": {"principals": [SLEEP], "ipBlocks": ["10.0.0.1"]}}],
                    "to": [{"operation": {"notPorts": ["22"], "methods": ["GET"]}}],
                    "when": [{"key": "source.ip", "notValues": ["10.9.0.0/16"]}],
                }
            ],
        )
    )
    assert pol.action is Action.DENY
    assert pol.selector == (("a", "1"), ("b", "2"))
    rule = pol.rules[0]
    assert rule.sources[0].principals == (SLEEP,)
    assert str(rule.sources[0].ip_blocks[0]) == "10.0.0.1/32"
    assert rule.operations[0].not_ports == (22,)
    assert rule.operations[0].methods == ("GET",)
    assert rule.conditions[0].not_values == ("10.9.0.0/16",)
    peer = parse_peer_authentication(
        pa("wl", "foo", "STRICT", {"app": "web"}, {9090: "PERMISSIVE"})
    )
    assert peer.port_modes == ((9090, Mode.PERMISSIVE),)
    with pytest.raises(dataclasses.FrozenInstanceError):
        pol.name = "other"  # type: ignore[misc]


def test_v1beta1_and_missing_namespace_default() -> None:
    doc = ap("p")
    doc["apiVersion"] = "security.istio.io/v1beta1"
    del doc["metadata"]["namespace"]
    _, report = compile_policies([doc], default_namespace="default")
    assert report.loaded == ("AuthorizationPolicy default/p",)


def test_selector_without_labels_selects_the_namespace() -> None:
    s = store(ap("all", selector={"matchLabels": {}}, action="DENY", rules=[{}]))
    (pol,) = s.authorization_policies
    assert pol.scope is Scope.WORKLOAD
    assert pol.notes == ("selector without labels: selects every workload in namespace foo",)
    assert not s.evaluate(conn(dst=FOO_DB)).allowed
    assert s.evaluate(conn(dst=BAR_APP)).allowed
