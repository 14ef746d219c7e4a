"""The policy vocabulary: what a connection is, what a decision is, and the typed
Istio security documents (the full document model, L7 fields included: the node
enforces the L4 part; a waypoint translation will read the same model)."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import ipaddress
from collections.abc import Mapping, Sequence
from typing import Protocol

from agent.identity.spiffe import SpiffeId

DEFAULT_ROOT_NAMESPACE = "istio-system"
SECURITY_GROUP = "security.istio.io"
SECURITY_VERSIONS = ("v1", "v1beta1")
AUTHORIZATION_POLICY = "AuthorizationPolicy"
PEER_AUTHENTICATION = "PeerAuthentication"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# istiod's l4WhenAttributes: the only `when` keys ztunnel can see.
L4_WHEN_KEYS = (
    "source.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
)
WHEN_IP_KEYS = ("source.ip", "destination.ip", "remote.ip")
# Keys Istio accepts that need a proxy which parses the request (or the TLS
# ClientHello): valid policy, but a waypoint's business.
L7_WHEN_KEYS = (
    "remote.ip",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "connection.sni",
)
L7_WHEN_MAP_PREFIXES = ("request.headers", "request.auth.claims", "experimental.envoy.filters.")

SOURCE_FIELDS = (
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
L7_SOURCE_FIELDS = (
    "requestPrincipals",
    "notRequestPrincipals",
    "remoteIpBlocks",
    "notRemoteIpBlocks",
)
OPERATION_FIELDS = (
    "ports",
    "notPorts",
    "hosts",
    "notHosts",
    "methods",
    "notMethods",
    "paths",
    "notPaths",
)
L7_OPERATION_FIELDS = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")


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


CLIP = 80  # longest user value echoed in a message


def clip_text(text: str, limit: int = CLIP) -> str:
    """``text`` cut to ``limit`` characters, saying how long it was: a message must never
    carry a megabyte of user input into logs and /config_dump."""
    if len(text) <= limit:
        return text
    return f"{text[: limit - 1]}… ({len(text)} chars)"


def clip(value: object, limit: int = CLIP) -> str:
    """``repr(value)`` for messages, cut like ``clip_text`` (computed on a bounded prefix)."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}… ({len(value)} chars)"
    text = repr(value)
    return clip_text(text, limit)


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
        # Every part is capped, whoever built it: an error is a line in a log.
        self.document = clip_text(document, 2 * CLIP)
        self.path = clip_text(path, 2 * CLIP)
        self.message = clip_text(message, 3 * CLIP)
        self.others = tuple(others)
        document, path, message = self.document, self.path, self.message
        text = f"{document}: {path}: {message}" if path else f"{document}: {message}"
        super().__init__(text)

    @property
    def all(self) -> tuple[PolicyError, ...]:
        return (self, *self.others)


class WorkloadLike(Protocol):
    """What policy selection needs from a destination workload (``agent.model.Workload`` fits)."""

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
        return tuple(name for name in L7_SOURCE_FIELDS if present[name])


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
        return tuple(name for name in L7_OPERATION_FIELDS if present[name])


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


def parse_ip_block(text: str) -> IPNetwork | None:
    """A CIDR (host bits allowed, as Go's netip.ParsePrefix) or a single address."""
    if "%" in text:
        return None
    try:
        if "/" in text:
            return ipaddress.ip_network(text, strict=False)
        return ipaddress.ip_network(ipaddress.ip_address(text))
    except ValueError:
        return None


def parse_port(value: object) -> int | None:
    """Istio writes ports as strings; YAML users often write numbers; both are fine."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if 0 <= value <= 65535 else None
    # The length check first: int() of a huge digit string raises (and is slow).
    if isinstance(value, str) and len(value) <= 5 and value.isascii() and value.isdigit():
        port = int(value)
        return port if port <= 65535 else None
    return None
