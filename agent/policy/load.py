"""From documents to a PolicySet: ``compile_policies``, a pure function that cannot fail open.

Every document not applied is reported (``LoadReport.rejected`` / ``skipped``)
with its reason; nothing is dropped silently.  A *broken key* is a policy
(kind, namespace, name) that is invalid in this load or appears more than once
in it (every copy is then an error: which copy the author meant is unknown).
What the node enforces for a broken key:

* The previous load's last good version of a **DENY** policy stays in force.  A
  DENY only ever takes access away, so keeping it can never allow a connection
  that dropping it would refuse; it is what the operator last validated, and an
  Istio cluster behaves the same (the API server refuses the invalid edit, the
  stored object stays).  If the broken document reaches workloads the old DENY
  did not (another selector, or one that cannot be read), those get a deny-all
  as below: the edit meant to restrict them and we cannot read how.
* Otherwise the workloads the broken document could reach get a **deny-all**:
  its selector if readable, else its whole namespace, or the mesh for the root
  namespace or an unreadable namespace; plus the workloads the last good
  version reached.  A last good **ALLOW** is not kept: an ALLOW grants access,
  and the broken edit may be the revocation of a grant (the urgent edit is
  usually "remove this principal"); keeping it would silently keep the grant.
  Simply dropping it is worse: if it was the only ALLOW policy of a workload,
  the workload falls back to allow-all.  The deny-all keeps everything the
  ALLOW kept out, out, at the price of refusing what it let in: an outage that
  names the document and the fix, instead of a silent opening.
* A broken **PeerAuthentication** makes its reach (and its last good version's)
  STRICT: plaintext is refused, mTLS is evaluated as usual.  STRICT is the
  strictest thing a PeerAuthentication can say.
* A document the node would never enforce whatever its content (readable
  ``targetRefs`` without a selector: a waypoint's; readable action AUDIT or
  CUSTOM) gets no deny-all: it is reported only.

The stand-ins last until the document is fixed or deleted; /config_dump lists
them under ``failClosed`` and each denied connection's reason names the document.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from agent.policy.attach import Reach
from agent.policy.hints import get_str, unhandled_reason
from agent.policy.l4 import CompiledPolicy, compile_policy
from agent.policy.model import (
    AUTHORIZATION_POLICY,
    DEFAULT_ROOT_NAMESPACE,
    PEER_AUTHENTICATION,
    SECURITY_GROUP,
    Action,
    Enforcement,
    PeerAuthentication,
    PolicyError,
    clip_text,
)
from agent.policy.parse import (
    _Checker,
    dns1123_problem,
    document_label,
    metadata,
    parse_authorization_policy,
    parse_peer_authentication,
    type_name,
)
from agent.policy.policyset import Guard, PolicySet

Parsed = CompiledPolicy | PeerAuthentication


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A document of a kind this package does not handle, and what to use instead."""

    document: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Rejected:
    """A document that is not applied: every reason, and what the node enforces instead."""

    document: str
    reasons: tuple[str, ...]
    fallback: str


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What one compilation did: which policies are in force, which were refused, which skipped."""

    loaded: tuple[str, ...] = ()
    errors: tuple[PolicyError, ...] = ()
    skipped: tuple[Skipped, ...] = ()
    rejected: tuple[Rejected, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "loaded": list(self.loaded),
            "errors": [str(e) for e in self.errors],
            "skipped": [{"document": s.document, "reason": s.reason} for s in self.skipped],
            "rejected": [
                {"document": r.document, "reasons": list(r.reasons), "fallback": r.fallback}
                for r in self.rejected
            ],
        }


@dataclasses.dataclass
class _Entry:
    """One AuthorizationPolicy or PeerAuthentication document of this load."""

    index: int
    label: str
    kind: str
    key: str | None  # None when the name or namespace is unusable
    reach: Reach | None  # what it could reach at the node; None: never enforced here
    parsed: Parsed | None
    errors: list[PolicyError]


def _is_security_kind(doc: Mapping[str, object], kind: str) -> bool:
    api = get_str(doc, "apiVersion")
    return doc.get("kind") == kind and (api == "" or api.split("/")[0] == SECURITY_GROUP)


def _security_kind(doc: Mapping[str, object]) -> str | None:
    for kind in (AUTHORIZATION_POLICY, PEER_AUTHENTICATION):
        if _is_security_kind(doc, kind):
            return kind
    return None


def _readable_namespace(doc: Mapping[str, object], default_namespace: str) -> str | None:
    meta = doc.get("metadata")
    raw = meta.get("namespace") if isinstance(meta, Mapping) else None
    if raw is None:
        return default_namespace
    if isinstance(raw, str) and raw and dns1123_problem(raw, subdomain=False) is None:
        return raw
    return None


def _key(doc: Mapping[str, object], default_namespace: str) -> str | None:
    name, _, _ = metadata(doc, default_namespace)
    ns = _readable_namespace(doc, default_namespace)
    if ns is None or name == "<unnamed>" or dns1123_problem(name, subdomain=True):
        return None
    return f"{ns}/{name}"


def _parsed_reach(parsed: Parsed) -> Reach | None:
    if isinstance(parsed, PeerAuthentication):
        return Reach(parsed.namespace, parsed.selector if parsed.is_workload_level else None)
    if parsed.enforcement is not Enforcement.NODE:
        return None
    return Reach(parsed.policy.namespace, parsed.policy.selector)


def _raw_reach(doc: Mapping[str, object], kind: str, default_ns: str, root: str) -> Reach | None:
    """What a document that did not parse could reach, read as far as it can be read;
    when unsure, more rather than less."""
    ns = _readable_namespace(doc, default_ns)
    if ns is None:
        return Reach(root)
    spec = doc.get("spec")
    if spec is None:
        return Reach(ns)
    if not isinstance(spec, Mapping):
        return Reach(ns)
    if kind == AUTHORIZATION_POLICY:
        if spec.get("action") in (Action.AUDIT.value, Action.CUSTOM.value):
            return None
        refs = spec.get("targetRefs") or spec.get("targetRef")
        readable_refs = isinstance(refs, Mapping) or (
            isinstance(refs, list) and all(isinstance(r, Mapping) for r in refs)
        )
        if refs and readable_refs and "selector" not in spec:
            return None
    raw = spec.get("selector")
    if raw is None:
        return Reach(ns)
    checker = _Checker("")
    selector = checker.selector(raw, "spec.selector")
    if checker.errors:
        return Reach(ns)
    return Reach(ns, selector)


def _last_good(previous: PolicySet | None, kind: str, key: str) -> Parsed | None:
    """The version of ``key`` the previous set enforced or remembered."""
    if previous is None:
        return None
    for guard in previous.guards:
        if guard.kind == kind and guard.key == key and guard.last_good is not None:
            return guard.last_good
    table: Iterable[Parsed] = (
        previous.authorization_policies
        if kind == AUTHORIZATION_POLICY
        else previous.peer_authentications
    )
    for p in table:
        if p.key == key:
            return p
    return None


def _describe_reaches(reaches: Iterable[Reach], root: str) -> str:
    return "; ".join(r.describe(root) for r in reaches)


def compile_policies(
    docs: Iterable[object],
    previous: PolicySet | None = None,
    *,
    root_namespace: str | None = None,
    default_namespace: str = "default",
) -> tuple[PolicySet, LoadReport]:
    """Build the PolicySet for the full list ``docs`` (the whole desired state, not a delta).

    ``previous`` is the set in force; it supplies last good versions for broken keys
    (module docstring).  ``root_namespace`` defaults to the previous set's, else Istio's
    ``istio-system``.  Pure: ``previous`` is not modified, so this may run in a thread
    while the event loop keeps reading the set in force.
    """
    root = root_namespace or (previous.root_namespace if previous else DEFAULT_ROOT_NAMESPACE)
    entries: list[_Entry] = []
    errors: list[PolicyError] = []
    skipped: list[Skipped] = []
    rejected: list[Rejected] = []
    for index, doc in enumerate(docs):
        if doc is None:  # an empty YAML document ("---" with nothing after it)
            continue
        if not isinstance(doc, Mapping):
            label = f"document {index} ({type_name(doc)})"
            message = f"expected a mapping, got {type_name(doc)}"
            inner = [d for d in doc if isinstance(d, Mapping)] if isinstance(doc, list) else []
            wrapped = [d for d in inner if _security_kind(d) is not None]
            if inner:
                names = ", ".join(document_label(d, default_namespace) for d in inner[:3])
                more = f" and {len(inner) - 3} more" if len(inner) > 3 else ""
                message += f" (a list holding {names}{more}: remove the leading '- '); not applied"
            err = PolicyError(f"document {index}", "", message)
            errors.append(err)
            for d in wrapped:
                kind = _security_kind(d) or AUTHORIZATION_POLICY
                reach = _raw_reach(d, kind, default_namespace, root)
                entries.append(_Entry(index, label, kind, None, reach, None, [err]))
            if not wrapped:
                rejected.append(Rejected(label, (str(err),), "nothing: not a policy document"))
            continue
        label = document_label(doc, default_namespace)
        kind_or_none = _security_kind(doc)
        if kind_or_none is None:
            _, ns, _ = metadata(doc, default_namespace)
            skipped.append(Skipped(label, unhandled_reason(doc, clip_text(ns))))
            continue
        kind = kind_or_none
        parsed: Parsed | None = None
        errs: list[PolicyError] = []
        try:
            if kind == AUTHORIZATION_POLICY:
                ap = parse_authorization_policy(doc, default_namespace=default_namespace)
                parsed = compile_policy(ap, root)
            else:
                parsed = parse_peer_authentication(doc, default_namespace=default_namespace)
        except PolicyError as exc:
            errs = list(exc.all)
        reach = (
            _parsed_reach(parsed)
            if parsed is not None
            else _raw_reach(doc, kind, default_namespace, root)
        )
        key = _key(doc, default_namespace)
        entries.append(_Entry(index, label, kind, key, reach, parsed, errs))

    # Group copies of one key; a document without a usable key stands alone.
    groups: dict[tuple[str, str], list[_Entry]] = {}
    for n, e in enumerate(entries):
        groups.setdefault((e.kind, e.key if e.key is not None else f"#{n}"), []).append(e)

    authz: dict[str, CompiledPolicy] = {}
    peer: dict[str, PeerAuthentication] = {}
    guards: list[Guard] = []
    loaded: list[str] = []
    seen_wrapped: set[str] = set()
    for (kind, _), group in groups.items():
        key = group[0].key
        if len(group) > 1:
            where = ", ".join(str(e.index) for e in group)
            for e in group:
                e.errors.append(
                    PolicyError(
                        e.label,
                        "",
                        f"duplicate: {len(group)} documents in this load are {kind} {key} "
                        f"(documents {where}); none of them is applied: keep exactly one",
                    )
                )
        only = group[0]
        if len(group) == 1 and only.parsed is not None and not only.errors:
            if isinstance(only.parsed, PeerAuthentication):
                peer[only.parsed.key] = only.parsed
            else:
                authz[only.parsed.key] = only.parsed
            loaded.append(only.label)
            continue

        # A broken key: choose what stands in for it (module docstring).
        label = only.label
        name = f"{kind} {clip_text(key)}" if key is not None else label
        err0 = only.errors[0] if only.errors else PolicyError(label, "", "invalid")
        first = clip_text(f"{err0.path}: {err0.message}" if err0.path else err0.message, 160)
        good = _last_good(previous, kind, key) if key is not None else None
        reaches = list(dict.fromkeys(e.reach for e in group if e.reach is not None))
        kept = False
        if (
            isinstance(good, CompiledPolicy)
            and good.enforcement is Enforcement.NODE
            and good.policy.action is Action.DENY
        ):
            authz[good.key] = good
            kept = True
            reaches = [r for r in reaches if r != _parsed_reach(good)]
        elif good is not None:
            old = _parsed_reach(good)
            if old is not None and old not in reaches:
                reaches.append(old)
        fix = "fix the document or delete it"
        if kind == AUTHORIZATION_POLICY:
            effect = f"every connection to {_describe_reaches(reaches, root)} is denied (deny-all)"
        else:
            effect = (
                f"plaintext to {_describe_reaches(reaches, root)} is refused (treated as STRICT)"
            )
        fallback_parts = []
        if kept:
            fallback_parts.append("its last good version (DENY) stays in force")
        if reaches:
            fallback_parts.append(effect)
            guards.append(
                Guard(
                    kind=kind,
                    key=key if key is not None else label,
                    document=name,
                    reaches=tuple(reaches),
                    reason=f"{name} could not be applied ({first}); {effect} until then: {fix}",
                    last_good=good,
                )
            )
        if not fallback_parts:
            fallback_parts.append("nothing: the node would not enforce this document")
        fallback = "; ".join(fallback_parts)
        for e in group:
            if e.key is None and e.label.startswith("document "):
                # list-wrapped: report the list once, whatever it holds
                if e.label in seen_wrapped:
                    continue
                seen_wrapped.add(e.label)
            else:
                errors.extend(e.errors)
            rejected.append(Rejected(e.label, tuple(str(x) for x in e.errors), fallback))

    rejected_by_label: dict[str, list[str]] = {}
    for r in rejected:
        rejected_by_label.setdefault(r.document, []).extend(r.reasons)
    policy_set = PolicySet(
        root_namespace=root,
        authorization_policies=tuple(authz[k] for k in sorted(authz)),
        peer_authentications=tuple(peer[k] for k in sorted(peer)),
        rejected=tuple((k, tuple(v)) for k, v in sorted(rejected_by_label.items())),
        skipped=tuple(sorted({s.document: s.reason for s in skipped}.items())),
        guards=tuple(guards),
    )
    report = LoadReport(tuple(loaded), tuple(errors), tuple(skipped), tuple(rejected))
    return policy_set, report
