"""Fuzz target: the Istio security policy parsers (AuthorizationPolicy,
PeerAuthentication) and the policy store that loads them.

Input is either YAML text (as `kubectl apply -f` or a local policy file gives
it) or a structured random document (as the Kubernetes API gives it: JSON, so
a tree).  parse_authorization_policy / parse_peer_authentication must return
their dataclass or raise PolicyError; compile_policies must never raise (it
reports bad documents) and the PolicySet must then evaluate a connection
without raising.

    python -m tests.fuzz.fuzz_policy -runs=100000 tests/fuzz/corpus/policy
"""

from __future__ import annotations

import sys
from typing import Any

import atheris
import yaml

with atheris.instrument_imports():
    # The one place the module under test is named.
    from agent.policy import (
        AuthorizationPolicy,
        Conn,
        LoadReport,
        PeerAuthentication,
        PolicyError,
        PolicySet,
        WorkloadRef,
        compile_policies,
        parse_authorization_policy,
        parse_peer_authentication,
    )

from tests.fuzz._common import FAST_LOADER, STRUCTURED, check, pick, text, value

KEYS = (
    "apiVersion",
    "kind",
    "metadata",
    "name",
    "namespace",
    "creationTimestamp",
    "spec",
    "selector",
    "matchLabels",
    "targetRef",
    "targetRefs",
    "group",
    "action",
    "provider",
    "rules",
    "from",
    "to",
    "when",
    "source",
    "operation",
    "principals",
    "notPrincipals",
    "requestPrincipals",
    "namespaces",
    "notNamespaces",
    "ipBlocks",
    "notIpBlocks",
    "remoteIpBlocks",
    "ports",
    "notPorts",
    "hosts",
    "methods",
    "paths",
    "key",
    "values",
    "notValues",
    "mtls",
    "mode",
    "portLevelMtls",
    "8080",
    "app",
    "labels",
)
STRINGS = (
    "security.istio.io/v1",
    "security.istio.io/v1beta1",
    "networking.istio.io/v1",
    "AuthorizationPolicy",
    "PeerAuthentication",
    "RequestAuthentication",
    "TrafficTarget",
    "ServiceIntentions",
    "ALLOW",
    "DENY",
    "AUDIT",
    "CUSTOM",
    "STRICT",
    "PERMISSIVE",
    "DISABLE",
    "UNSET",
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
    "request.headers[x]",
    "connection.sni",
    "experimental.envoy.filters.x",
    "2024-01-01T00:00:00Z",
    "GET",
    "/api/*",
    "Gateway",
    "gateway.networking.k8s.io",
)
KINDS = ("AuthorizationPolicy", "PeerAuthentication", "Other")
API_VERSIONS = ("security.istio.io/v1", "security.istio.io/v1beta1", "", "v1")
DST = (
    WorkloadRef("default", {"app": "web"}),
    WorkloadRef("istio-system", {}),
    WorkloadRef("foo", {"app": "db", "version": "v1"}),
)


def _document(fdp: atheris.FuzzedDataProvider) -> Any:
    if fdp.ConsumeProbability() < 0.1:
        return value(fdp, KEYS, STRINGS)
    doc: dict[Any, Any] = {
        "apiVersion": pick(fdp, API_VERSIONS),
        "kind": pick(fdp, KINDS),
        "metadata": value(fdp, KEYS, STRINGS, 3)
        if fdp.ConsumeProbability() < 0.3
        else {"name": text(fdp, ("web", "a")), "namespace": text(fdp, ("default", "foo"))},
        "spec": value(fdp, KEYS, STRINGS, 1) if fdp.ConsumeProbability() < 0.2 else {},
    }
    spec = doc["spec"]
    if isinstance(spec, dict):
        for _ in range(fdp.ConsumeIntInRange(0, 4)):
            spec[text(fdp, KEYS)] = value(fdp, KEYS, STRINGS, 1)
    return doc


def documents_from_yaml(data: bytes) -> list[Any] | None:
    """The documents of YAML text, or None if the YAML itself does not load
    (the YAML library is not under test here; the local file target is)."""
    try:
        return list(yaml.load_all(data.decode("utf-8", "replace"), Loader=FAST_LOADER))
    except Exception:
        return None


def _parse_one(doc: Any) -> None:
    if not isinstance(doc, dict):
        return
    for parser, kind in (
        (parse_authorization_policy, AuthorizationPolicy),
        (parse_peer_authentication, PeerAuthentication),
    ):
        try:
            result = parser(doc)
        except PolicyError as e:
            check(all(isinstance(x, PolicyError) for x in e.all), "PolicyError.all")
            check(str(e), "PolicyError with no message")
            continue
        check(isinstance(result, kind), f"{parser.__name__} returned {type(result)}")
        check(
            isinstance(result.name, str) and isinstance(result.namespace, str),
            f"{parser.__name__}: name/namespace {result.name!r}/{result.namespace!r}",
        )


def TestOneInput(data: bytes) -> None:
    if data[:1] == STRUCTURED:
        fdp = atheris.FuzzedDataProvider(data[1:])
        port = fdp.ConsumeIntInRange(0, 65535)
        principal = pick(fdp, ("cluster.local/ns/default/sa/web", None, "td/ns/foo/sa/b"))
        dst = pick(fdp, DST)
        docs: list[Any] | None = [_document(fdp) for _ in range(fdp.ConsumeIntInRange(1, 3))]
    else:
        port, principal, dst = 8080, "cluster.local/ns/default/sa/web", DST[0]
        docs = documents_from_yaml(data)
    if docs is None:
        return
    for doc in docs:
        _parse_one(doc)
    pset, report = compile_policies(docs)
    check(isinstance(pset, PolicySet), f"compile returned {type(pset)}")
    check(isinstance(report, LoadReport), f"compile reported {type(report)}")
    check(all(isinstance(e, PolicyError) for e in report.errors), "load: errors not PolicyError")
    check(all(isinstance(x, str) for x in report.loaded), "load: loaded not str")
    report.to_dict()
    again, _ = compile_policies(docs, pset)  # a second load against the first
    for s in (pset, again):
        for p in (principal, None):
            s.evaluate(Conn.make("10.0.0.2", p, "10.0.0.1", port, dst))
        s.describe()


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
