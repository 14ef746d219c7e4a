"""gRPC server of Istio's CA service in front of a CertificateAuthority.

Who may get which certificate is decided by a pluggable Authenticator (the
auth file's StaticAuthenticator, or Kubernetes TokenReview in
agent/sources/k8s_auth.py). The flow follows istiod
(``security/pkg/server/ca/server.go``): authenticate the caller; with no
``ImpersonatedIdentity`` in the request metadata the caller gets its own
identity (a dedicated proxy, a waypoint running as its own service account)
and nothing else; with one, only a node agent may ask, and only for an
identity that runs on its node.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import grpc.aio
from cryptography import x509

from agent.identity.ca import CaError, CertificateAuthority, CsrError, TrustDomainError
from agent.identity.client import IMPERSONATED_IDENTITY
from agent.identity.proto import ca_pb2, ca_pb2_grpc
from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN, SpiffeId, SpiffeIdError

log = logging.getLogger(__name__)

BEARER_PREFIX = "bearer "


class AuthenticationError(Exception):
    """The caller could not be authenticated (gRPC UNAUTHENTICATED)."""


class PermissionDeniedError(Exception):
    """The caller is known but may not have the identity it asked for (PERMISSION_DENIED)."""


@dataclass(frozen=True)
class CallContext:
    """What an authenticator may look at: request metadata (lower-case keys) and peer."""

    metadata: Mapping[str, str]
    peer: str = ""
    auth_context: Mapping[str, Collection[bytes]] = field(default_factory=dict)

    @classmethod
    def from_grpc(cls, context: Any) -> CallContext:
        md: dict[str, str] = {}
        for key, value in context.invocation_metadata() or ():
            if isinstance(value, str):
                md[key.lower()] = value
        auth = {k: tuple(v) for k, v in (context.auth_context() or {}).items()}
        return cls(md, str(context.peer() or ""), auth)

    def bearer_token(self) -> str | None:
        value = self.metadata.get("authorization", "")
        if value[: len(BEARER_PREFIX)].lower() != BEARER_PREFIX:
            return None
        return value[len(BEARER_PREFIX) :].strip() or None


@dataclass(frozen=True)
class Caller:
    """An authenticated caller.

    identities: what it may get for itself. node: set only for a node agent
    trusted to request the identities of workloads on that node.
    """

    name: str
    identities: frozenset[SpiffeId] = frozenset()
    node: str | None = None


class Authenticator(Protocol):
    """Decides who is calling and whether a node agent may impersonate an identity."""

    async def authenticate(self, call: CallContext) -> Caller:
        """Return the caller or raise AuthenticationError."""
        ...

    async def authorize_impersonation(self, caller: Caller, identity: SpiffeId) -> None:
        """Return if caller may obtain identity on a workload's behalf, else raise
        PermissionDeniedError naming the identity and the node."""
        ...


class AuthFileError(ValueError):
    """The auth file is malformed; the message names the entry and the fix."""


class StaticAuthenticator:
    """Local and demo mode: bearer tokens from a file, each either a node agent's or one workload's.

    A node agent's token names its node, and placement lists each node's
    identities; the agent may get those by impersonation. A workload token is
    bound to exactly one identity, which it gets without impersonation (a
    dedicated proxy, or a waypoint running as its own service account).
    placement is a callable so it reads live state (the local-file model)
    rather than a snapshot taken at start.
    """

    def __init__(
        self,
        tokens: Mapping[str, str],
        placement: Callable[[str], Collection[SpiffeId]],
        workload_tokens: Mapping[str, SpiffeId] | None = None,
    ) -> None:
        """tokens: node agent token -> node; workload_tokens: token -> its one identity."""
        self._tokens: dict[str, Caller] = {
            tok: Caller(name=f"node agent on {node}", node=node) for tok, node in tokens.items()
        }
        for tok, ident in (workload_tokens or {}).items():
            if tok in self._tokens:
                raise ValueError(
                    f"a token is given both to {self._tokens[tok].name} and to workload {ident}"
                )
            self._tokens[tok] = Caller(
                name=f"workload token for {ident}", identities=frozenset({ident})
            )
        self._placement = placement

    @classmethod
    def from_file(
        cls, path: str | Path, trust_domain: str = DEFAULT_TRUST_DOMAIN
    ) -> StaticAuthenticator:
        """Read a YAML (or JSON) auth file; raise AuthFileError naming the bad entry.

        ::

            tokens:                    # bearer token -> who holds it
              TOKEN1: NODE             # a node agent on NODE (short for {node: NODE})
              TOKEN2: {node: NODE}     # the same
              TOKEN3: {identity: spiffe://TD/ns/NS/sa/SA}  # one workload, no impersonation
              TOKEN4: {namespace: NS, serviceAccount: SA}  # the same, in trust_domain
            nodes:                     # which identities run on which node
              NODE: [spiffe://TD/ns/NS/sa/SA, ...]
        """
        import yaml

        class _NoDuplicates(yaml.SafeLoader):
            """A token given twice must not silently keep only the last entry
            (which identity it grants would depend on the order)."""

            def construct_mapping(self, node: Any, deep: bool = False) -> Any:
                seen: set[object] = set()
                for key_node, _ in node.value:
                    key = self.construct_object(key_node, deep=deep)
                    if key in seen:
                        raise AuthFileError(
                            f"auth file {path}: a key appears twice (line "
                            f"{key_node.start_mark.line + 1}): give each token once"
                        )
                    seen.add(key)
                return super().construct_mapping(node, deep=deep)

        try:
            doc = yaml.load(Path(path).read_text(), Loader=_NoDuplicates) or {}
        except yaml.YAMLError as exc:
            raise AuthFileError(f"auth file {path}: not YAML: {exc}") from exc
        if not isinstance(doc, dict):
            raise AuthFileError(f"auth file {path}: expected a mapping with tokens and nodes")
        raw_tokens = doc.get("tokens") or {}
        if not isinstance(raw_tokens, dict):
            raise AuthFileError(f"auth file {path}: tokens must be a mapping TOKEN: entry")
        nodes_tokens: dict[str, str] = {}
        workload_tokens: dict[str, SpiffeId] = {}
        for n, (tok, entry) in enumerate(raw_tokens.items(), start=1):
            # Tokens are secrets: errors name the entry by position, never the token.
            where = f"auth file {path}: tokens entry {n} (counting from 1)"
            node, ident = _token_entry(entry, where, trust_domain)
            if node is not None:
                nodes_tokens[str(tok)] = node
            elif ident is not None:
                workload_tokens[str(tok)] = ident
        try:
            nodes = {
                str(n): frozenset(SpiffeId.parse(str(i)) for i in (ids or ()))
                for n, ids in (doc.get("nodes") or {}).items()
            }
        except (SpiffeIdError, AttributeError, TypeError) as exc:
            raise AuthFileError(
                f"auth file {path}: nodes must map each node to a list of spiffe:// IDs: {exc}"
            ) from exc
        return cls(nodes_tokens, lambda node: nodes.get(node, frozenset()), workload_tokens)

    async def authenticate(self, call: CallContext) -> Caller:
        token = call.bearer_token()
        if token is None:
            raise AuthenticationError("no bearer token in the authorization metadata")
        caller: Caller | None = None
        # Compare against every token, in constant time per comparison.
        for known, who in self._tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                caller = who
        if caller is None:
            raise AuthenticationError("bearer token is not recognized")
        return caller

    async def authorize_impersonation(self, caller: Caller, identity: SpiffeId) -> None:
        if caller.node is None:
            raise PermissionDeniedError(f"{caller.name} may not request other identities")
        if identity not in set(self._placement(caller.node)):
            raise PermissionDeniedError(f"identity {identity} does not run on node {caller.node!r}")


_NODE_KEYS = frozenset({"node"})
_WORKLOAD_KEYS = frozenset({"identity", "namespace", "serviceAccount"})


def _token_entry(
    entry: object, where: str, trust_domain: str
) -> tuple[str | None, SpiffeId | None]:
    """One tokens entry: (node, None) for a node agent, (None, identity) for one workload."""
    fix = (
        "give either `node: NODE` (a node agent, which impersonates the identities "
        "listed for its node) or `identity: spiffe://...` / `namespace` + `serviceAccount` "
        "(one workload, which gets only that identity); use two tokens for both"
    )
    if isinstance(entry, str | int) and not isinstance(entry, bool) and str(entry):
        return str(entry), None  # the short form, TOKEN: NODE
    if not isinstance(entry, dict):
        raise AuthFileError(f"{where}: is {entry!r}; {fix}")
    keys = {str(k) for k in entry}
    unknown = keys - _NODE_KEYS - _WORKLOAD_KEYS
    if unknown:
        raise AuthFileError(f"{where}: unknown keys {sorted(unknown)}; {fix}")
    is_node, is_workload = bool(keys & _NODE_KEYS), bool(keys & _WORKLOAD_KEYS)
    if is_node and is_workload:
        raise AuthFileError(
            f"{where}: is both a node agent's token and a workload's "
            f"({', '.join(sorted(keys))}); {fix}"
        )
    if not is_node and not is_workload:
        raise AuthFileError(f"{where}: names neither a node nor an identity; {fix}")
    if is_node:
        node = entry["node"]
        if not isinstance(node, str) or not node:
            raise AuthFileError(f"{where}: node must be a non-empty string; {fix}")
        return node, None
    try:
        if "identity" in keys:
            if keys != {"identity"}:
                raise AuthFileError(
                    f"{where}: give identity alone, or namespace + serviceAccount, not both"
                )
            ident = SpiffeId.parse(str(entry["identity"]))
        else:
            if keys != {"namespace", "serviceAccount"}:
                raise AuthFileError(
                    f"{where}: namespace and serviceAccount go together "
                    f"(got only {', '.join(sorted(keys))}); or give identity: spiffe://..."
                )
            ident = SpiffeId(trust_domain, str(entry["namespace"]), str(entry["serviceAccount"]))
    except SpiffeIdError as exc:
        raise AuthFileError(f"{where}: {exc}") from exc
    if ident.trust_domain != trust_domain:
        raise AuthFileError(
            f"{where}: identity {ident} is outside this CA's trust domain {trust_domain!r}"
        )
    return None, ident


class _Refusal(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _requested_identity(request: ca_pb2.IstioCertificateRequest) -> SpiffeId | None:
    if not request.HasField("metadata"):
        return None
    value = request.metadata.fields.get(IMPERSONATED_IDENTITY)
    if value is None:
        return None
    if value.WhichOneof("kind") != "string_value":
        raise _Refusal(
            grpc.StatusCode.INVALID_ARGUMENT, f"metadata {IMPERSONATED_IDENTITY} must be a string"
        )
    if not value.string_value:
        return None
    try:
        return SpiffeId.parse(value.string_value)
    except SpiffeIdError as exc:
        raise _Refusal(
            grpc.StatusCode.INVALID_ARGUMENT, f"metadata {IMPERSONATED_IDENTITY}: {exc}"
        ) from exc


def _own_identity(caller: Caller) -> SpiffeId | None:
    return next(iter(caller.identities)) if len(caller.identities) == 1 else None


def _csr_uris(csr_pem: str) -> list[str] | None:
    """The URI SANs a CSR asks for, or None when it cannot be read."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode("ascii", "replace"))
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    return list(san.get_values_for_type(x509.UniformResourceIdentifier))


class CertificateService:
    """istio.v1.auth.IstioCertificateService backed by a CertificateAuthority."""

    def __init__(self, ca: CertificateAuthority, authenticator: Authenticator) -> None:
        self.ca = ca
        self.authenticator = authenticator

    async def _decide(self, request: ca_pb2.IstioCertificateRequest, context: Any) -> SpiffeId:
        call = CallContext.from_grpc(context)
        try:
            caller = await self.authenticator.authenticate(call)
        except AuthenticationError as exc:
            raise _Refusal(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from exc
        impersonated = _requested_identity(request)
        if impersonated is not None:
            if caller.node is None:
                # A workload (or a token bound to one identity) never impersonates,
                # not even itself: istiod also allows ImpersonatedIdentity only
                # to node authorizers.
                own = _own_identity(caller)
                raise _Refusal(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"{caller.name} is not a node agent and may not send "
                    f"{IMPERSONATED_IDENTITY} (asked for {impersonated})"
                    + (
                        f"; it gets only its own identity {own}, asked for without that metadata"
                        if own is not None
                        else ""
                    ),
                )
            if impersonated.trust_domain != self.ca.trust_domain:
                raise _Refusal(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"identity {impersonated} is outside trust domain {self.ca.trust_domain!r}",
                )
            try:
                await self.authenticator.authorize_impersonation(caller, impersonated)
            except PermissionDeniedError as exc:
                raise _Refusal(grpc.StatusCode.PERMISSION_DENIED, str(exc)) from exc
            log.debug("%s impersonates %s", caller.name, impersonated)
            return impersonated
        own = _own_identity(caller)
        if own is None:
            raise _Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{caller.name} has no single identity of its own: a node agent names the "
                f"workload identity in request metadata {IMPERSONATED_IDENTITY}, and a proxy "
                "asking for its own identity needs a token bound to that one identity",
            )
        asked = _csr_uris(request.csr)
        if asked and asked != [own.uri]:
            # The CSR names someone else: that is a request for another identity,
            # which this caller may not have (a malformed CSR is sign_csr's to refuse).
            hint = (
                f"; a node agent names a workload identity in {IMPERSONATED_IDENTITY}"
                if caller.node is not None
                else ""
            )
            raise _Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{caller.name} may get only its own identity {own}, not {', '.join(asked)}{hint}",
            )
        return own

    async def CreateCertificate(
        self, request: ca_pb2.IstioCertificateRequest, context: Any
    ) -> ca_pb2.IstioCertificateResponse:
        try:
            identity = await self._decide(request, context)
            ttl = request.validity_duration if request.validity_duration > 0 else None
            try:
                chain = self.ca.sign_csr(request.csr, identity, ttl)
            except CsrError as exc:
                raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from exc
            except TrustDomainError as exc:
                raise _Refusal(grpc.StatusCode.PERMISSION_DENIED, str(exc)) from exc
            except CaError as exc:
                raise _Refusal(grpc.StatusCode.INTERNAL, str(exc)) from exc
        except _Refusal as refusal:
            log.warning("CreateCertificate from %s refused: %s", context.peer(), refusal)
            await context.abort(refusal.code, str(refusal))
            raise AssertionError("unreachable: context.abort raises") from refusal
        log.info("issued certificate for %s to %s", identity, context.peer())
        # One certificate per entry, each ending in a newline, as istiod answers.
        return ca_pb2.IstioCertificateResponse(
            cert_chain=[p if p.endswith("\n") else p + "\n" for p in chain]
        )


class CaServer:
    """A grpc.aio server hosting CertificateService on one address."""

    def __init__(
        self,
        ca: CertificateAuthority,
        authenticator: Authenticator,
        *,
        server_credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.service = CertificateService(ca, authenticator)
        self._credentials = server_credentials
        self._server: Any = None
        self.port = 0

    async def start(self, bind: str) -> int:
        """Listen on bind (host:port, port 0 for ephemeral); return the bound port."""
        # No SO_REUSEPORT (gRPC sets it by default): another process of the
        # same user could bind the CA's port too and take a share of the
        # CSRs, and an ephemeral port could be handed out twice.
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(self.service, server)
        if self._credentials is None:
            port = server.add_insecure_port(bind)
        else:
            port = server.add_secure_port(bind, self._credentials)
        if port == 0:
            raise OSError(f"cannot listen on {bind}")
        await server.start()
        self._server = server
        self.port = int(port)
        log.info("CA listening on %s (port %d)", bind, self.port)
        return self.port

    async def wait(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def stop(self, grace: float | None = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
