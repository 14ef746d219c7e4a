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
import datetime
import enum
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId, SpiffeIdError

DEFAULT_ROOT_NAMESPACE = "istio-system"
SECURITY_GROUP = "security.istio.io"
SECURITY_VERSIONS = ("v1", "v1beta1")
AUTHORIZATION_POLICY = "AuthorizationPolicy"
PEER_AUTHENTICATION = "PeerAuthentication"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_T = TypeVar("_T")

# istiod's l4WhenAttributes: the only `when` keys ztunnel can see.
L4_WHEN_KEYS = (
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
)
_WHEN_IP_KEYS = ("source.ip", "destination.ip", "remote.ip")
# Keys Istio accepts that need a proxy which parses the request (or the TLS
# ClientHello): valid policy, but a waypoint's business.
_L7_WHEN_KEYS = (
    "remote.ip",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "connection.sni",
)
_L7_WHEN_MAP_PREFIXES = ("request.headers", "request.auth.claims", "experimental.envoy.filters.")

_SOURCE_FIELDS = (
    "principals",
    "notPrincipals",
    "requestPrincipals",
    "notRequestPrincipals",
    "namespaces",
    "notNamespaces",
    "serviceAccounts",
    "notServiceAccounts",
    "ipBlocks",
    "notIpBlocks",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
)
# istiod's httpSources: source fields ztunnel cannot evaluate.  remoteIpBlocks
# is the original client address from X-Forwarded-For or PROXY protocol, which
# only an HTTP proxy sees; it is not the peer address (that is ipBlocks).
_L7_SOURCE_FIELDS = (
    "requestPrincipals",
    "notRequestPrincipals",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
)
_OPERATION_FIELDS = (
    "ports",
    "notPorts",
    "hosts",
    "notHosts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
)
_L7_OPERATION_FIELDS = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")


class Action(enum.Enum):
    """AuthorizationPolicy.action; the node enforces ALLOW and DENY only."""

    ALLOW = "ALLOW"
    DENY = "DENY"
    AUDIT = "AUDIT"
    CUSTOM = "CUSTOM"


class Mode(enum.Enum):
    """PeerAuthentication mTLS mode; UNSET inherits from the level above."""

    UNSET = "UNSET"
    DISABLE = "DISABLE"
    PERMISSIVE = "PERMISSIVE"
    STRICT = "STRICT"


class Scope(enum.Enum):
    """Which workloads a policy reaches (istiod's GLOBAL / NAMESPACE / WORKLOAD_SELECTOR)."""

    MESH = "mesh"
    NAMESPACE = "namespace"
    WORKLOAD = "workload"


class Enforcement(enum.Enum):
    """Who enforces a policy: this node, a waypoint, or nobody in ambient mode."""

    NODE = "node"
    WAYPOINT = "waypoint"
    NONE = "none"


class PolicyError(ValueError):
    """A document is invalid; names the document and the field path, e.g.
    ``AuthorizationPolicy default/foo: spec.rules[0].from[0].source.ipBlocks[1]: '10.0.0/8'
    is not an IP or CIDR``.  ``all`` holds every error found in the same document, so
    one bad field never hides another."""

    def __init__(
        self,
        document: str,
        path: str,
        message: str,
        others: Sequence[PolicyError] = (),
    ) -> None:
        self.document = document
        self.path = path
        self.message = message
        self.others = tuple(others)
        text = f"{document}: {path}: {message}" if path else f"{document}: {message}"
        super().__init__(text)

    @property
    def all(self) -> tuple[PolicyError, ...]:
        return (self, *self.others)


class WorkloadLike(Protocol):
    """What policy selection needs from a destination workload (``agent.config.Workload`` fits)."""

    @property
    def namespace(self) -> str: ...

    @property
    def labels(self) -> Mapping[str, str]: ...


@dataclasses.dataclass(frozen=True)
class WorkloadRef:
    """A minimal workload for callers that have no richer type at hand (tests, admin)."""

    namespace: str
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)
    name: str = ""


def _canonical_ip(value: IPAddress | str) -> IPAddress:
    """Parse an address and fold IPv4-mapped IPv6 to IPv4: dual-stack sockets see IPv4
    peers as ``::ffff:a.b.c.d``, and ztunnel folds them too (``socket::to_canonical``)."""
    ip = ipaddress.ip_address(value) if isinstance(value, str) else value
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _parse_identity(value: SpiffeId | str) -> SpiffeId:
    if isinstance(value, SpiffeId):
        return value
    if value.startswith("spiffe://"):
        return SpiffeId.parse(value)
    return SpiffeId.parse_principal(value)


@dataclasses.dataclass(frozen=True)
class Conn:
    """One inbound connection as the destination node sees it.

    ``src_principal`` is the verified peer identity (None for plaintext); the source
    namespace comes from it, because at L4 nothing else is trustworthy.  Strings are
    accepted for addresses and the principal (URI or Istio principal form).
    """

    src_ip: IPAddress
    src_principal: SpiffeId | None
    src_namespace: str | None
    dst_ip: IPAddress
    dst_port: int
    dst: WorkloadLike

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "src_ip", _canonical_ip(self.src_ip))
        set_(self, "dst_ip", _canonical_ip(self.dst_ip))
        if self.src_principal is not None:
            set_(self, "src_principal", _parse_identity(self.src_principal))
        if isinstance(self.dst_port, bool) or not 0 <= self.dst_port <= 65535:
            raise ValueError(f"dst_port {self.dst_port!r} is not a port number (0-65535)")
        identity = self.src_principal
        if identity is None:
            if self.src_namespace is not None:
                raise ValueError(
                    "src_namespace given for a plaintext connection: at L4 the source "
                    "namespace comes only from the peer certificate"
                )
        elif self.src_namespace is None:
            set_(self, "src_namespace", identity.namespace)
        elif self.src_namespace != identity.namespace:
            raise ValueError(
                f"src_namespace {self.src_namespace!r} contradicts the peer identity "
                f"{identity.uri!r}"
            )

    @classmethod
    def make(
        cls,
        src_ip: IPAddress | str,
        src_principal: SpiffeId | str | None,
        dst_ip: IPAddress | str,
        dst_port: int,
        dst: WorkloadLike,
        src_namespace: str | None = None,
    ) -> Conn:
        """Build a Conn from strings (typed callers and tests)."""
        return cls(
            src_ip=_canonical_ip(src_ip),
            src_principal=None if src_principal is None else _parse_identity(src_principal),
            src_namespace=src_namespace,
            dst_ip=_canonical_ip(dst_ip),
            dst_port=dst_port,
            dst=dst,
        )


