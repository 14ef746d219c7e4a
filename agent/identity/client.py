"""Client of Istio's CA service: turns an identity into a checked SVID over gRPC.

It does what ztunnel's ``CaClient`` does on the wire, so the same code works
against istiod and ``tether ca``: a fresh P-256 key and a CSR naming the
identity, the node's token as ``authorization: Bearer``, and (node proxy mode)
the workload identity in the request's ``metadata`` Struct under
``ImpersonatedIdentity``. What comes back is checked before use: leaf SAN,
key, chain to the trusted root, validity.

Given a worker (agent/workerproc.py running agent/identity/issuer.py, as
the node agent does), the key, the CSR and the checks are made there and
the SVID comes back as PEM (agent/identity/pem.py): the agent then never
imports cryptography.  Without one they are made in process.
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

from agent import workerproc
from agent.identity.pem import PemSvid, SvidLike, utcnow
from agent.identity.proto import ca_pb2, ca_pb2_grpc
from agent.identity.spiffe import SpiffeId

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
        worker: workerproc.Worker | None = None,
    ) -> None:
        """target is host:port; channel_credentials None means plaintext (local use only).

        trust_roots are the mesh root PEMs this node trusts; with none, the root
        the CA returns is taken as is (trust on first use).  worker: where the
        key, CSR and checks are made (see the module doc).
        """
        self.target = target
        self._token: TokenSource | None = (lambda: token) if isinstance(token, str) else token
        self.impersonate = impersonate
        self.ttl = ttl
        self._worker = worker
        self._trust_pems = [trust_roots] if isinstance(trust_roots, str) else list(trust_roots)
        self._trust_roots: list[Any] = []
        if worker is None:  # parsed (and refused if bad) now, as the worker's caller does
            from agent.identity.svid import load_pem_certificates

            self._trust_roots = load_pem_certificates(self._trust_pems)
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

    async def fetch(self, identity: SpiffeId) -> SvidLike:
        if self._worker is None:
            return await self._fetch_in_process(identity)
        made = await self._work({"op": "csr", "identity": identity.uri}, identity)
        response = await self._create(identity, str(made["csr"]))
        checked = await self._work(
            {
                "op": "check",
                "identity": identity.uri,
                "key": made["key"],
                "cert_chain": list(response.cert_chain),
                "root_certs": self._roots_of(response),
                "trust_roots": self._trust_pems,
            },
            identity,
        )
        try:
            svid = PemSvid.from_json(checked.get("svid") or {})
        except ValueError as exc:
            raise CaClientError(f"certificate worker for {identity}: {exc}") from exc
        self._log(identity, svid)
        return svid

    async def _fetch_in_process(self, identity: SpiffeId) -> SvidLike:
        from agent.identity.svid import ChainError, build_csr, generate_key, svid_from_response

        key = generate_key()
        response = await self._create(identity, build_csr(identity, key))
        try:
            svid = svid_from_response(
                identity,
                key,
                list(response.cert_chain),
                self._roots_of(response),
                trust_roots=self._trust_roots,
                now=utcnow(),
            )
        except ChainError as exc:
            raise CaClientError(f"CA {self.target} returned a bad certificate: {exc}") from exc
        self._log(identity, svid)
        return svid

    async def _work(self, request: dict[str, Any], identity: SpiffeId) -> dict[str, Any]:
        assert self._worker is not None
        try:
            reply = await self._worker.call(request)
        except workerproc.WorkerError as exc:
            raise CaClientError(f"certificate worker for {identity}: {exc.strerror}") from exc
        if reply.get("ok"):
            return reply
        if reply.get("kind") == "chain":
            raise CaClientError(
                f"CA {self.target} returned a bad certificate: {reply.get('error')}"
            )
        raise CaClientError(f"certificate worker for {identity}: {reply.get('error')}")

    async def _create(self, identity: SpiffeId, csr: str) -> Any:
        request = ca_pb2.IstioCertificateRequest(
            csr=csr,
            validity_duration=int(self.ttl.total_seconds()),
        )
        if self.impersonate:
            request.metadata.update({IMPERSONATED_IDENTITY: identity.uri})
        stub = self._ensure_stub()
        try:
            return await stub.CreateCertificate(
                request, metadata=self._metadata(), timeout=self.timeout
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            raise CaClientError(
                f"CA {self.target} refused a certificate for {identity}: "
                f"{code.name}: {exc.details()}",
                code,
            ) from exc

    @staticmethod
    def _roots_of(response: Any) -> list[str]:
        return list(response.root_cert.ca_cert) if response.HasField("root_cert") else []

    @staticmethod
    def _log(identity: SpiffeId, svid: SvidLike) -> None:
        log.debug("certificate for %s serial %x until %s", identity, svid.serial, svid.not_after)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None

    async def aclose(self) -> None:
        """The channel and the worker (CertificateManager.close calls it)."""
        await self.close()
        if self._worker is not None:
            await self._worker.aclose()

    async def __aenter__(self) -> CaClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
