"""From a list of documents to a PolicySet: ``compile_policies``, a pure function.

One bad document never stops the others: valid policies take effect, invalid
ones are reported with their field path, other kinds are skipped with a hint.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from agent.policy.hints import get_str, unhandled_reason
from agent.policy.l4 import CompiledPolicy, compile_policy
from agent.policy.model import (
    AUTHORIZATION_POLICY,
    DEFAULT_ROOT_NAMESPACE,
    PEER_AUTHENTICATION,
    SECURITY_GROUP,
    PeerAuthentication,
    PolicyError,
)
from agent.policy.parse import (
    document_label,
    metadata,
    parse_authorization_policy,
    parse_peer_authentication,
    type_name,
)
from agent.policy.policyset import PolicySet


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A document of a kind this package does not handle, and what to use instead."""

    document: str
    reason: str


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What one compilation did: which policies are in force, which were refused, which skipped."""

    loaded: tuple[str, ...] = ()
    errors: tuple[PolicyError, ...] = ()
    skipped: tuple[Skipped, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "loaded": list(self.loaded),
            "errors": [str(e) for e in self.errors],
            "skipped": [{"document": s.document, "reason": s.reason} for s in self.skipped],
        }


def _is_security_kind(doc: Mapping[str, object], kind: str) -> bool:
    api = get_str(doc, "apiVersion")
    return doc.get("kind") == kind and (api == "" or api.split("/")[0] == SECURITY_GROUP)


def compile_policies(
    docs: Iterable[object],
    previous: PolicySet | None = None,
    *,
    root_namespace: str | None = None,
    default_namespace: str = "default",
) -> tuple[PolicySet, LoadReport]:
    """Build the PolicySet for the full list ``docs`` (the whole desired state, not a delta).

    ``previous`` is the set in force: an invalid document keeps its last good version.
    ``root_namespace`` defaults to the previous set's, else Istio's ``istio-system``.
    """
    if root_namespace is None:
        root_namespace = previous.root_namespace if previous else DEFAULT_ROOT_NAMESPACE
    old_authz = {p.key: p for p in previous.authorization_policies} if previous else {}
    old_peer = {p.key: p for p in previous.peer_authentications} if previous else {}
    authz: dict[str, CompiledPolicy] = {}
    peer: dict[str, PeerAuthentication] = {}
    rejected: dict[str, tuple[str, ...]] = {}
    skipped_now: dict[str, str] = {}
    loaded: list[str] = []
    errors: list[PolicyError] = []
    skipped: list[Skipped] = []
    for index, doc in enumerate(docs):
        if doc is None:  # an empty YAML document ("---" with nothing after it)
            continue
        label = document_label(doc, default_namespace)
        if not isinstance(doc, Mapping):
            kind = type_name(doc)
            errors.append(PolicyError(f"document {index}", "", f"expected a mapping, got {kind}"))
            continue
        try:
            if _is_security_kind(doc, AUTHORIZATION_POLICY):
                ap = parse_authorization_policy(doc, default_namespace=default_namespace)
                authz[ap.key] = compile_policy(ap, root_namespace)
            elif _is_security_kind(doc, PEER_AUTHENTICATION):
                pa = parse_peer_authentication(doc, default_namespace=default_namespace)
                peer[pa.key] = pa
            else:
                _, ns, _ = metadata(doc, default_namespace)
                reason = unhandled_reason(doc, ns)
                skipped.append(Skipped(label, reason))
                skipped_now[label] = reason
                continue
        except PolicyError as exc:
            errors.extend(exc.all)
            rejected[label] = tuple(str(e) for e in exc.all)
            # An invalid edit keeps the last good version in force: dropping
            # it would fail open (a typo in a DENY policy would remove it).
            name, ns, _ = metadata(doc, default_namespace)
            key = f"{ns}/{name}"
            if _is_security_kind(doc, AUTHORIZATION_POLICY) and key in old_authz:
                authz[key] = old_authz[key]
            elif _is_security_kind(doc, PEER_AUTHENTICATION) and key in old_peer:
                peer[key] = old_peer[key]
            continue
        rejected.pop(label, None)
        loaded.append(label)
    policy_set = PolicySet(
        root_namespace=root_namespace,
        authorization_policies=tuple(authz[k] for k in sorted(authz)),
        peer_authentications=tuple(peer[k] for k in sorted(peer)),
        rejected=tuple(sorted(rejected.items())),
        skipped=tuple(sorted(skipped_now.items())),
    )
    return policy_set, LoadReport(tuple(loaded), tuple(errors), tuple(skipped))
