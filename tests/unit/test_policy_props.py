"""Properties of L4 authorization that must hold for every policy set, not just the examples.

Policies are generated as the YAML dicts users write and go through the real parser, so the
properties cover parsing, compilation and evaluation together.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.policy import (
    Conn,
    PolicySet,
    WorkloadRef,
    compile_policies,
    compile_policy,
    parse_authorization_policy,
)

NAMESPACES = ["a", "b"]
ACCOUNTS = ["x", "y"]
PRINCIPALS = [f"cluster.local/ns/{ns}/sa/{sa}" for ns in NAMESPACES for sa in ACCOUNTS]
PRINCIPAL_PATTERNS = [*PRINCIPALS, "*", "cluster.local/ns/a/*", "*/sa/x", "other.td/ns/a/sa/x"]
NAMESPACE_PATTERNS = [*NAMESPACES, "*", "c"]
IP_BLOCKS = ["10.0.0.0/24", "10.0.0.1", "fd00::/64", "192.168.0.1", "0.0.0.0/0"]
SRC_IPS = ["10.0.0.1", "10.0.1.1", "fd00::1", "192.168.0.1"]
DST_IPS = ["10.1.0.1", "fd01::1"]
PORTS = [80, 443, 8080]
APPS = ["web", "db"]

settings.register_profile("rbac", deadline=None, max_examples=150)
settings.load_profile("rbac")


def _sub(values: list[Any]) -> st.SearchStrategy[list[Any]]:
    return st.lists(st.sampled_from(values), min_size=1, max_size=2, unique=True)


L4_SOURCE_FIELDS: dict[str, st.SearchStrategy[list[Any]]] = {
    "principals": _sub(PRINCIPAL_PATTERNS),
    "notPrincipals": _sub(PRINCIPAL_PATTERNS),
    "namespaces": _sub(NAMESPACE_PATTERNS),
    "notNamespaces": _sub(NAMESPACE_PATTERNS),
    "ipBlocks": _sub(IP_BLOCKS),
    "notIpBlocks": _sub(IP_BLOCKS),
}
L7_SOURCE_FIELDS: dict[str, st.SearchStrategy[list[Any]]] = {
    "requestPrincipals": _sub(["iss/sub", "*"]),
    "remoteIpBlocks": _sub(IP_BLOCKS),
}


@st.composite
def sources(draw: st.DrawFn, allow_l7: bool = True) -> dict[str, Any]:
    fields = dict(L4_SOURCE_FIELDS, **(L7_SOURCE_FIELDS if allow_l7 else {}))
    names = draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=3, unique=True))
    return {n: draw(fields[n]) for n in names}


@st.composite
def operations(draw: st.DrawFn, allow_l7: bool = True) -> dict[str, Any]:
    fields: dict[str, st.SearchStrategy[list[Any]]] = {
        "ports": _sub([str(p) for p in PORTS]),
        "notPorts": _sub([str(p) for p in PORTS]),
    }
    if allow_l7:
        fields["methods"] = _sub(["GET", "POST"])
    names = draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=2, unique=True))
    return {n: draw(fields[n]) for n in names}


L4_CONDITIONS = st.one_of(
    st.builds(
        lambda v: {"key": "source.ip", "values": v},
        _sub(IP_BLOCKS),
    ),
    st.builds(lambda v: {"key": "source.namespace", "notValues": v}, _sub(NAMESPACE_PATTERNS)),
    st.builds(lambda v: {"key": "source.principal", "values": v}, _sub(PRINCIPAL_PATTERNS)),
    st.builds(lambda v: {"key": "destination.ip", "values": v}, _sub(["10.1.0.0/16", "fd01::1"])),
    st.builds(lambda v: {"key": "destination.port", "values": v}, _sub([str(p) for p in PORTS])),
)
L7_CONDITIONS = st.sampled_from(
    [
        {"key": "request.headers[x-user]", "values": ["alice"]},
        {"key": "connection.sni", "values": ["svc.example"]},
        {"key": "request.auth.claims[iss]", "notValues": ["evil"]},
    ]
)


@st.composite
def rules(draw: st.DrawFn, allow_l7: bool = True) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    froms = draw(st.lists(sources(allow_l7), max_size=2))
    tos = draw(st.lists(operations(allow_l7), max_size=2))
    conditions = L4_CONDITIONS | L7_CONDITIONS if allow_l7 else L4_CONDITIONS
    whens = draw(st.lists(conditions, max_size=2))
    if froms:
        rule["from"] = [{"source": s} for s in froms]
    if tos:
        rule["to"] = [{"operation": o} for o in tos]
    if whens:
        rule["when"] = whens
    return rule


@st.composite
def policies(draw: st.DrawFn, action: str | None = None, allow_l7: bool = True) -> dict[str, Any]:
    act = action or draw(st.sampled_from(["ALLOW", "DENY"]))
    spec: dict[str, Any] = {"action": act}
    if draw(st.booleans()):
        spec["selector"] = {"matchLabels": {"app": draw(st.sampled_from(APPS))}}
    min_rules = 1 if act == "DENY" else 0
    spec["rules"] = draw(st.lists(rules(allow_l7), min_size=min_rules, max_size=3))
    namespace = draw(st.sampled_from([*NAMESPACES, "istio-system"]))
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": namespace},
        "spec": spec,
    }


def _named(docs: list[dict[str, Any]], prefix: str = "p") -> list[dict[str, Any]]:
    """Give every generated policy a unique name (same-name documents replace each other)."""
    out = []
    for i, doc in enumerate(docs):
        doc = {**doc, "metadata": {**doc["metadata"], "name": f"{prefix}{i}"}}
        out.append(doc)
    return out


workloads = st.builds(
    lambda ns, app: WorkloadRef(ns, {"app": app}),
    st.sampled_from(NAMESPACES),
    st.sampled_from(APPS),
)
conns = st.builds(
    Conn.make,
    st.sampled_from(SRC_IPS),
    st.sampled_from([None, *PRINCIPALS]),
    st.sampled_from(DST_IPS),
    st.sampled_from(PORTS),
    workloads,
)
conn_lists = st.lists(conns, min_size=1, max_size=8)


def _store(docs: list[dict[str, Any]]) -> PolicySet:
    s, report = compile_policies(docs)
    assert report.ok, [str(e) for e in report.errors]
    return s


@given(st.lists(policies(), max_size=4), policies(action="DENY"), conn_lists)
def test_adding_a_deny_policy_never_turns_deny_into_allow(
    base: list[dict[str, Any]], deny: dict[str, Any], cs: list[Conn]
) -> None:
    docs = _named(base)
    before = _store(docs)
    after = _store([*docs, *_named([deny], "extra")])
    for c in cs:
        if not before.evaluate(c).allowed:
            assert not after.evaluate(c).allowed


@given(st.lists(policies(), max_size=4), policies(action="ALLOW"), conn_lists)
def test_adding_allow_to_workload_without_allow_never_allows_more(
    base: list[dict[str, Any]], allow: dict[str, Any], cs: list[Conn]
) -> None:
    docs = _named(base)
    before = _store(docs)
    after = _store([*docs, *_named([allow], "extra")])
    for c in cs:
        had_allow = any(p.policy.action.value == "ALLOW" for p in before.policies_for(c.dst))
        if not had_allow and after.evaluate(c).allowed:
            assert before.evaluate(c).allowed


@given(st.lists(policies(), max_size=5), st.randoms(use_true_random=False), conn_lists)
def test_evaluation_is_deterministic_and_order_independent(
    base: list[dict[str, Any]], rnd: Any, cs: list[Conn]
) -> None:
    docs = _named(base)
    shuffled = list(docs)
    rnd.shuffle(shuffled)
    one, two = _store(docs), _store(shuffled)
    for c in cs:
        first = one.evaluate(c)
        assert one.evaluate(c) == first
        assert two.evaluate(c) == first
    assert one.describe() == two.describe()


def _with_l7(rule: dict[str, Any], where: str) -> dict[str, Any]:
    """The same rule with one L7 attribute added in the given place."""
    rule = {k: [dict(e) if isinstance(e, dict) else e for e in v] for k, v in rule.items()}
    if where == "operation" and rule.get("to"):
        op = dict(rule["to"][0]["operation"], methods=["GET"])
        rule["to"] = [{"operation": op}, *rule["to"][1:]]
    elif where == "source" and rule.get("from"):
        src = dict(rule["from"][0]["source"], requestPrincipals=["iss/sub"])
        rule["from"] = [{"source": src}, *rule["from"][1:]]
    elif where == "to":
        rule["to"] = [*rule.get("to", []), {"operation": {"paths": ["/admin"]}}]
    else:
        rule["when"] = [*rule.get("when", []), {"key": "request.headers[x]", "values": ["1"]}]
    return rule


@given(
    st.sampled_from(["ALLOW", "DENY"]),
    rules(allow_l7=False),
    st.sampled_from(["operation", "source", "to", "when"]),
    conn_lists,
)
def test_adding_an_l7_field_never_matches_more_at_l4(
    action: str, rule: dict[str, Any], where: str, cs: list[Conn]
) -> None:
    def compiled(r: dict[str, Any]) -> Any:
        doc = {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "a"},
            "spec": {"action": action, "rules": [r]},
        }
        return compile_policy(parse_authorization_policy(doc))

    plain, l7 = compiled(rule), compiled(_with_l7(rule, where))
    assert l7.notes  # the L7 field is always reported
    for c in cs:
        if l7.first_match(c) is not None:
            assert plain.first_match(c) is not None


SINGLE_VALUED = st.one_of(
    st.tuples(st.just(("from", "source", "principals")), st.sampled_from(PRINCIPAL_PATTERNS)),
    st.tuples(st.just(("from", "source", "namespaces")), st.sampled_from(NAMESPACE_PATTERNS)),
    st.tuples(st.just(("from", "source", "ipBlocks")), st.sampled_from(IP_BLOCKS)),
    st.tuples(st.just(("to", "operation", "ports")), st.sampled_from([str(p) for p in PORTS])),
)


@given(SINGLE_VALUED, st.sampled_from(["ALLOW", "DENY"]), conn_lists)
def test_not_field_is_the_complement_for_one_value(
    field: tuple[tuple[str, str, str], str], action: str, cs: list[Conn]
) -> None:
    (clause, inner, name), value = field
    negated = "not" + name[0].upper() + name[1:]

    def compiled(key: str) -> Any:
        rule = {clause: [{inner: {key: [value]}}]}
        doc = {
            "apiVersion": "security.istio.io/v1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": "p", "namespace": "a"},
            "spec": {"action": action, "rules": [rule]},
        }
        return compile_policy(parse_authorization_policy(doc))

    pos, neg = compiled(name), compiled(negated)
    for c in cs:
        assert (pos.first_match(c) is None) != (neg.first_match(c) is None)


@given(st.lists(policies(), max_size=3), st.sampled_from(NAMESPACES), conn_lists)
def test_strict_peer_authentication_never_allows_more(
    base: list[dict[str, Any]], namespace: str, cs: list[Conn]
) -> None:
    docs = _named(base)
    strict = {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": namespace},
        "spec": {"mtls": {"mode": "STRICT"}},
    }
    before, after = _store(docs), _store([*docs, strict])
    for c in cs:
        if after.evaluate(c).allowed:
            assert before.evaluate(c).allowed
        if c.src_principal is None and c.dst.namespace == namespace:
            assert not after.evaluate(c).allowed
