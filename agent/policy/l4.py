"""L4 authorization exactly as ztunnel enforces it at the destination node.

Users hand tether Istio ``AuthorizationPolicy`` and ``PeerAuthentication``
documents.  In Istio ambient, istiod translates them into a small L4 form
(istio/istio ``pilot/pkg/serviceregistry/kube/controller/ambient/authorization.go``,
``convertAuthorizationPolicy`` / ``handleRule``) and ztunnel evaluates that form
(istio/ztunnel ``src/rbac.rs`` ``Authorization::matches``; the allow/deny
order is ``DemandProxyState::assert_rbac`` in ``src/state.rs``).  This module
does both steps, so a policy means the same thing on a tether node as on a
ztunnel node, including where that meaning surprises users:

* Only ALLOW and DENY exist at L4.  AUDIT and CUSTOM are reported and not
  applied ("ztunnel does not support the CUSTOM action").  Policies attached
  with ``targetRef(s)`` belong to a waypoint and are not applied here.
* A rule is a list of clauses that are AND-ed: its ``to`` list, its ``from``
  list, and each ``when`` condition; the entries of one clause are OR-ed; the
  values of one field are OR-ed; ``not*`` fields must not match.
* An ALLOW rule that uses any L7 attribute (methods, paths, hosts, request
  principals, remote IP blocks, ``request.*`` / ``connection.sni`` conditions,
  ...) is dropped: it never matches.  An ALLOW policy left with no rule still
  counts as an ALLOW policy for its workloads, so it allows nothing.
* A DENY rule keeps its L4 part, BUT each ``from``/``to`` entry and each
  ``when`` condition becomes one L4 match, and ztunnel skips a match with no
  field set (``if mg.is_empty() { continue }``).  So a DENY clause that had
  only L7 content can never match, and the whole DENY rule then has no effect
  at the node: it fails open, not closed (istio/istio#61126, fixed only in the
  status message by istio/istio#61166).  tether does the same and says so in
  the policy's notes.
* Principals are compared without ``spiffe://`` and a plaintext peer has no
  principal and no namespace: positive principal/namespace matches never match
  it, negative ones always do.

PeerAuthentication STRICT is enforced the way istiod tells ztunnel to: as a
DENY of connections that carry no peer identity.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from agent.identity.spiffe import SpiffeId
from agent.policy.attach import selects, target_refs_text
from agent.policy.model import (
    DEFAULT_ROOT_NAMESPACE,
    Action,
    AuthorizationPolicy,
    Condition,
    Conn,
    Enforcement,
    IPAddress,
    IPNetwork,
    Rule,
    Scope,
    Source,
    WorkloadLike,
    clip,
    parse_ip_block,
)

_T = TypeVar("_T")


@dataclasses.dataclass(frozen=True)
class StringMatch:
    """Istio's string matcher: ``*`` = present, ``*x`` = suffix, ``x*`` = prefix, else exact."""

    kind: str  # "exact" | "prefix" | "suffix" | "presence"
    value: str = ""

    @classmethod
    def of(cls, text: str) -> StringMatch:
        # Same order as istiod's stringToMatch: a lone "*" first, then a leading
        # "*", then a trailing one; a "*" anywhere else is a literal character.
        if text == "*":
            return cls("presence")
        if text.startswith("*"):
            return cls("suffix", text[1:])
        if text.endswith("*"):
            return cls("prefix", text[:-1])
        return cls("exact", text)

    def matches(self, text: str) -> bool:
        if self.kind == "presence":
            return text != ""
        if self.kind == "prefix":
            return text.startswith(self.value)
        if self.kind == "suffix":
            return text.endswith(self.value)
        return text == self.value

    def to_dict(self) -> dict[str, str]:
        return {self.kind: self.value}


@dataclasses.dataclass(frozen=True)
class ServiceAccountMatch:
    """``serviceAccounts`` entry resolved against the policy namespace (istiod semantics)."""

    namespace: str
    service_account: str

    def matches(self, identity: SpiffeId | None) -> bool:
        return (
            identity is not None
            and identity.namespace == self.namespace
            and identity.service_account == self.service_account
        )