@dataclasses.dataclass(frozen=True)
class Decision:
    """The verdict for one connection.

    ``policy`` is ``namespace/name`` of the policy that decided: the matching DENY
    policy, the PeerAuthentication that made the port STRICT, the matching ALLOW
    policy, or, when no ALLOW policy matched, the ALLOW policy in force if there is
    exactly one (typically an allow-nothing ``spec: {}``).  None when the default
    decided.  ``reason`` says why in words, for logs and /config_dump.
    """

    allowed: bool
    policy: str | None
    reason: str


# ---------------------------------------------------------------------------
# Parsed documents (everything the user wrote, typed)
# ---------------------------------------------------------------------------

Labels = tuple[tuple[str, str], ...]


@dataclasses.dataclass(frozen=True)
class Source:
    """``rules[].from[].source``; strings as written, addresses parsed."""

    principals: tuple[str, ...] = ()
    not_principals: tuple[str, ...] = ()
    request_principals: tuple[str, ...] = ()
    not_request_principals: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    not_namespaces: tuple[str, ...] = ()
    service_accounts: tuple[str, ...] = ()
    not_service_accounts: tuple[str, ...] = ()
    ip_blocks: tuple[IPNetwork, ...] = ()
    not_ip_blocks: tuple[IPNetwork, ...] = ()
    remote_ip_blocks: tuple[IPNetwork, ...] = ()
    not_remote_ip_blocks: tuple[IPNetwork, ...] = ()

    def l7_fields(self) -> tuple[str, ...]:
        present = {
            "requestPrincipals": self.request_principals,
            "notRequestPrincipals": self.not_request_principals,
            "remoteIpBlocks": self.remote_ip_blocks,
            "notRemoteIpBlocks": self.not_remote_ip_blocks,
        }
        return tuple(name for name in _L7_SOURCE_FIELDS if present[name])


@dataclasses.dataclass(frozen=True)
class Operation:
    """``rules[].to[].operation``; only ports reach L4."""

    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()
    hosts: tuple[str, ...] = ()
    not_hosts: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    not_methods: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    not_paths: tuple[str, ...] = ()

    def l7_fields(self) -> tuple[str, ...]:
        present = {
            "hosts": self.hosts,
            "notHosts": self.not_hosts,
            "methods": self.methods,
            "notMethods": self.not_methods,
            "paths": self.paths,
            "notPaths": self.not_paths,
        }
        return tuple(name for name in _L7_OPERATION_FIELDS if present[name])


@dataclasses.dataclass(frozen=True)
class Condition:
    """``rules[].when[]``; values kept as strings, validated for the key's type."""

    key: str
    values: tuple[str, ...] = ()
    not_values: tuple[str, ...] = ()

    @property
    def is_l4(self) -> bool:
        return self.key in L4_WHEN_KEYS


@dataclasses.dataclass(frozen=True)
class Rule:
    """One rule; an empty ``from``/``to``/``when`` means the clause is absent."""

    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()
    conditions: tuple[Condition, ...] = ()


@dataclasses.dataclass(frozen=True)
class TargetRef:
    """``spec.targetRef(s)``: attaches the policy to a Gateway (waypoint) or a Service."""

    kind: str
    name: str
    group: str = ""
    namespace: str = ""


@dataclasses.dataclass(frozen=True)
class AuthorizationPolicy:
    """A parsed, validated Istio AuthorizationPolicy (security.istio.io v1 / v1beta1)."""

    name: str
    namespace: str
    action: Action = Action.ALLOW
    selector: Labels | None = None
    target_refs: tuple[TargetRef, ...] = ()
    rules: tuple[Rule, ...] = ()
    provider: str | None = None
    api_version: str = f"{SECURITY_GROUP}/v1"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def match_labels(self) -> dict[str, str] | None:
        return None if self.selector is None else dict(self.selector)


@dataclasses.dataclass(frozen=True)
class PeerAuthentication:
    """A parsed PeerAuthentication: mTLS mode for a mesh, namespace or workload."""

    name: str
    namespace: str
    mode: Mode = Mode.UNSET
    selector: Labels | None = None
    port_modes: tuple[tuple[int, Mode], ...] = ()
    created: datetime.datetime | None = None
    api_version: str = f"{SECURITY_GROUP}/v1"

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def is_workload_level(self) -> bool:
        """istiod treats a selector without labels like no selector (mesh/namespace level)."""
        return bool(self.selector)

    def port_mode(self, port: int) -> Mode:
        for p, mode in self.port_modes:
            if p == port:
                return mode
        return Mode.UNSET


# ---------------------------------------------------------------------------
# The L4 form ztunnel evaluates (istio.security.Authorization)
# ---------------------------------------------------------------------------


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
        ns = self.policy.namespace
        if ns != self.root_namespace and ns != workload.namespace:
            return False
        selector = self.policy.selector
        if selector is None:
            return True
        labels = workload.labels
        return all(labels.get(k) == v for k, v in selector)

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
        net = _parse_ip_block(v)
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
                f"rule {index}: principal '{value}' includes 'spiffe://'; Istio principals are "
                f"written without it ('{value[len('spiffe://') :]}'), so this value never matches"
            )
    return notes


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
        refs = ", ".join(
            f"{r.kind} {r.namespace or policy.namespace}/{r.name}" for r in policy.target_refs
        )
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


# ---------------------------------------------------------------------------
# Parsing and validation (istio pkg/config/validation ValidateAuthorizationPolicy)
# ---------------------------------------------------------------------------


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__


def _parse_ip_block(text: str) -> IPNetwork | None:
    """A CIDR (host bits allowed, as Go's netip.ParsePrefix) or a single address."""
    if "%" in text:
        return None
    try:
        if "/" in text:
            return ipaddress.ip_network(text, strict=False)
        return ipaddress.ip_network(ipaddress.ip_address(text))
    except ValueError:
        return None


