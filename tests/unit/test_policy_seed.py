"""The user's own Istio security documents (shared seed fixtures), as the node enforces them.

Each test pins one document's concrete L4 effect and the notes tether prints for it,
so a change in semantics shows up as a change in what a real user would see.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.policy import (
    Conn,
    Decision,
    Enforcement,
    Mode,
    PolicySet,
    Scope,
    WorkloadRef,
    compile_policies,
)

SEED_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "seed-yaml"

if not SEED_DIR.is_dir():
    pytest.skip(f"seed fixtures not found at {SEED_DIR}", allow_module_level=True)

SECURITY_KINDS = ("AuthorizationPolicy", "PeerAuthentication")
MESH_KINDS = (
    "ServiceProfile",
    "TrafficSplit",
    "TrafficTarget",
    "HTTPRouteGroup",
    "ServiceIntentions",
    "ServiceSplitter",
    "ServiceResolver",
    "ServiceDefaults",
)

FRONTEND = "cluster.local/ns/blog/sa/blog-frontend"
GATEWAY = "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
BLOG_OTHER = "cluster.local/ns/blog/sa/default"
MYAPP_SA = "cluster.local/ns/production/sa/myapp"


def _load_all() -> list[tuple[Path, dict[str, Any]]]:
    out = []
    for path in sorted(SEED_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                out.append((path, doc))
    return out


ALL = _load_all()


def _find(kind: str, namespace: str, name: str) -> dict[str, Any]:
    for _, doc in ALL:
        meta = doc.get("metadata") or {}
        if (
            doc.get("kind") == kind
            and meta.get("name") == name
            and meta.get("namespace", "default") == namespace
        ):
            return doc
    raise AssertionError(f"seed fixture {kind} {namespace}/{name} not found in {SEED_DIR}")


def _workload(name: str, namespace: str) -> WorkloadRef:
    """A destination pod as its seed Deployment would create it (namespace + template labels)."""
    doc = next(
        d
        for _, d in ALL
        if d.get("kind") == "Deployment"
        and d["metadata"]["name"] == name
        and d["metadata"].get("namespace", "default") == namespace
    )
    labels = doc["spec"]["template"]["metadata"]["labels"]
    return WorkloadRef(doc["metadata"].get("namespace", "default"), dict(labels), name)


BLOG_API = _workload("blog-api", "blog")
USER_SERVICE = _workload("user-service", "blog")
OTHER_BLOG_POD = WorkloadRef("blog", {"app": "redis"}, "redis")
MYAPP_PROD = WorkloadRef("production", {"app": "myapp"}, "myapp")
OTHER_PROD_POD = WorkloadRef("production", {"app": "billing"}, "billing")


def _store(*keys: tuple[str, str, str]) -> PolicySet:
    s, report = compile_policies([_find(*k) for k in keys])
    assert report.ok, [str(e) for e in report.errors]
    assert len(report.loaded) == len(keys)
    return s


def _decide(s: PolicySet, principal: str | None, dst: WorkloadRef, port: int = 8080) -> Decision:
    return s.evaluate(Conn.make("10.244.1.9", principal, "10.244.2.3", port, dst))


def _notes(s: PolicySet, key: str) -> tuple[str, ...]:
    return next(p.notes for p in s.authorization_policies if p.key == key)


def test_every_fixture_names_its_seed() -> None:
    for path in sorted(SEED_DIR.glob("*.yaml")):
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first.startswith("# from seed "), path.name


def test_all_security_documents_load_cleanly() -> None:
    docs = [d for _, d in ALL if d.get("kind") in SECURITY_KINDS]
    _, report = compile_policies(docs)
    assert report.ok, [str(e) for e in report.errors]
    assert sorted(report.loaded) == [
        "AuthorizationPolicy blog/allow-frontend",
        "AuthorizationPolicy blog/blog-api-authz",
        "AuthorizationPolicy blog/deny-all",
        "AuthorizationPolicy blog/jwt-authz",
        "AuthorizationPolicy production/allow-myapp",
        "PeerAuthentication blog/default",
        "PeerAuthentication blog/user-service-mtls",
        "PeerAuthentication production/default",
    ]
    assert report.skipped == ()


# ---------------------------------------------------------------------------
# AuthorizationPolicy, one document at a time
# ---------------------------------------------------------------------------


def test_deny_all_with_empty_spec_denies_everything_in_blog() -> None:
    doc = _find("AuthorizationPolicy", "blog", "deny-all")
    assert doc["spec"] is None  # `spec:` followed only by a comment is YAML null
    s = _store(("AuthorizationPolicy", "blog", "deny-all"))
    (pol,) = s.authorization_policies
    assert pol.scope is Scope.NAMESPACE
    assert pol.rules == ()
    assert pol.notes == (
        "no rules: allow-nothing policy; every connection to the selected workloads is "
        "denied unless another ALLOW policy matches it (Istio: an empty spec denies all)",
    )
    for dst in (BLOG_API, USER_SERVICE, OTHER_BLOG_POD):
        for principal in (FRONTEND, GATEWAY, None):
            d = _decide(s, principal, dst)
            assert not d.allowed
            assert d.policy == "blog/deny-all"
    assert _decide(s, None, MYAPP_PROD).allowed  # other namespaces untouched


def test_allow_frontend_is_l7_only_and_allows_nothing_at_l4() -> None:
    s = _store(("AuthorizationPolicy", "blog", "allow-frontend"))
    assert _notes(s, "blog/allow-frontend") == (
        "rule 0: ALLOW rule uses L7 field 'methods'; it never matches at L4 (ztunnel "
        "semantics); attach the policy to a waypoint",
        "no rule can match at L4: at the node this ALLOW policy allows nothing, so "
        "connections to the selected workloads are denied unless another ALLOW policy matches",
    )
    # Even the intended caller is refused: the GET/POST condition cannot be checked at L4.
    d = _decide(s, FRONTEND, BLOG_API)
    assert (d.allowed, d.policy) == (False, "blog/allow-frontend")
    assert _decide(s, FRONTEND, USER_SERVICE).allowed  # selector: app=blog-api only


def test_blog_api_authz_keeps_its_l4_rules() -> None:
    s = _store(("AuthorizationPolicy", "blog", "blog-api-authz"))
    assert _notes(s, "blog/blog-api-authz") == (
        "rule 2: ALLOW rule uses L7 fields 'methods', 'paths', 'request.headers[authorization]'; "
        "it never matches at L4 (ztunnel semantics); attach the policy to a waypoint",
    )
    d = _decide(s, FRONTEND, BLOG_API)
    assert (d.allowed, d.policy, d.reason) == (
        True,
        "blog/blog-api-authz",
        "allowed by ALLOW policy blog/blog-api-authz rule 0",
    )
    d = _decide(s, GATEWAY, BLOG_API)
    assert (d.allowed, d.reason) == (True, "allowed by ALLOW policy blog/blog-api-authz rule 1")
    assert not _decide(s, BLOG_OTHER, BLOG_API).allowed
    # Rule 2 had no `from`: on a waypoint it admits anyone with a Bearer header; at L4 nobody.
    assert not _decide(s, None, BLOG_API).allowed
    assert _decide(s, BLOG_OTHER, USER_SERVICE).allowed


def test_jwt_authz_never_matches_at_l4() -> None:
    s = _store(("AuthorizationPolicy", "blog", "jwt-authz"))
    notes = _notes(s, "blog/jwt-authz")
    assert notes[0] == (
        "rule 0: ALLOW rule uses L7 fields 'methods', 'requestPrincipals', "
        "'request.auth.claims[role]'; it never matches at L4 (ztunnel semantics); attach the "
        "policy to a waypoint"
    )
    assert notes[1].startswith("rule 1: ALLOW rule uses L7 fields 'methods', 'paths';")
    assert "allows nothing" in notes[2]
    for principal in (FRONTEND, GATEWAY, BLOG_OTHER, None):
        assert not _decide(s, principal, BLOG_API).allowed


def test_allow_myapp_selects_production_myapp() -> None:
    s = _store(("AuthorizationPolicy", "production", "allow-myapp"))
    assert _notes(s, "production/allow-myapp") == ()
    d = _decide(s, MYAPP_SA, MYAPP_PROD)
    assert (d.allowed, d.policy) == (True, "production/allow-myapp")
    assert not _decide(s, "cluster.local/ns/production/sa/default", MYAPP_PROD).allowed
    assert not _decide(s, "cluster.local/ns/staging/sa/myapp", MYAPP_PROD).allowed
    assert not _decide(s, None, MYAPP_PROD).allowed
    assert _decide(s, None, OTHER_PROD_POD).allowed
    # The seed's myapp Deployment has no namespace, so it lands in "default", where
    # this production policy does not reach it.
    deployed = _workload("myapp", "default")
    assert deployed.namespace == "default"
    assert _decide(s, "cluster.local/ns/default/sa/anyone", deployed).allowed


# ---------------------------------------------------------------------------
# PeerAuthentication
# ---------------------------------------------------------------------------


def test_production_default_is_strict() -> None:
    s = _store(("PeerAuthentication", "production", "default"))
    assert s.mtls_mode(MYAPP_PROD) is Mode.STRICT
    assert not s.plaintext_allowed(OTHER_PROD_POD, 8080)
    d = _decide(s, None, OTHER_PROD_POD)
    assert (d.allowed, d.policy) == (False, "production/default")
    assert _decide(s, MYAPP_SA, OTHER_PROD_POD).allowed
    assert s.plaintext_allowed(BLOG_API, 8080)


def test_blog_default_is_strict() -> None:
    s = _store(("PeerAuthentication", "blog", "default"))
    for wl in (BLOG_API, USER_SERVICE, OTHER_BLOG_POD):
        assert s.mtls_mode(wl) is Mode.STRICT
        assert not _decide(s, None, wl).allowed
    assert s.mtls_mode(MYAPP_PROD) is Mode.PERMISSIVE


def test_user_service_mtls_port_level_is_redundant() -> None:
    s = _store(
        ("PeerAuthentication", "blog", "default"),
        ("PeerAuthentication", "blog", "user-service-mtls"),
    )
    assert s.mtls_mode(USER_SERVICE) is Mode.STRICT
    assert s.mtls_mode(USER_SERVICE, 9090) is Mode.STRICT
    assert not s.plaintext_allowed(USER_SERVICE, 9090)
    assert not s.plaintext_allowed(USER_SERVICE, 8080)
    d = _decide(s, None, USER_SERVICE, port=9090)
    assert (d.allowed, d.policy) == (False, "blog/user-service-mtls")
    described = {p["key"]: p for p in s.describe()["peerAuthentications"]}
    wl = described["blog/user-service-mtls"]
    assert wl["level"] == "workload"
    assert wl["portLevelMtls"] == {"9090": "STRICT"}
    assert wl["notes"] == [
        "mode STRICT repeats the namespace/mesh mode set by blog/default",
        "portLevelMtls 9090: STRICT repeats the workload mode",
    ]
    # Without the namespace policy, the workload policy alone still makes it STRICT.
    alone = _store(("PeerAuthentication", "blog", "user-service-mtls"))
    assert not alone.plaintext_allowed(USER_SERVICE, 9090)
    assert alone.plaintext_allowed(BLOG_API, 8080)


# ---------------------------------------------------------------------------
# Everything together, as a user would apply the seeds
# ---------------------------------------------------------------------------

TOGETHER: list[tuple[str, str | None, WorkloadRef, bool, str | None]] = [
    ("frontend -> blog-api", FRONTEND, BLOG_API, True, "blog/blog-api-authz"),
    ("gateway -> blog-api", GATEWAY, BLOG_API, True, "blog/blog-api-authz"),
    ("other blog sa -> blog-api", BLOG_OTHER, BLOG_API, False, None),
    ("plaintext -> blog-api", None, BLOG_API, False, "blog/default"),
    ("frontend -> user-service", FRONTEND, USER_SERVICE, False, "blog/deny-all"),
    ("plaintext -> user-service", None, USER_SERVICE, False, "blog/user-service-mtls"),
    ("anyone -> other blog pod", GATEWAY, OTHER_BLOG_POD, False, "blog/deny-all"),
    ("myapp -> production myapp", MYAPP_SA, MYAPP_PROD, True, "production/allow-myapp"),
    ("frontend -> production myapp", FRONTEND, MYAPP_PROD, False, "production/allow-myapp"),
    ("plaintext -> production pod", None, OTHER_PROD_POD, False, "production/default"),
    ("mTLS -> production pod", FRONTEND, OTHER_PROD_POD, True, None),
    ("plaintext -> default myapp", None, _workload("myapp", "default"), True, None),
]


@pytest.mark.parametrize(
    ("principal", "dst", "allowed", "policy"),
    [t[1:] for t in TOGETHER],
    ids=[t[0] for t in TOGETHER],
)
def test_all_seeds_together(
    principal: str | None, dst: WorkloadRef, allowed: bool, policy: str | None
) -> None:
    s, _ = compile_policies(d for _, d in ALL)
    d = _decide(s, principal, dst)
    assert (d.allowed, d.policy) == (allowed, policy), d.reason


def test_all_seeds_describe_lists_every_policy_with_notes() -> None:
    s, _ = compile_policies(d for _, d in ALL)
    dump = s.describe()
    keys = [p["key"] for p in dump["authorizationPolicies"]]
    assert keys == [
        "blog/allow-frontend",
        "blog/blog-api-authz",
        "blog/deny-all",
        "blog/jwt-authz",
        "production/allow-myapp",
    ]
    assert all(p["enforcement"] == Enforcement.NODE.value for p in dump["authorizationPolicies"])
    assert dump["rejected"] == {}


# ---------------------------------------------------------------------------
# The other kinds: reported as not handled here, never an error
# ---------------------------------------------------------------------------

OTHER_DOCS = [(p, d) for p, d in ALL if d.get("kind") not in SECURITY_KINDS]


@pytest.mark.parametrize(
    ("doc",), [(d,) for _, d in OTHER_DOCS], ids=[p.name for p, _ in OTHER_DOCS]
)
def test_other_kinds_are_skipped_not_crashing(doc: dict[str, Any]) -> None:
    s, report = compile_policies([doc])
    assert report.errors == ()
    assert report.loaded == ()
    (skipped,) = report.skipped
    assert skipped.document.startswith(doc["kind"] + " ")
    kind = doc["kind"]
    if kind in MESH_KINDS:
        assert skipped.reason.startswith("not supported: ")
        assert "use " in skipped.reason  # names the Istio equivalent
    elif kind == "RequestAuthentication":
        assert "waypoint" in skipped.reason
    elif doc["apiVersion"].split("/")[0] in ("networking.istio.io", "gateway.networking.k8s.io"):
        # routing that a waypoint or gateway would apply: said plainly that it is not
        assert skipped.reason.startswith("not applied: ") and "runs none yet" in skipped.reason
    else:
        assert skipped.reason.startswith("not handled")
    assert s.authorization_policies == ()


def test_mesh_kind_hints_name_the_equivalent() -> None:
    _, report = compile_policies(d for _, d in OTHER_DOCS)
    reasons = {s.document: s.reason for s in report.skipped}
    target = reasons["TrafficTarget blog/blog-api-access"]
    assert "AuthorizationPolicy" in target
    assert "'cluster.local/ns/blog/sa/blog-frontend', 'cluster.local/ns/blog/sa/api-gateway'" in (
        target
    )
    intentions = reasons["ServiceIntentions blog/blog-api-intentions"]
    assert "ALLOW from.source.principals" in intentions
    assert "cluster.local/ns/blog/sa/api-gateway" in intentions
    assert (
        "VirtualService" in reasons["TrafficSplit blog/blog-api-split"]
        or "HTTPRoute" in (reasons["TrafficSplit blog/blog-api-split"])
    )