@dataclasses.dataclass(frozen=True)
class L4Match:
    """ztunnel's RbacMatch: all set fields must match (AND); values of a field are OR-ed."""

    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[IPNetwork, ...] = ()
    not_source_ips: tuple[IPNetwork, ...] = ()
    destination_ips: tuple[IPNetwork, ...] = ()
    not_destination_ips: tuple[IPNetwork, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()

    def is_empty(self) -> bool:
        return not any(getattr(self, f.name) for f in dataclasses.fields(self))

    def matches(self, conn: Conn) -> bool:
        identity = conn.src_principal
        # ztunnel: principals are matched against the SPIFFE ID with "spiffe://"
        # stripped, and a missing identity fails every positive principal match;
        # the namespace of a plaintext peer is "" (matches nothing positive).
        principal = identity.principal if identity is not None else None
        namespace = identity.namespace if identity is not None else ""

        def principal_ok(m: StringMatch) -> bool:
            return principal is not None and m.matches(principal)

        return (
            _field_ok(self.destination_ips, self.not_destination_ips, lambda n: _in(conn.dst_ip, n))
            and _field_ok(self.source_ips, self.not_source_ips, lambda n: _in(conn.src_ip, n))
            and _field_ok(
                self.destination_ports, self.not_destination_ports, lambda p: p == conn.dst_port
            )
            and _field_ok(
                self.service_accounts, self.not_service_accounts, lambda s: s.matches(identity)
            )
            and _field_ok(self.principals, self.not_principals, principal_ok)
            and _field_ok(self.namespaces, self.not_namespaces, lambda m: m.matches(namespace))
        )

    def to_dict(self) -> dict[str, Any]:
        """ztunnel's config_dump shape (camelCase, empty fields left out)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            values = getattr(self, f.name)
            if not values:
                continue
            name = _camel(f.name)
            if f.name.endswith("ips"):
                out[name] = [str(v) for v in values]
            elif f.name.endswith("ports"):
                out[name] = list(values)
            elif f.name.endswith("service_accounts"):
                out[name] = [
                    {"namespace": v.namespace, "serviceAccount": v.service_account} for v in values
                ]
            else:
                out[name] = [v.to_dict() for v in values]
        return out


def _camel(snake: str) -> str:
    head, *rest = snake.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _in(ip: IPAddress, net: IPNetwork) -> bool:
    # ipnet::IpNet::contains is false across address families; so is this.
    return ip.version == net.version and ip in net


def _field_ok(positive: Sequence[_T], negative: Sequence[_T], pred: Callable[[_T], bool]) -> bool:
    """ztunnel's matches_internal: any positive (if set) and no negative (if set)."""
    if positive and not any(pred(v) for v in positive):
        return False
    return not (negative and any(pred(v) for v in negative))


Clause = tuple[L4Match, ...]


@dataclasses.dataclass(frozen=True)
class L4Rule:
    """One kept rule: clauses AND-ed, matches within a clause OR-ed (ztunnel's Group)."""

    index: int
    clauses: tuple[Clause, ...]

    def matches(self, conn: Conn) -> bool:
        for clause in self.clauses:
            # As ztunnel: a clause without matches passes; an empty match (what istiod
            # sends for an entry that had only L7 fields) is skipped, never matched.
            if clause and not any(not m.is_empty() and m.matches(conn) for m in clause):
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.index, "clauses": [[m.to_dict() for m in c] for c in self.clauses]}


@dataclasses.dataclass(frozen=True)
class CompiledPolicy:
    """An AuthorizationPolicy as the node enforces it, with notes on what changed and why."""

    policy: AuthorizationPolicy
    scope: Scope
    enforcement: Enforcement
    rules: tuple[L4Rule, ...]
    notes: tuple[str, ...]
    root_namespace: str

    @property
    def key(self) -> str:
        return self.policy.key

    def applies_to(self, workload: WorkloadLike) -> bool:
        """istiod's selection: root-namespace policies reach every namespace; a selector
        picks pods by labels in the policy's namespace (or anywhere, from the root)."""
        if self.enforcement is not Enforcement.NODE:
            return False
        p = self.policy
        return selects(p.namespace, p.selector, self.root_namespace, workload)

    def first_match(self, conn: Conn) -> L4Rule | None:
        """The first rule that matches; a policy without rules matches nothing (ztunnel)."""
        for rule in self.rules:
            if rule.matches(conn):
                return rule
        return None


def _fields_text(names: Sequence[str]) -> str:
    unique = list(dict.fromkeys(names))
    word = "field" if len(unique) == 1 else "fields"
    return f"L7 {word} " + ", ".join(f"'{n}'" for n in unique)


def _sa_match(text: str, policy_namespace: str) -> ServiceAccountMatch:
    ns, sep, sa = text.partition("/")
    return ServiceAccountMatch(ns, sa) if sep else ServiceAccountMatch(policy_namespace, text)


