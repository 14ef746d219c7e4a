"""gRPC server of Istio's CA service in front of a CertificateAuthority.

Who may get which certificate is decided by a pluggable Authenticator, the
seam where the Kubernetes TokenReview authenticator plugs in later. The flow
follows istiod (``security/pkg/server/ca/server.go``): authenticate the
caller; with no ``ImpersonatedIdentity`` in the request metadata the caller
gets its own identity; with one, only a node agent may ask, and only for an
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

from agent.identity.ca import CaError, CertificateAuthority, CsrError, TrustDomainError
from agent.identity.client import IMPERSONATED_IDENTITY
from agent.identity.proto import ca_pb2, ca_pb2_grpc
from agent.identity.spiffe import SpiffeId, SpiffeIdError

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


class StaticAuthenticator:
    """Local and demo mode: bearer tokens name nodes; placement lists each node's identities.

    placement is a callable so it reads live state (the local-file model)
    rather than a snapshot taken at start.
    """

    def __init__(
        self,
        tokens: Mapping[str, str],
        placement: Callable[[str], Collection[SpiffeId]],
    ) -> None:
        self._tokens = dict(tokens)
        self._placement = placement

    @classmethod
    def from_file(cls, path: str | Path) -> StaticAuthenticator:
        """YAML or JSON: ``{tokens: {TOKEN: NODE}, nodes: {NODE: [spiffe://...]}}``."""
        import yaml

        doc = yaml.safe_load(Path(path).read_text()) or {}
        tokens = {str(k): str(v) for k, v in (doc.get("tokens") or {}).items()}
        nodes = {
            str(n): frozenset(SpiffeId.parse(str(i)) for i in (ids or ()))
            for n, ids in (doc.get("nodes") or {}).items()
        }
        return cls(tokens, lambda node: nodes.get(node, frozenset()))

    async def authenticate(self, call: CallContext) -> Caller:
        token = call.bearer_token()
        if token is None:
            raise AuthenticationError("no bearer token in the authorization metadata")
        node: str | None = None
        # Compare against every token, in constant time per comparison.
        for known, name in self._tokens.items():
            if hmac.compare_digest(known.encode(), token.encode()):
                node = name
        if node is None:
            raise AuthenticationError("bearer token is not recognized")
        return Caller(name=f"node agent on {node}", node=node)

    async def authorize_impersonation(self, caller: Caller, identity: SpiffeId) -> None:
        if caller.node is None:
            raise PermissionDeniedError(f"{caller.name} may not request other identities")
        if identity not in set(self._placement(caller.node)):
            raise PermissionDeniedError(f"identity {identity} does not run on node {caller.node!r}")


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
        if len(caller.identities) != 1:
            raise _Refusal(
                grpc.StatusCode.PERMISSION_DENIED,
                f"{caller.name} has no single identity of its own; a node agent names the "
                f"workload identity in request metadata {IMPERSONATED_IDENTITY}",
            )
        return next(iter(caller.identities))

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
        server = grpc.aio.server()
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
