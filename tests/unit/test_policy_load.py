"""Loading policy can never fail open: every document not applied is reported, and a
broken or duplicated policy is replaced by its last good version only when that is at
least as strict, else by a deny-all over the workloads it could reach."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.policy import (
    Conn,
    PolicyError,
    PolicySet,
    WorkloadRef,
    compile_policies,
    parse_authorization_policy,
)
from agent.sources.localfile import parse as parse_config

API = "security.istio.io/v1"
WEB = WorkloadRef("foo", {"app": "web"}, "web-1")
DB = WorkloadRef("foo", {"app": "db"}, "db-1")
BAR = WorkloadRef("bar", {"app": "web"}, "web-2")
SLEEP = "cluster.local/ns/foo/sa/sleep"
OTHER = "cluster.local/ns/other/sa/client"
LIMIT = 600  # no error message is longer than this


def ap(name: str, ns: str = "foo", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": API,
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def pa(name: str, ns: str, mode: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"mtls": {"mode": mode}}
    if labels is not None:
        spec["selector"] = {"matchLabels": labels}
    return {
        "apiVersion": API,
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def web(**spec: Any) -> dict[str, Any]:
    return {"selector": {"matchLabels": {"app": "web"}}, **spec}


def deny_other(app: str = "web") -> dict[str, Any]:
    return ap(
        "deny-other",
        selector={"matchLabels": {"app": app}},
        action="DENY",
        rules=[{"from": [{"source": {"principals": [OTHER]}}]}],
    )


def allow_other(app: str = "web") -> dict[str, Any]:
    return ap(
        "deny-other",
        selector={"matchLabels": {"app": app}},
        rules=[{"from": [{"source": {"principals": [OTHER, SLEEP]}}]}],
    )


def broken(doc: dict[str, Any]) -> dict[str, Any]:
    """The same document with one invalid field (the selector stays readable)."""
    out = {**doc, "spec": {**doc["spec"]}}
    out["spec"]["rules"] = [{"from": [{"source": {"ipBlocks": ["10.0.0/8"]}}]}]
    return out


def allowed(s: PolicySet, principal: str | None, dst: WorkloadRef = WEB) -> bool:
    return s.evaluate(Conn.make("10.0.0.5", principal, "10.1.0.7", 8080, dst)).allowed


def rejected(report: Any) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for r in report.rejected:
        out.setdefault(r.document, []).append(" ".join(r.reasons))
    return out


# -- finding 1: duplicates and invalid copies never fail open -------------------------


def test_invalid_copy_of_a_valid_deny_does_not_restore_the_previous_allow() -> None:
    before, _ = compile_policies([allow_other()])
    assert allowed(before, OTHER)
    after, report = compile_policies([deny_other(), broken(deny_other())], before)
    assert not allowed(after, OTHER)
    assert not allowed(after, SLEEP)  # the previous ALLOW is not restored
    assert allowed(after, OTHER, DB)  # the broken policy's selector is readable: app=web only
    decision = after.evaluate(Conn.make("10.0.0.5", OTHER, "10.1.0.7", 8080, WEB))
    assert decision.policy == "foo/deny-other"
    assert "AuthorizationPolicy foo/deny-other" in decision.reason
    assert "fix" in decision.reason
    copies = rejected(report)["AuthorizationPolicy foo/deny-other"]
    assert len(copies) == 2
    assert all("duplicate" in c for c in copies)


def test_two_valid_copies_of_one_key_are_both_rejected() -> None:
    s, report = compile_policies([allow_other(), deny_other()])
    assert not report.ok
    dup = [e for e in report.errors if "duplicate" in str(e)]
    assert len(dup) == 2
    assert report.loaded == ()
    assert len(rejected(report)["AuthorizationPolicy foo/deny-other"]) == 2
    assert "AuthorizationPolicy foo/deny-other" in s.describe()["rejected"]
    assert not allowed(s, OTHER)
    assert not allowed(s, SLEEP)


def test_broken_deny_keeps_its_last_good_version() -> None:
    before, _ = compile_policies([deny_other()])
    after, report = compile_policies([broken(deny_other())], before)
    assert not report.ok
    assert not allowed(after, OTHER)  # the last good DENY still denies
    assert allowed(after, SLEEP)  # and only what it denied: no deny-all needed
    (r,) = report.rejected
    assert "last good version" in r.fallback
    # still in force after another load with the document still broken
    again, _ = compile_policies([broken(deny_other())], after)
    assert not allowed(again, OTHER)
    assert allowed(again, SLEEP)


def test_broken_deny_that_moved_its_selector_also_denies_the_new_workloads() -> None:
    before, _ = compile_policies([deny_other("web")])
    after, _ = compile_policies([broken(deny_other("db"))], before)
    assert not allowed(after, OTHER, WEB)
    assert allowed(after, SLEEP, WEB)
    assert not allowed(after, SLEEP, DB)


def test_broken_allow_fails_closed_over_its_old_and_new_workloads() -> None:
    before, _ = compile_policies([allow_other("web")])
    after, report = compile_policies([broken(allow_other("db"))], before)
    assert not allowed(after, SLEEP, WEB)  # dropping the old ALLOW would have opened web
    assert not allowed(after, SLEEP, DB)
    assert allowed(after, SLEEP, BAR)
    (r,) = report.rejected
    assert "deny-all" in r.fallback


def test_new_broken_allow_fails_closed() -> None:
    s, _ = compile_policies([broken(allow_other())])
    assert not allowed(s, SLEEP, WEB)
    assert allowed(s, SLEEP, DB)


def test_unreadable_selector_denies_the_namespace_and_from_the_root_the_mesh() -> None:
    doc = ap("p", selector={"matchLabels": "app=web"}, rules=[{}])
    s, _ = compile_policies([doc])
    assert not allowed(s, SLEEP, DB)
    assert allowed(s, SLEEP, BAR)
    root = ap("p", "istio-system", selector=["oops"], action="DENY", rules=[{}])
    s, _ = compile_policies([root])
    assert not allowed(s, SLEEP, BAR)


def test_fixing_the_document_lifts_the_deny_all() -> None:
    s, _ = compile_policies([broken(allow_other())])
    s, report = compile_policies([allow_other()], s)
    assert report.ok
    assert allowed(s, SLEEP)
    assert s.describe()["rejected"] == {}


def test_broken_peer_authentication_refuses_plaintext() -> None:
    before, _ = compile_policies([pa("default", "foo", "PERMISSIVE")])
    assert before.plaintext_allowed(WEB, 8080)
    bad = pa("default", "foo", "STRICTT")
    after, report = compile_policies([bad], before)
    assert not report.ok
    assert not after.plaintext_allowed(WEB, 8080)
    assert not allowed(after, None)
    assert allowed(after, SLEEP)
    assert after.plaintext_allowed(BAR, 8080)


# -- finding 2: nothing dropped silently ----------------------------------------------


def test_every_document_not_applied_is_listed() -> None:
    docs: list[object] = [
        ap("ok", rules=[{}]),
        [ap("wrapped", action="DENY", rules=[{}])],
        "text",
        broken(allow_other()),
        {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}},
    ]
    s, report = compile_policies(docs)
    assert report.loaded == ("AuthorizationPolicy foo/ok",)
    listed = {r.document for r in report.rejected} | {k.document for k in report.skipped}
    assert listed == {
        "document 1 (a list)",
        "document 2 (a string)",
        "AuthorizationPolicy foo/deny-other",
        "Widget default/w",
    }
    wrapped = next(r for r in report.rejected if r.document == "document 1 (a list)")
    assert "AuthorizationPolicy foo/wrapped" in " ".join(wrapped.reasons)
    # the list-wrapped DENY is not applied, and not ignored: its namespace fails closed
    assert not allowed(s, SLEEP, DB)


def test_policy_file_keeps_a_list_wrapped_document(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "- apiVersion: security.istio.io/v1\n"
        "  kind: AuthorizationPolicy\n"
        "  metadata: {name: deny, namespace: foo}\n"
        "  spec: {action: DENY, rules: [{}]}\n"
        "---\n"
        "apiVersion: security.istio.io/v1\n"
        "kind: AuthorizationPolicy\n"
        "metadata: {name: ok, namespace: foo}\n"
    )
    cfg = parse_config({"node": "n1", "policyFiles": ["p.yaml"]}, tmp_path)
    assert len(cfg.snapshot.policies) == 2
    _, report = compile_policies(cfg.snapshot.policies)
    assert [r.document for r in report.rejected] == ["document 0 (a list)"]


# -- finding 3: names as the API server validates them --------------------------------


@pytest.mark.parametrize(
    ("name", "namespace", "path"),
    [
        ("Web", "foo", "metadata.name"),
        ("web_1", "foo", "metadata.name"),
        ("-web", "foo", "metadata.name"),
        ("a" * 254, "foo", "metadata.name"),
        ("x" * (1 << 20), "foo", "metadata.name"),
        ("web", "foo.bar", "metadata.namespace"),
        ("web", "n" * 64, "metadata.namespace"),
        ("web", "Foo", "metadata.namespace"),
    ],
)
def test_names_validated_as_the_api_server_would(name: str, namespace: str, path: str) -> None:
    doc = ap(name, namespace, rules=[{}])
    with pytest.raises(PolicyError) as info:
        parse_authorization_policy(doc)
    assert any(e.path == path for e in info.value.all), [str(e) for e in info.value.all]
    _, report = compile_policies([doc])
    assert report.errors
    assert all(len(str(e)) <= LIMIT for e in report.errors)
    assert all(len(r.document) <= LIMIT for r in report.rejected)


def test_valid_names_pass() -> None:
    parse_authorization_policy(ap("a" * 253, "n" * 63, rules=[{}]))
    parse_authorization_policy(ap("web.v1-2", "foo-2", rules=[{}]))


# -- finding 4: wildcards Istio does not support ---------------------------------------


def test_inner_wildcard_principal_is_a_literal_with_a_note() -> None:
    # istiod's validation accepts any non-empty principal or namespace and its
    # stringToMatch takes an inner "*" literally; the node does the same, and says so.
    s, report = compile_policies(
        [ap("p", **web(rules=[{"from": [{"source": {"principals": ["cluster.local/*/sa/x"]}}]}]))]
    )
    assert report.ok
    (pol,) = s.authorization_policies
    assert any("'cluster.local/*/sa/x'" in n and "literal" in n for n in pol.notes), pol.notes
    s, _ = compile_policies(
        [ap("p", **web(rules=[{"from": [{"source": {"notNamespaces": ["*o*"]}}]}]))]
    )
    (pol,) = s.authorization_policies
    assert any("'*o*'" in n for n in pol.notes), pol.notes


def test_service_account_wildcard_rejected_as_istio_does() -> None:
    doc = ap("p", **web(rules=[{"from": [{"source": {"serviceAccounts": ["foo/*"]}}]}]))
    with pytest.raises(PolicyError, match="wildcard not allowed"):
        parse_authorization_policy(doc)


# -- finding 5: errors stay short -------------------------------------------------------


HUGE = "9" * (1 << 20)


@pytest.mark.parametrize(
    "spec",
    [
        {"action": HUGE},
        {"rules": [{"from": [{"source": {"ipBlocks": [HUGE]}}]}]},
        {"rules": [{"to": [{"operation": {"ports": [HUGE]}}]}]},
        {"rules": [{"when": [{"key": HUGE, "values": ["x"]}]}]},
        {"rules": [{"when": [{"key": "source.ip", "values": [HUGE]}]}]},
        {HUGE: 1},
        {"rules": HUGE},
        {"selector": {"matchLabels": {"app": [HUGE]}}},
    ],
)
def test_errors_never_echo_huge_values(spec: dict[str, Any]) -> None:
    doc = ap("p", **spec)
    with pytest.raises(PolicyError) as info:
        parse_authorization_policy(doc)
    for e in info.value.all:
        assert len(str(e)) <= LIMIT, str(e)[:200]
    doc["apiVersion"] = HUGE
    doc["kind"] = "AuthorizationPolicy"
    _, report = compile_policies([doc])
    for e in report.errors:
        assert len(str(e)) <= LIMIT, str(e)[:200]