def _ips(values: Sequence[str]) -> tuple[IPNetwork, ...]:
    out = []
    for v in values:
        net = parse_ip_block(v)
        if net is not None:
            out.append(net)
    return tuple(out)


def _source_match(src: Source, policy_namespace: str) -> L4Match:
    return L4Match(
        namespaces=tuple(StringMatch.of(v) for v in src.namespaces),
        not_namespaces=tuple(StringMatch.of(v) for v in src.not_namespaces),
        service_accounts=tuple(_sa_match(v, policy_namespace) for v in src.service_accounts),
        not_service_accounts=tuple(
            _sa_match(v, policy_namespace) for v in src.not_service_accounts
        ),
        principals=tuple(StringMatch.of(v) for v in src.principals),
        not_principals=tuple(StringMatch.of(v) for v in src.not_principals),
        source_ips=src.ip_blocks,
        not_source_ips=src.not_ip_blocks,
    )


def _condition_match(cond: Condition) -> L4Match:
    """istiod's whenMatch: an L4 key fills one field; any other key yields an empty match."""
    key, pos, neg = cond.key, cond.values, cond.not_values
    if key == "source.ip":
        return L4Match(source_ips=_ips(pos), not_source_ips=_ips(neg))
    if key == "destination.ip":
        return L4Match(destination_ips=_ips(pos), not_destination_ips=_ips(neg))
    if key == "destination.port":
        return L4Match(
            destination_ports=tuple(int(v) for v in pos),
            not_destination_ports=tuple(int(v) for v in neg),
        )
    if key == "source.namespace":
        return L4Match(
            namespaces=tuple(StringMatch.of(v) for v in pos),
            not_namespaces=tuple(StringMatch.of(v) for v in neg),
        )
    if key == "source.principal":
        return L4Match(
            principals=tuple(StringMatch.of(v) for v in pos),
            not_principals=tuple(StringMatch.of(v) for v in neg),
        )
    return L4Match()


def _principal_notes(index: int, rule: Rule) -> list[str]:
    """Catch principals written as URIs: Istio compares without the scheme, so they never match."""
    notes = []
    written: list[str] = []
    for src in rule.sources:
        written += src.principals + src.not_principals
    for cond in rule.conditions:
        if cond.key == "source.principal":
            written += cond.values + cond.not_values
    for value in dict.fromkeys(written):
        if value.startswith("spiffe://"):
            notes.append(
                f"rule {index}: principal {clip(value)} includes 'spiffe://'; Istio principals "
                f"are written without it ({clip(value[len('spiffe://') :])}), so this value "
                "never matches"
            )
    namespaces: list[str] = []
    for src in rule.sources:
        namespaces += src.namespaces + src.not_namespaces
    for cond in rule.conditions:
        if cond.key == "source.namespace":
            namespaces += cond.values + cond.not_values
    for value in dict.fromkeys(written + namespaces):
        if _inner_wildcard(value):
            # istiod's validation accepts any non-empty value here and its stringToMatch
            # takes such a '*' literally; so does the node, and it says so.
            notes.append(
                f"rule {index}: {clip(value)} has a '*' that is not a lone, leading or trailing "
                "wildcard; Istio supports only '*', 'prefix*' and '*suffix' and matches this "
                "'*' as a literal character, so the value matches only that exact text"
            )
    return notes


def _inner_wildcard(value: str) -> bool:
    """A '*' that StringMatch.of takes literally (anywhere but a lone/leading/trailing one)."""
    if value == "*" or "*" not in value:
        return False
    core = value[1:] if value.startswith("*") else value[:-1]
    return "*" in core