def _parse_port(value: object) -> int | None:
    """Istio writes ports as strings; YAML users often write numbers; both are fine."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= 65535 else None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        port = int(value)
        return port if port <= 65535 else None
    return None


class _Checker:
    """Collects every error in one document with its field path."""

    def __init__(self, document: str) -> None:
        self.document = document
        self.errors: list[PolicyError] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(PolicyError(self.document, path, message))

    def raise_if_any(self) -> None:
        if self.errors:
            first, *rest = self.errors
            raise PolicyError(first.document, first.path, first.message, rest)

    def mapping(
        self, value: object, path: str, allowed: Sequence[str], *, null_ok: bool = True
    ) -> Mapping[str, object] | None:
        if value is None:
            if null_ok:
                return {}
            self.error(path, "must not be empty")
            return None
        if not isinstance(value, Mapping):
            self.error(path, f"expected a mapping, got {_type_name(value)}")
            return None
        for key in value:
            if key not in allowed:
                self.error(
                    f"{path}.{key}", f"unknown field (expected one of: {', '.join(allowed)})"
                )
        return value

    def items(self, value: object, path: str) -> list[object]:
        if value is None:
            return []
        if not isinstance(value, list):
            hint = f"; write [{value!r}]" if isinstance(value, str | int) else ""
            self.error(path, f"expected a list, got {_type_name(value)}{hint}")
            return []
        return value

    def strings(self, m: Mapping[str, object], key: str, path: str) -> tuple[str, ...]:
        out = []
        for i, item in enumerate(self.items(m.get(key), f"{path}.{key}")):
            where = f"{path}.{key}[{i}]"
            if not isinstance(item, str):
                self.error(where, f"expected a string, got {_type_name(item)}")
            elif item == "":
                self.error(where, "empty value not allowed")
            else:
                out.append(item)
        return tuple(out)

    def ip_blocks(self, m: Mapping[str, object], key: str, path: str) -> tuple[IPNetwork, ...]:
        out = []
        for i, item in enumerate(self.items(m.get(key), f"{path}.{key}")):
            where = f"{path}.{key}[{i}]"
            net = _parse_ip_block(item) if isinstance(item, str) else None
            if net is None:
                self.error(where, f"{item!r} is not an IP or CIDR")
            else:
                out.append(net)
        return tuple(out)

    def ports(self, m: Mapping[str, object], key: str, path: str) -> tuple[int, ...]:
        out = []
        for i, item in enumerate(self.items(m.get(key), f"{path}.{key}")):
            port = _parse_port(item)
            if port is None:
                self.error(f"{path}.{key}[{i}]", f"{item!r} is not a port number (0-65535)")
            else:
                out.append(port)
        return tuple(out)

    def name_string(self, m: Mapping[str, object], key: str, path: str) -> str:
        value = m.get(key)
        if not isinstance(value, str) or not value:
            self.error(f"{path}.{key}", f"must be a non-empty string, got {_type_name(value)}")
            return ""
        return value

    def selector(self, value: object, path: str) -> Labels | None:
        if value is None:
            return None
        sel = self.mapping(value, path, ("matchLabels",))
        if sel is None:
            return ()
        raw = sel.get("matchLabels")
        if raw is None:
            return ()
        labels = self.mapping(raw, f"{path}.matchLabels", _AnyKey())
        if labels is None:
            return ()
        out = []
        for k, v in labels.items():
            where = f"{path}.matchLabels.{k}"
            if not isinstance(k, str) or not k:
                self.error(where, "label key must be a non-empty string")
            elif not isinstance(v, str):
                self.error(where, f"label value must be a string, got {_type_name(v)}")
            elif "*" in k or "*" in v:
                self.error(where, "wildcard is not supported in selector")
            else:
                out.append((k, v))
        return tuple(sorted(out))


class _AnyKey(tuple[str, ...]):
    """An 'allowed keys' list that allows every key (for free-form maps such as labels)."""

    def __contains__(self, key: object) -> bool:
        return True


def _metadata(
    doc: Mapping[str, object], default_namespace: str
) -> tuple[str, str, Mapping[str, object]]:
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    name = meta.get("name")
    namespace = meta.get("namespace")
    name_s = name if isinstance(name, str) and name else "<unnamed>"
    ns_s = namespace if isinstance(namespace, str) and namespace else default_namespace
    return name_s, ns_s, meta


_CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "Node",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "GatewayClass",
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    }
)


def document_label(doc: object, default_namespace: str = "default") -> str:
    """``Kind namespace/name`` (``Kind name`` if cluster-scoped) for messages, whatever
    shape the document has."""
    if not isinstance(doc, Mapping):
        return f"document of type {type(doc).__name__}"
    kind = doc.get("kind")
    kind_s = kind if isinstance(kind, str) and kind else "<no kind>"
    name, ns, _ = _metadata(doc, default_namespace)
    return f"{kind_s} {name}" if kind_s in _CLUSTER_SCOPED else f"{kind_s} {ns}/{name}"


def _check_header(
    c: _Checker, doc: Mapping[str, object], kind: str, default_namespace: str
) -> tuple[str, str, str, Mapping[str, object]]:
    api = doc.get("apiVersion")
    api_s = api if isinstance(api, str) else ""
    allowed = [f"{SECURITY_GROUP}/{v}" for v in SECURITY_VERSIONS]
    if api_s not in allowed:
        c.error("apiVersion", f"{api!r} is not supported for {kind} (use {' or '.join(allowed)})")
    if doc.get("kind") != kind:
        c.error("kind", f"expected {kind!r}, got {doc.get('kind')!r}")
    name, namespace, meta = _metadata(doc, default_namespace)
    if name == "<unnamed>":
        c.error("metadata.name", "must be a non-empty string")
    ns_raw = meta.get("namespace")
    if ns_raw is not None and (not isinstance(ns_raw, str) or not ns_raw):
        c.error("metadata.namespace", "must be a non-empty string")
    return api_s or allowed[0], name, namespace, meta


def _parse_source(c: _Checker, value: object, path: str) -> Source | None:
    m = c.mapping(value, path, _SOURCE_FIELDS, null_ok=False)
    if m is None:
        return None
    if not any(m.get(f) for f in _SOURCE_FIELDS):
        c.error(path, "must not be empty (set at least one of principals, namespaces, ipBlocks, …)")
    src = Source(
        principals=c.strings(m, "principals", path),
        not_principals=c.strings(m, "notPrincipals", path),
        request_principals=c.strings(m, "requestPrincipals", path),
        not_request_principals=c.strings(m, "notRequestPrincipals", path),
        namespaces=c.strings(m, "namespaces", path),
        not_namespaces=c.strings(m, "notNamespaces", path),
        service_accounts=c.strings(m, "serviceAccounts", path),
        not_service_accounts=c.strings(m, "notServiceAccounts", path),
        ip_blocks=c.ip_blocks(m, "ipBlocks", path),
        not_ip_blocks=c.ip_blocks(m, "notIpBlocks", path),
        remote_ip_blocks=c.ip_blocks(m, "remoteIpBlocks", path),
        not_remote_ip_blocks=c.ip_blocks(m, "notRemoteIpBlocks", path),
    )
    for key, values in (
        ("serviceAccounts", src.service_accounts),
        ("notServiceAccounts", src.not_service_accounts),
    ):
        for i, sa in enumerate(values):
            parts = sa.split("/")
            if len(parts) > 2 or not all(parts):
                c.error(f"{path}.{key}[{i}]", f"{sa!r} is not 'serviceaccount' or 'namespace/sa'")
    if (src.service_accounts or src.not_service_accounts) and (
        src.principals or src.not_principals or src.namespaces or src.not_namespaces
    ):
        c.error(path, "cannot set serviceAccounts with namespaces or principals")
    return src


def _parse_operation(c: _Checker, value: object, path: str) -> Operation | None:
    m = c.mapping(value, path, _OPERATION_FIELDS, null_ok=False)
    if m is None:
        return None
    if not any(m.get(f) for f in _OPERATION_FIELDS):
        c.error(path, "must not be empty (set at least one of ports, methods, paths, hosts, …)")
    return Operation(
        ports=c.ports(m, "ports", path),
        not_ports=c.ports(m, "notPorts", path),
        hosts=c.strings(m, "hosts", path),
        not_hosts=c.strings(m, "notHosts", path),
        methods=c.strings(m, "methods", path),
        not_methods=c.strings(m, "notMethods", path),
        paths=c.strings(m, "paths", path),
        not_paths=c.strings(m, "notPaths", path),
    )


def _is_map_key(key: str, prefix: str) -> bool:
    """``prefix[name]`` with a non-empty name (Istio's validateMapKey)."""
    rest = key[len(prefix) :]
    return rest.startswith("[") and rest.endswith("]") and len(rest) > 2


def _check_condition_key(c: _Checker, key: str, path: str) -> None:
    if key in L4_WHEN_KEYS or key in _L7_WHEN_KEYS:
        return
    for prefix in _L7_WHEN_MAP_PREFIXES:
        if key.startswith(prefix):
            if prefix.endswith(".") or _is_map_key(key, prefix):
                return
            c.error(path, f"bad key {key!r}: should have the form {prefix}[name]")
            return
    if key == "destination.namespace":
        c.error(path, f"attribute {key!r} is replaced by metadata.namespace")
    elif key.startswith("destination.labels"):
        c.error(path, f"attribute {key!r} is replaced by the workload selector")
    elif key in ("destination.name", "destination.user"):
        c.error(path, f"deprecated attribute {key!r}: only supported in v1alpha1")
    else:
        c.error(path, f"unknown attribute {key!r}")


def _parse_condition(c: _Checker, value: object, path: str) -> Condition | None:
    m = c.mapping(value, path, ("key", "values", "notValues"), null_ok=False)
    if m is None:
        return None
    key = m.get("key")
    if not isinstance(key, str) or not key:
        c.error(f"{path}.key", "must not be empty")
        return None
    _check_condition_key(c, key, f"{path}.key")
    values = c.strings(m, "values", path)
    not_values = c.strings(m, "notValues", path)
    if not m.get("values") and not m.get("notValues"):
        c.error(path, f"at least one of values or notValues must be set for key {key!r}")
    for field, vals in (("values", values), ("notValues", not_values)):
        for i, v in enumerate(vals):
            where = f"{path}.{field}[{i}]"
            if key in _WHEN_IP_KEYS and _parse_ip_block(v) is None:
                c.error(where, f"{v!r} is not an IP or CIDR")
            elif key == "destination.port" and _parse_port(v) is None:
                c.error(where, f"{v!r} is not a port number (0-65535)")
    return Condition(key, values, not_values)


def _parse_rule(c: _Checker, value: object, path: str) -> Rule:
    m = c.mapping(value, path, ("from", "to", "when"))
    if m is None:
        return Rule()
    sources: list[Source] = []
    operations: list[Operation] = []
    conditions: list[Condition] = []
    for clause in ("from", "to"):
        # Istio rejects an empty list; a null is the same as leaving the key out.
        if isinstance(m.get(clause), list) and not m.get(clause):
            c.error(f"{path}.{clause}", "must not be empty (leave it out to match anything)")
    for i, entry in enumerate(c.items(m.get("from"), f"{path}.from")):
        e = c.mapping(entry, f"{path}.from[{i}]", ("source",), null_ok=False)
        if e is not None:
            src = _parse_source(c, e.get("source"), f"{path}.from[{i}].source")
            if src is not None:
                sources.append(src)
    for i, entry in enumerate(c.items(m.get("to"), f"{path}.to")):
        e = c.mapping(entry, f"{path}.to[{i}]", ("operation",), null_ok=False)
        if e is not None:
            op = _parse_operation(c, e.get("operation"), f"{path}.to[{i}].operation")
            if op is not None:
                operations.append(op)
    for i, entry in enumerate(c.items(m.get("when"), f"{path}.when")):
        cond = _parse_condition(c, entry, f"{path}.when[{i}]")
        if cond is not None:
            conditions.append(cond)
    return Rule(tuple(sources), tuple(operations), tuple(conditions))


def _parse_target_ref(c: _Checker, value: object, path: str) -> TargetRef | None:
    m = c.mapping(value, path, ("group", "kind", "name", "namespace"), null_ok=False)
    if m is None:
        return None
    kind = c.name_string(m, "kind", path)
    name = c.name_string(m, "name", path)
    group = m.get("group", "")
    namespace = m.get("namespace", "")
    return TargetRef(
        kind=kind,
        name=name,
        group=group if isinstance(group, str) else "",
        namespace=namespace if isinstance(namespace, str) else "",
    )


_AP_SPEC_FIELDS = ("selector", "targetRef", "targetRefs", "action", "rules", "provider")


def parse_authorization_policy(
    doc: Mapping[str, Any], *, default_namespace: str = "default"
) -> AuthorizationPolicy:
    """Parse and validate one AuthorizationPolicy; raises PolicyError (``.all`` = every error)."""
    c = _Checker(document_label(doc, default_namespace))
    api, name, namespace, _ = _check_header(c, doc, AUTHORIZATION_POLICY, default_namespace)
    spec = c.mapping(doc.get("spec"), "spec", _AP_SPEC_FIELDS) or {}

    selector = c.selector(spec.get("selector"), "spec.selector")
    refs: list[TargetRef] = []
    if spec.get("targetRef") is not None:
        ref = _parse_target_ref(c, spec.get("targetRef"), "spec.targetRef")
        if ref is not None:
            refs.append(ref)
    for i, item in enumerate(c.items(spec.get("targetRefs"), "spec.targetRefs")):
        ref = _parse_target_ref(c, item, f"spec.targetRefs[{i}]")
        if ref is not None:
            refs.append(ref)
    if selector is not None and refs:
        c.error("spec", "only one of targetRefs or selector can be set")

    raw_action = spec.get("action", "ALLOW")
    action = Action.ALLOW
    if isinstance(raw_action, str) and raw_action in Action.__members__:
        action = Action[raw_action]
    else:
        c.error("spec.action", f"{raw_action!r} is not one of ALLOW, DENY, AUDIT, CUSTOM")

    provider: str | None = None
    raw_provider = spec.get("provider")
    if raw_provider is not None:
        pm = c.mapping(raw_provider, "spec.provider", ("name",))
        if pm is not None:
            provider = c.name_string(pm, "name", "spec.provider")
        if action is not Action.CUSTOM:
            c.error("spec.provider", f"must not be set with action {action.value}")

    raw_rules = spec.get("rules")
    rules = [
        _parse_rule(c, r, f"spec.rules[{i}]")
        for i, r in enumerate(c.items(raw_rules, "spec.rules"))
    ]
    if action in (Action.DENY, Action.CUSTOM) and not raw_rules:
        c.error(
            "spec.rules",
            f"{action.value} action without rules is meaningless as it will never be "
            "triggered; add an empty rule {} if you want it to apply to every connection",
        )
    if action is Action.CUSTOM and raw_rules and not provider:
        c.error("spec.provider.name", "must not be empty with action CUSTOM")

    c.raise_if_any()
    return AuthorizationPolicy(
        name=name,
        namespace=namespace,
        action=action,
        selector=selector,
        target_refs=tuple(refs),
        rules=tuple(rules),
        provider=provider,
        api_version=api,
    )


def _parse_mode(c: _Checker, value: object, path: str) -> Mode:
    m = c.mapping(value, path, ("mode",))
    if m is None:
        return Mode.UNSET
    raw = m.get("mode", "UNSET")
    if isinstance(raw, str) and raw in Mode.__members__:
        return Mode[raw]
    c.error(f"{path}.mode", f"{raw!r} is not one of UNSET, DISABLE, PERMISSIVE, STRICT")
    return Mode.UNSET


def _parse_created(value: object) -> datetime.datetime | None:
    if isinstance(value, datetime.datetime):
        created = value
    elif isinstance(value, str):
        try:
            created = datetime.datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    return created if created.tzinfo else created.replace(tzinfo=datetime.UTC)


def parse_peer_authentication(
    doc: Mapping[str, Any], *, default_namespace: str = "default"
) -> PeerAuthentication:
    """Parse and validate one PeerAuthentication; raises PolicyError (``.all`` = every error)."""
    c = _Checker(document_label(doc, default_namespace))
    api, name, namespace, meta = _check_header(c, doc, PEER_AUTHENTICATION, default_namespace)
    spec = c.mapping(doc.get("spec"), "spec", ("selector", "mtls", "portLevelMtls")) or {}
    selector = c.selector(spec.get("selector"), "spec.selector")
    mode = _parse_mode(c, spec.get("mtls"), "spec.mtls")
    ports: list[tuple[int, Mode]] = []
    raw_ports = spec.get("portLevelMtls")
    if raw_ports is not None:
        pm = c.mapping(raw_ports, "spec.portLevelMtls", _AnyKey())
        if pm is not None:
            if not pm:
                c.error("spec.portLevelMtls", "if defined, must have at least one element")
            if not selector:
                c.error(
                    "spec.portLevelMtls",
                    "mesh/namespace peer authentication cannot have port level mTLS "
                    "(add a selector with matchLabels)",
                )
            for key, value in pm.items():
                port = _parse_port(key)
                where = f"spec.portLevelMtls.{key}"
                if port is None or port == 0:
                    c.error(where, f"{key!r}: port must be in range 1..65535")
                    continue
                ports.append((port, _parse_mode(c, value, where)))
    c.raise_if_any()
    return PeerAuthentication(
        name=name,
        namespace=namespace,
        mode=mode,
        selector=selector,
        port_modes=tuple(sorted(ports)),
        created=_parse_created(meta.get("creationTimestamp")),
        api_version=api,
    )


# ---------------------------------------------------------------------------
# Kinds the node does not handle: say so, and say what to use instead
# ---------------------------------------------------------------------------


def _principal(namespace: str, account: str) -> str:
    return f"{DEFAULT_TRUST_DOMAIN}/ns/{namespace}/sa/{account}"


def _get_str(m: object, key: str) -> str:
    if isinstance(m, Mapping):
        value = m.get(key)
        if isinstance(value, str):
            return value
    return ""


def _list_of_maps(value: object) -> list[Mapping[str, object]]:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _traffic_target_hint(doc: Mapping[str, object], namespace: str) -> str:
    spec = doc.get("spec")
    principals = [
        _principal(_get_str(s, "namespace") or namespace, _get_str(s, "name"))
        for s in _list_of_maps(spec.get("sources") if isinstance(spec, Mapping) else None)
        if _get_str(s, "kind") == "ServiceAccount" and _get_str(s, "name")
    ]
    dest = spec.get("destination") if isinstance(spec, Mapping) else None
    dest_sa = _get_str(dest, "name")
    text = (
        f"use an Istio AuthorizationPolicy (security.istio.io/v1) in namespace {namespace}, "
        "action ALLOW"
    )
    if principals:
        text += f", rules[].from[].source.principals {principals}"
    if dest_sa:
        text += (
            f", selecting the pods that run as service account {dest_sa!r} by their labels "
            "(selectors match labels, not service accounts)"
        )
    return text + "; HTTPRouteGroup matches become to[].operation paths/methods on a waypoint"


def _intentions_hint(doc: Mapping[str, object], namespace: str) -> str:
    spec = doc.get("spec")
    dest = _get_str(spec.get("destination") if isinstance(spec, Mapping) else None, "name")
    allow: list[str] = []
    deny: list[str] = []
    for s in _list_of_maps(spec.get("sources") if isinstance(spec, Mapping) else None):
        name = _get_str(s, "name")
        if not name or name == "*":
            continue
        target = allow if _get_str(s, "action") == "allow" else deny
        target.append(_principal(_get_str(s, "namespace") or namespace, name))
    text = f"use an Istio AuthorizationPolicy (security.istio.io/v1) in namespace {namespace}" + (
        f" selecting the {dest!r} pods by label" if dest else ""
    )
    if allow:
        text += f": ALLOW from.source.principals {allow}"
    if deny:
        text += f"; a DENY policy for {deny}"
    return (
        text + " (Consul service names taken as Kubernetes service accounts; a '*' deny "
        "source is Istio's default once an ALLOW policy selects the workload)"
    )


_AP_INSTEAD = "use an Istio AuthorizationPolicy (security.istio.io/v1)"
_STATIC_HINTS: dict[tuple[str, str], str] = {
    ("linkerd.io", "ServiceProfile"): (
        "Linkerd ServiceProfile routes, retries and timeouts are L7: use an Istio "
        "VirtualService or HTTPRoute served by a waypoint; for access control "
        f"{_AP_INSTEAD}"
    ),
    ("policy.linkerd.io", "Server"): f"{_AP_INSTEAD} with to[].operation.ports",
    ("policy.linkerd.io", "ServerAuthorization"): (
        f"{_AP_INSTEAD}: meshTLS identities become from[].source.principals, networks "
        "become from[].source.ipBlocks"
    ),
    ("policy.linkerd.io", "AuthorizationPolicy"): (
        f"{_AP_INSTEAD}; the Linkerd kind of the same name is not read"
    ),
    ("policy.linkerd.io", "MeshTLSAuthentication"): (
        f"{_AP_INSTEAD} with from[].source.principals"
    ),
    ("policy.linkerd.io", "NetworkAuthentication"): f"{_AP_INSTEAD} with from[].source.ipBlocks",
    ("specs.smi-spec.io", "HTTPRouteGroup"): (
        f"{_AP_INSTEAD} attached to a waypoint, with to[].operation methods/paths"
    ),
    ("split.smi-spec.io", "TrafficSplit"): (
        "use an Istio VirtualService (route weights) or an HTTPRoute (backendRefs weights)"
    ),
    ("consul.hashicorp.com", "ServiceDefaults"): (
        "use a PeerAuthentication for the mTLS mode and a DestinationRule for connection settings"
    ),
    ("consul.hashicorp.com", "ServiceResolver"): (
        "use a DestinationRule (subsets, failover) and a VirtualService"
    ),
    ("consul.hashicorp.com", "ServiceSplitter"): "use an Istio VirtualService (route weights)",
    ("consul.hashicorp.com", "ServiceRouter"): "use an Istio VirtualService or an HTTPRoute",
}
_MESH_NAMES = {
    "linkerd.io": "Linkerd",
    "policy.linkerd.io": "Linkerd",
    "access.smi-spec.io": "SMI",
    "specs.smi-spec.io": "SMI",
    "split.smi-spec.io": "SMI",
    "consul.hashicorp.com": "Consul",
}
_WAYPOINT_GROUPS = ("networking.istio.io", "gateway.networking.k8s.io")
_ISTIO_ELSEWHERE = {
    "networking.istio.io": "Istio traffic configuration",
    "telemetry.istio.io": "Istio telemetry configuration",
    "extensions.istio.io": "an Istio extension",
    "gateway.networking.k8s.io": "Gateway API configuration",
}


def _unhandled_reason(doc: Mapping[str, object], namespace: str) -> str:
    api = _get_str(doc, "apiVersion")
    kind = _get_str(doc, "kind") or "<no kind>"
    group = api.split("/")[0] if "/" in api else ""
    if group == SECURITY_GROUP and kind == "RequestAuthentication":
        return (
            "not handled by the node: RequestAuthentication (JWT) needs HTTP; a waypoint "
            "enforces it (attach it with targetRefs)"
        )
    if group in _MESH_NAMES:
        if kind == "TrafficTarget":
            hint = _traffic_target_hint(doc, namespace)
        elif kind == "ServiceIntentions":
            hint = _intentions_hint(doc, namespace)
        else:
            hint = _STATIC_HINTS.get((group, kind), _AP_INSTEAD)
        return f"not supported: {_MESH_NAMES[group]} {kind} ({api}); {hint}"
    if group in _ISTIO_ELSEWHERE:
        if group in _WAYPOINT_GROUPS:
            return (
                f"not applied: {kind} is {_ISTIO_ELSEWHERE[group]}, which a waypoint or "
                "gateway (L7) would apply; tether runs none yet, so its routes and L7 rules "
                "have no effect and traffic goes direct under L4 authorization"
            )
        return (
            f"not handled by L4 authorization: {kind} is {_ISTIO_ELSEWHERE[group]}; tether "
            "does not apply it"
        )
    if kind == "NetworkPolicy":
        return (
            "not handled by tether: Kubernetes NetworkPolicy is enforced by the CNI; tether's "
            "L4 policy is the Istio AuthorizationPolicy"
        )
    if group in ("", "apps", "batch", "discovery.k8s.io"):
        return f"not handled by L4 authorization: Kubernetes {kind} describes workloads"
    if kind in (AUTHORIZATION_POLICY, PEER_AUTHENTICATION):
        return f"not supported: {kind} from {api!r}; {_AP_INSTEAD}"
    return f"not handled by L4 authorization: {kind} ({api or 'no apiVersion'})"


# ---------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A document of a kind this module does not handle, and what to use instead."""

    document: str
    reason: str


@dataclasses.dataclass(frozen=True)
class LoadReport:
    """What one ``load`` did: which policies are now in force, which were refused, which skipped."""

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
    api = _get_str(doc, "apiVersion")
    return doc.get("kind") == kind and (api == "" or api.split("/")[0] == SECURITY_GROUP)


class PolicyStore:
    """Every valid Istio security policy the node knows, and the decisions they make.

    ``load`` never lets one bad document stop the others: valid policies take effect,
    invalid ones are reported with their field path (and a previously loaded version
    stays in force, as the Kubernetes API would keep it), other kinds are skipped with
    a hint.
    """

    def __init__(
        self,
        root_namespace: str = DEFAULT_ROOT_NAMESPACE,
        default_namespace: str = "default",
    ) -> None:
        self.root_namespace = root_namespace
        self.default_namespace = default_namespace
        self._authz: dict[str, CompiledPolicy] = {}
        self._peer: dict[str, PeerAuthentication] = {}
        self._rejected: dict[str, tuple[str, ...]] = {}
        self._skipped: dict[str, str] = {}

    # -- writing ---------------------------------------------------------------

    def load(self, docs: Iterable[object], *, replace: bool = False) -> LoadReport:
        """Add (or with ``replace``, swap in) the policies among ``docs``."""
        authz = {} if replace else dict(self._authz)
        peer = {} if replace else dict(self._peer)
        rejected = {} if replace else dict(self._rejected)
        skipped_now = {} if replace else dict(self._skipped)
        loaded: list[str] = []
        errors: list[PolicyError] = []
        skipped: list[Skipped] = []
        for index, doc in enumerate(docs):
            if doc is None:  # an empty YAML document ("---" with nothing after it)
                continue
            label = document_label(doc, self.default_namespace)
            if not isinstance(doc, Mapping):
                kind = _type_name(doc)
                errors.append(
                    PolicyError(f"document {index}", "", f"expected a mapping, got {kind}")
                )
                continue
            try:
                if _is_security_kind(doc, AUTHORIZATION_POLICY):
                    ap = parse_authorization_policy(doc, default_namespace=self.default_namespace)
                    authz[ap.key] = compile_policy(ap, self.root_namespace)
                elif _is_security_kind(doc, PEER_AUTHENTICATION):
                    pa = parse_peer_authentication(doc, default_namespace=self.default_namespace)
                    peer[pa.key] = pa
                else:
                    _, ns, _ = _metadata(doc, self.default_namespace)
                    reason = _unhandled_reason(doc, ns)
                    skipped.append(Skipped(label, reason))
                    skipped_now[label] = reason
                    continue
            except PolicyError as exc:
                errors.extend(exc.all)
                rejected[label] = tuple(str(e) for e in exc.all)
                # An invalid edit keeps the last good version in force: dropping
                # it would fail open (a typo in a DENY policy would remove it).
                name, ns, _ = _metadata(doc, self.default_namespace)
                key = f"{ns}/{name}"
                if _is_security_kind(doc, AUTHORIZATION_POLICY) and key in self._authz:
                    authz[key] = self._authz[key]
                elif _is_security_kind(doc, PEER_AUTHENTICATION) and key in self._peer:
                    peer[key] = self._peer[key]
                continue
            rejected.pop(label, None)
            loaded.append(label)
        self._authz, self._peer = authz, peer
        self._rejected, self._skipped = rejected, skipped_now
        return LoadReport(tuple(loaded), tuple(errors), tuple(skipped))

    def remove(self, kind: str, namespace: str, name: str) -> bool:
        """Forget a policy (a watch saw it deleted); True if it was known."""
        key = f"{namespace}/{name}"
        self._rejected.pop(f"{kind} {key}", None)
        table: dict[str, Any] = self._authz if kind == AUTHORIZATION_POLICY else self._peer
        return table.pop(key, None) is not None

    # -- reading ---------------------------------------------------------------

    @property
    def authorization_policies(self) -> tuple[CompiledPolicy, ...]:
        return tuple(self._authz[k] for k in sorted(self._authz))

    @property
    def peer_authentications(self) -> tuple[PeerAuthentication, ...]:
        return tuple(self._peer[k] for k in sorted(self._peer))

    def policies_for(self, workload: WorkloadLike) -> tuple[CompiledPolicy, ...]:
        """AuthorizationPolicies the node enforces for a workload, in key order."""
        return tuple(p for p in self.authorization_policies if p.applies_to(workload))

    def evaluate(self, conn: Conn) -> Decision:
        """ztunnel's assert_rbac: any matching DENY denies; then ALLOW policies, if any apply,
        must match; otherwise allow.  Order of loading never changes the answer."""
        wl = conn.dst
        if conn.src_principal is None:
            mode, source = self._resolve_mtls(wl, conn.dst_port)
            if mode is Mode.STRICT:
                # istiod sends STRICT as a DENY policy with notPrincipals ["*"].
                name = source.key if source is not None else None
                return Decision(
                    False,
                    name,
                    f"plaintext connection refused: PeerAuthentication {name} sets mTLS "
                    f"STRICT for port {conn.dst_port}",
                )
        applicable = self.policies_for(wl)
        for pol in applicable:
            if pol.policy.action is Action.DENY:
                rule = pol.first_match(conn)
                if rule is not None:
                    return Decision(
                        False, pol.key, f"denied by DENY policy {pol.key} rule {rule.index}"
                    )
        allows = [p for p in applicable if p.policy.action is Action.ALLOW]
        if not allows:
            return Decision(True, None, "no ALLOW policy applies to the workload; allowed")
        for pol in allows:
            rule = pol.first_match(conn)
            if rule is not None:
                return Decision(
                    True, pol.key, f"allowed by ALLOW policy {pol.key} rule {rule.index}"
                )
        keys = [p.key for p in allows]
        return Decision(
            False,
            keys[0] if len(keys) == 1 else None,
            f"no ALLOW policy matched (in force: {', '.join(keys)})",
        )

    # -- PeerAuthentication ------------------------------------------------------

    def _oldest(self, candidates: Iterable[PeerAuthentication]) -> PeerAuthentication | None:
        """istiod's conflict rule: the oldest policy wins; without timestamps, the first name."""
        far = datetime.datetime.max.replace(tzinfo=datetime.UTC)
        ordered = sorted(candidates, key=lambda p: (p.created or far, p.namespace, p.name))
        return ordered[0] if ordered else None

    def _mtls_levels(
        self, workload: WorkloadLike
    ) -> tuple[PeerAuthentication | None, PeerAuthentication | None, PeerAuthentication | None]:
        root = self.root_namespace
        pas = self._peer.values()
        mesh = self._oldest(p for p in pas if p.namespace == root and not p.is_workload_level)
        ns = self._oldest(
            p for p in pas if p.namespace == workload.namespace != root and not p.is_workload_level
        )
        labels = workload.labels
        # istiod (convertedSelectorPeerAuthentications) ignores selector policies in the
        # root namespace for ambient workloads.
        wl = self._oldest(
            p
            for p in pas
            if p.namespace == workload.namespace != root
            and p.is_workload_level
            and all(labels.get(k) == v for k, v in p.selector or ())
        )
        return mesh, ns, wl

    def _resolve_mtls(
        self, workload: WorkloadLike, port: int | None
    ) -> tuple[Mode, PeerAuthentication | None]:
        mode, source = Mode.PERMISSIVE, None  # Istio's default with no policy
        mesh, ns, wl = self._mtls_levels(workload)
        for pa in (mesh, ns, wl):
            if pa is not None and pa.mode is not Mode.UNSET:
                mode, source = pa.mode, pa
        if wl is not None and port is not None:
            port_mode = wl.port_mode(port)
            if port_mode is not Mode.UNSET:
                mode, source = port_mode, wl
        return mode, source

    def _inherited_mode(self, namespace: str) -> tuple[Mode, PeerAuthentication | None]:
        """The mode a namespace's workloads get before any workload-level policy."""
        mode, source = Mode.PERMISSIVE, None
        mesh, ns, _ = self._mtls_levels(WorkloadRef(namespace))
        for pa in (mesh, ns):
            if pa is not None and pa.mode is not Mode.UNSET:
                mode, source = pa.mode, pa
        return mode, source

    def mtls_mode(self, workload: WorkloadLike, port: int | None = None) -> Mode:
        """Effective mode: mesh < namespace < workload < port, UNSET inherits; PERMISSIVE if
        nothing is set.  Without a port, the workload-level mode."""
        return self._resolve_mtls(workload, port)[0]

    def plaintext_allowed(self, workload: WorkloadLike, port: int) -> bool:
        """STRICT refuses plaintext; PERMISSIVE and DISABLE accept it (ztunnel cannot turn
        mTLS off for HBONE, so DISABLE behaves as PERMISSIVE on the node)."""
        return self.mtls_mode(workload, port) is not Mode.STRICT

    # -- /config_dump --------------------------------------------------------------

    def _peer_notes(self, pa: PeerAuthentication) -> list[str]:
        notes: list[str] = []
        if pa.namespace == self.root_namespace and pa.is_workload_level:
            notes.append(
                "selector policy in the root namespace: ignored for ambient workloads "
                "(istiod does the same)"
            )
        if pa.mode is Mode.DISABLE or any(m is Mode.DISABLE for _, m in pa.port_modes):
            notes.append("DISABLE acts as PERMISSIVE on the node: plaintext and mTLS accepted")
        if pa.is_workload_level and pa.mode is not Mode.UNSET:
            inherited, parent = self._inherited_mode(pa.namespace)
            if inherited is pa.mode and parent is not None:
                notes.append(
                    f"mode {pa.mode.value} repeats the namespace/mesh mode set by {parent.key}"
                )
        for port, mode in pa.port_modes:
            if mode is pa.mode and mode is not Mode.UNSET:
                notes.append(f"portLevelMtls {port}: {mode.value} repeats the workload mode")
        if not pa.is_workload_level:
            level = [
                p
                for p in self._peer.values()
                if p.namespace == pa.namespace and not p.is_workload_level
            ]
            winner = self._oldest(level)
            if winner is not None and winner.key != pa.key:
                notes.append(f"shadowed by {winner.key}: with several, the oldest policy wins")
        return notes

    def describe(self) -> dict[str, Any]:
        """Everything the node enforces and why, JSON-able, for /config_dump."""
        authz = []
        for cp in self.authorization_policies:
            p = cp.policy
            authz.append(
                {
                    "key": p.key,
                    "namespace": p.namespace,
                    "name": p.name,
                    "apiVersion": p.api_version,
                    "action": p.action.value,
                    "scope": cp.scope.value,
                    "selector": p.match_labels,
                    "targetRefs": [dataclasses.asdict(r) for r in p.target_refs],
                    "enforcement": cp.enforcement.value,
                    "rules": [r.to_dict() for r in cp.rules],
                    "notes": list(cp.notes),
                }
            )
        peer = [
            {
                "key": pa.key,
                "namespace": pa.namespace,
                "name": pa.name,
                "level": (
                    "workload"
                    if pa.is_workload_level
                    else "mesh"
                    if pa.namespace == self.root_namespace
                    else "namespace"
                ),
                "selector": None if pa.selector is None else dict(pa.selector),
                "mode": pa.mode.value,
                "portLevelMtls": {str(port): mode.value for port, mode in pa.port_modes},
                "notes": self._peer_notes(pa),
            }
            for pa in self.peer_authentications
        ]
        return {
            "rootNamespace": self.root_namespace,
            "authorizationPolicies": authz,
            "peerAuthentications": peer,
            "rejected": {k: list(v) for k, v in sorted(self._rejected.items())},
            "skipped": dict(sorted(self._skipped.items())),
        }


__all__ = [
    "DEFAULT_ROOT_NAMESPACE",
    "L4_WHEN_KEYS",
    "Action",
    "AuthorizationPolicy",
    "CompiledPolicy",
    "Condition",
    "Conn",
    "Decision",
    "Enforcement",
    "L4Match",
    "L4Rule",
    "LoadReport",
    "Mode",
    "Operation",
    "PeerAuthentication",
    "PolicyError",
    "PolicyStore",
    "Rule",
    "Scope",
    "Skipped",
    "Source",
    "SpiffeIdError",
    "StringMatch",
    "TargetRef",
    "WorkloadLike",
    "WorkloadRef",
    "compile_policy",
    "document_label",
    "parse_authorization_policy",
    "parse_peer_authentication",
]
