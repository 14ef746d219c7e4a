"""Client of Istio's CA service: turns an identity into a checked SVID over gRPC.

It does what ztunnel's ``CaClient`` does on the wire, so the same code works
against istiod and ``tether ca``: a fresh P-256 key and a CSR naming the
identity, the node's token as ``authorization: Bearer``, and (node proxy mode)
the workload identity in the request's ``metadata`` Struct under
``ImpersonatedIdentity``. What comes back is checked before use: leaf SAN,
key, chain to the trusted root, validity.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import grpc.aio

from agent.identity.proto import ca_pb2, ca_pb2_grpc
from agent.identity.spiffe import SpiffeId
from agent.identity.svid import (
    ChainError,
    Svid,
    build_csr,
    generate_key,
    load_pem_certificates,
    svid_from_response,
    utcnow,
)

log = logging.getLogger(__name__)

SERVICE = "istio.v1.auth.IstioCertificateService"
IMPERSONATED_IDENTITY = "ImpersonatedIdentity"
DEFAULT_TTL = timedelta(hours=24)

TokenSource = Callable[[], str]


class CaClientError(Exception):
    """A certificate could not be obtained; code is the gRPC status when the CA answered one."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def token_file(path: str | Path) -> TokenSource:
    """Read the token on every call: projected service-account tokens rotate on disk."""
    p = Path(path)

    def read() -> str:
        tok = p.read_text().strip()
        if not tok:
            raise CaClientError(f"token file {p} is empty")
        return tok

    return read


class CaClient:
    """Fetches SVIDs from an IstioCertificateService endpoint (istiod or ``tether ca``)."""

    def __init__(
        self,
        target: str,
        *,
        token: str | TokenSource | None = None,
        impersonate: bool = True,
        ttl: timedelta = DEFAULT_TTL,
        trust_roots: Sequence[str] | str = (),
        channel_credentials: grpc.ChannelCredentials | None = None,
        headers: Sequence[tuple[str, str]] = (),
        timeout: float = 10.0,
    ) -> None:
        """target is host:port; channel_credentials None means plaintext (local use only).

        trust_roots are the mesh root PEMs this node trusts; with none, the root
        the CA returns is taken as is (trust on first use).
        """
        self.target = target
        self._token: TokenSource | None = (lambda: token) if isinstance(token, str) else token
        self.impersonate = impersonate
        self.ttl = ttl
        self._trust_roots = load_pem_certificates(
            [trust_roots] if isinstance(trust_roots, str) else trust_roots
        )
        self._credentials = channel_credentials
        self._headers = tuple(headers)
        self.timeout = timeout
        self._channel: Any = None
        self._stub: Any = None

    def _ensure_stub(self) -> Any:
        # grpc.aio channels bind to the running event loop: create on first use.
        if self._stub is None:
            if self._credentials is None:
                self._channel = grpc.aio.insecure_channel(self.target)
            else:
                self._channel = grpc.aio.secure_channel(self.target, self._credentials)
            self._stub = ca_pb2_grpc.IstioCertificateServiceStub(self._channel)
        return self._stub

    def _metadata(self) -> list[tuple[str, str]]:
        md = list(self._headers)
        if self._token is not None:
            try:
                tok = self._token()
            except OSError as exc:
                raise CaClientError(f"cannot read CA token: {exc}") from exc
            md.append(("authorization", f"Bearer {tok}"))
        return md

    async def fetch(self, identity: SpiffeId) -> Svid:
        key = generate_key()
        request = ca_pb2.IstioCertificateRequest(
            csr=build_csr(identity, key),
            validity_duration=int(self.ttl.total_seconds()),
        )
        if self.impersonate:
            request.metadata.update({IMPERSONATED_IDENTITY: identity.uri})
        stub = self._ensure_stub()
        try:
            response: ca_pb2.IstioCertificateResponse = await stub.CreateCertificate(
                request, metadata=self._metadata(), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            raise CaClientError(
                f"CA {self.target} refused a certificate for {identity}: "
                f"{code.name}: {exc.details()}",
                code,
            ) from exc
        roots = list(response.root_cert.ca_cert) if response.HasField("root_cert") else []
        try:
            svid = svid_from_response(
                identity,
                key,
                list(response.cert_chain),
                roots,
                trust_roots=self._trust_roots,
                now=utcnow(),
            )
        except ChainError as exc:
            raise CaClientError(f"CA {self.target} returned a bad certificate: {exc}") from exc
        log.debug("certificate for %s serial %x until %s", identity, svid.serial, svid.not_after)
        return svid

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    async def __aenter__(self) -> CaClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