def _compile_rule(
    policy: AuthorizationPolicy, index: int, rule: Rule
) -> tuple[L4Rule | None, list[str]]:
    """istiod's handleRule followed by ztunnel's reading of the result."""
    notes = _principal_notes(index, rule)
    l7: list[str] = []
    clauses: list[tuple[str, Clause]] = []
    dead_entries: list[str] = []

    if rule.operations:
        matches = []
        for i, op in enumerate(rule.operations):
            l7 += op.l7_fields()
            m = L4Match(destination_ports=op.ports, not_destination_ports=op.not_ports)
            if m.is_empty():
                dead_entries.append(f"to[{i}]")
            matches.append(m)
        clauses.append(("to", tuple(matches)))
    if rule.sources:
        matches = []
        for i, src in enumerate(rule.sources):
            l7 += src.l7_fields()
            m = _source_match(src, policy.namespace)
            if m.is_empty():
                dead_entries.append(f"from[{i}]")
            matches.append(m)
        clauses.append(("from", tuple(matches)))
    for i, cond in enumerate(rule.conditions):
        if not cond.is_l4:
            l7.append(cond.key)
            dead_entries.append(f"when[{i}]")
        clauses.append((f"when[{i}] ({cond.key})", (_condition_match(cond),)))

    compiled = L4Rule(index, tuple(c for _, c in clauses))
    if not l7:
        return compiled, notes

    fields = _fields_text(l7)
    if policy.action is Action.ALLOW:
        # handleRule: "L7 policies never match for ALLOW" -> the rule is omitted.
        notes.append(
            f"rule {index}: ALLOW rule uses {fields}; it never matches at L4 (ztunnel "
            "semantics); attach the policy to a waypoint"
        )
        return None, notes

    dead_clauses = [name for name, c in clauses if all(m.is_empty() for m in c)]
    if dead_clauses:
        notes.append(
            f"rule {index}: DENY rule uses {fields} and its {', '.join(dead_clauses)} has "
            "nothing left to match at L4; ztunnel never matches such a rule, so this DENY "
            "rule has NO effect at the node (istio/istio#61126); attach the policy to a "
            "waypoint"
        )
    else:
        ignored = [e for e in dead_entries if not e.startswith("when")]
        extra = f"; {', '.join(ignored)} had only L7 fields and never match" if ignored else ""
        notes.append(
            f"rule {index}: DENY rule uses {fields}; enforced at L4 without them (ztunnel "
            f"semantics), so it denies more than written{extra}; attach the policy to a "
            "waypoint for the exact rule"
        )
    return compiled, notes


def compile_policy(
    policy: AuthorizationPolicy, root_namespace: str = DEFAULT_ROOT_NAMESPACE
) -> CompiledPolicy:
    """Turn a parsed policy into what the node enforces (istiod's convertAuthorizationPolicy)."""
    if policy.selector is not None:
        scope = Scope.WORKLOAD
    elif policy.namespace == root_namespace:
        scope = Scope.MESH
    else:
        scope = Scope.NAMESPACE

    if policy.target_refs:
        refs = target_refs_text(policy.target_refs, policy.namespace)
        note = (
            f"for a waypoint: attached with targetRefs to {refs}; the node does not enforce "
            "it at L4 (ztunnel ignores targetRef policies)"
        )
        return CompiledPolicy(policy, scope, Enforcement.WAYPOINT, (), (note,), root_namespace)
    if policy.action in (Action.AUDIT, Action.CUSTOM):
        note = (
            f"action {policy.action.value} is not enforceable at L4: ztunnel supports only "
            f"ALLOW and DENY ('ztunnel does not support the {policy.action.value} action'); "
            "policy not applied; attach it to a waypoint with targetRefs"
        )
        return CompiledPolicy(policy, scope, Enforcement.NONE, (), (note,), root_namespace)

    rules: list[L4Rule] = []
    notes: list[str] = []
    if policy.selector == ():
        root = policy.namespace == root_namespace
        where = "every namespace (root namespace)" if root else f"namespace {policy.namespace}"
        notes.append(f"selector without labels: selects every workload in {where}")
    for index, rule in enumerate(policy.rules):
        compiled, rule_notes = _compile_rule(policy, index, rule)
        notes += rule_notes
        if compiled is not None:
            rules.append(compiled)

    if policy.action is Action.ALLOW and not policy.rules:
        notes.append(
            "no rules: allow-nothing policy; every connection to the selected workloads is "
            "denied unless another ALLOW policy matches it (Istio: an empty spec denies all)"
        )
    elif policy.action is Action.ALLOW and not rules:
        notes.append(
            "no rule can match at L4: at the node this ALLOW policy allows nothing, so "
            "connections to the selected workloads are denied unless another ALLOW policy "
            "matches"
        )
    elif policy.action is Action.DENY and not any(_can_match(r) for r in rules):
        notes.append("no rule can match at L4: this DENY policy has no effect at the node")
    return CompiledPolicy(
        policy, scope, Enforcement.NODE, tuple(rules), tuple(notes), root_namespace
    )


def _can_match(rule: L4Rule) -> bool:
    return all(not c or any(not m.is_empty() for m in c) for c in rule.clauses)
