"""CreateCertificate through the real grpc.aio server and client on 127.0.0.1."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest

from agent import workerproc
from agent.identity.ca import CertificateAuthority
from agent.identity.client import CaClient, CaClientError, token_file
from agent.identity.embedded import ISSUER
from agent.identity.pem import PemSvid
from agent.identity.proto import ca_pb2, ca_pb2_grpc
from agent.identity.serve_ca import run_ca
from agent.identity.server import (
    AuthenticationError,
    CallContext,
    Caller,
    CaServer,
    PermissionDeniedError,
    StaticAuthenticator,
)
from agent.identity.spiffe import SpiffeId
from agent.identity.svid import (
    build_csr,
    generate_key,
    identity_of,
    load_pem_certificates,
    verify_chain,
)

T = TypeVar("T")

WEB = SpiffeId("cluster.local", "shop", "web")
DB = SpiffeId("cluster.local", "shop", "db")
PLACEMENT = {"node-a": {WEB}, "node-b": {DB}}
TOKENS = {"token-a": "node-a", "token-b": "node-b"}


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate("cluster.local")


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await asyncio.wait_for(coro_fn(), timeout=30)

    return asyncio.run(main())


class RecordingAuthenticator(StaticAuthenticator):
    """The static one, remembering what it was shown."""

    def __init__(self) -> None:
        super().__init__(TOKENS, lambda node: PLACEMENT.get(node, set()))
        self.calls: list[CallContext] = []
        self.impersonations: list[tuple[Caller, SpiffeId]] = []

    async def authenticate(self, call: CallContext) -> Caller:
        self.calls.append(call)
        return await super().authenticate(call)

    async def authorize_impersonation(self, caller: Caller, identity: SpiffeId) -> None:
        self.impersonations.append((caller, identity))
        await super().authorize_impersonation(caller, identity)


async def with_server(
    ca: CertificateAuthority,
    auth: Any,
    body: Callable[[str], Awaitable[T]],
) -> T:
    server = CaServer(ca, auth)
    port = await server.start("127.0.0.1:0")
    try:
        return await body(f"127.0.0.1:{port}")
    finally:
        await server.stop(grace=None)


def test_round_trip_with_impersonation(ca: CertificateAuthority) -> None:
    auth = RecordingAuthenticator()

    async def body(target: str) -> None:
        async with CaClient(
            target, token="token-a", trust_roots=ca.roots_pem(), headers=[("clusterid", "k1")]
        ) as client:
            svid = await client.fetch(WEB)
        assert svid.identity == WEB and identity_of(svid.leaf) == WEB
        assert svid.roots == ca.roots
        verify_chain(svid.chain, svid.roots, datetime.now(UTC))
        assert svid.not_after - svid.not_before > timedelta(hours=23)

    run(lambda: with_server(ca, auth, body))
    (call,) = auth.calls
    assert call.metadata["authorization"] == "Bearer token-a"
    assert call.metadata["clusterid"] == "k1"
    assert call.peer.startswith("ipv4:127.0.0.1:")
    ((caller, ident),) = auth.impersonations
    assert caller.node == "node-a" and ident == WEB


def test_identity_on_another_node_is_permission_denied(ca: CertificateAuthority) -> None:
    async def body(target: str) -> CaClientError:
        async with CaClient(target, token="token-a") as client:
            with pytest.raises(CaClientError) as info:
                await client.fetch(DB)
        return info.value

    err = run(lambda: with_server(ca, RecordingAuthenticator(), body))
    assert err.code == grpc.StatusCode.PERMISSION_DENIED
    assert str(DB) in str(err) and "node-a" in str(err)


@pytest.mark.parametrize("token", ["wrong-token", None])
def test_bad_or_missing_token_is_unauthenticated(
    ca: CertificateAuthority, token: str | None
) -> None:
    async def body(target: str) -> CaClientError:
        async with CaClient(target, token=token) as client:
            with pytest.raises(CaClientError) as info:
                await client.fetch(WEB)
        return info.value

    err = run(lambda: with_server(ca, RecordingAuthenticator(), body))
    assert err.code == grpc.StatusCode.UNAUTHENTICATED


async def raw_call(target: str, request: ca_pb2.IstioCertificateRequest, token: str) -> Any:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)
        return await stub.CreateCertificate(
            request, metadata=[("authorization", f"Bearer {token}")], timeout=10
        )


def test_csr_for_other_identity_is_invalid_argument(ca: CertificateAuthority) -> None:
    request = ca_pb2.IstioCertificateRequest(csr=build_csr(DB, generate_key()))
    request.metadata.update({"ImpersonatedIdentity": WEB.uri})

    async def body(target: str) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw_call(target, request, "token-a")
        return info.value

    err = run(lambda: with_server(ca, RecordingAuthenticator(), body))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "differ from the authorized identity" in (err.details() or "")


@pytest.mark.parametrize(
    ("impersonated", "code", "text"),
    [
        ("not-a-spiffe-id", grpc.StatusCode.INVALID_ARGUMENT, "must start with"),
        (
            "spiffe://other.local/ns/shop/sa/web",
            grpc.StatusCode.PERMISSION_DENIED,
            "outside trust domain",
        ),
        (None, grpc.StatusCode.PERMISSION_DENIED, "no single identity of its own"),
    ],
)
def test_refusals_map_to_grpc_codes(
    ca: CertificateAuthority, impersonated: str | None, code: grpc.StatusCode, text: str
) -> None:
    request = ca_pb2.IstioCertificateRequest(csr=build_csr(WEB, generate_key()))
    if impersonated is not None:
        request.metadata.update({"ImpersonatedIdentity": impersonated})

    async def body(target: str) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw_call(target, request, "token-a")
        return info.value

    err = run(lambda: with_server(ca, RecordingAuthenticator(), body))
    assert err.code() == code
    assert text in (err.details() or "")


def test_response_is_one_pem_per_entry_leaf_first(ca: CertificateAuthority) -> None:
    request = ca_pb2.IstioCertificateRequest(
        csr=build_csr(WEB, generate_key()), validity_duration=600
    )
    request.metadata.update({"ImpersonatedIdentity": WEB.uri})

    async def body(target: str) -> Any:
        return await raw_call(target, request, "token-a")

    response = run(lambda: with_server(ca, RecordingAuthenticator(), body))
    chain = list(response.cert_chain)
    assert len(chain) == 2 and all(p.endswith("\n") for p in chain)
    assert chain[-1].strip() == ca.roots_pem().strip()
    from agent.identity.svid import load_pem_certificates

    leaf = load_pem_certificates(chain[:1])[0]
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc - ca.clock_skew
    assert abs(life - timedelta(seconds=600)) < timedelta(seconds=5)


class WorkloadAuthenticator:
    """A workload token yields the workload's own identity (the TokenReview shape)."""

    async def authenticate(self, call: CallContext) -> Caller:
        if call.bearer_token() != "web-sa-token":
            raise AuthenticationError("unknown token")
        return Caller(name="shop/web", identities=frozenset({WEB}))

    async def authorize_impersonation(self, caller: Caller, identity: SpiffeId) -> None:
        raise PermissionDeniedError(f"{caller.name} is not a node agent")


def test_workload_gets_its_own_identity_without_impersonation(ca: CertificateAuthority) -> None:
    async def body(target: str) -> None:
        async with CaClient(target, token="web-sa-token", impersonate=False) as client:
            assert (await client.fetch(WEB)).identity == WEB
            with pytest.raises(CaClientError, match="may get only its own identity") as info:
                await client.fetch(DB)
            assert info.value.code == grpc.StatusCode.PERMISSION_DENIED
        async with CaClient(target, token="web-sa-token", impersonate=True) as client:
            with pytest.raises(CaClientError, match="not a node agent") as info:
                await client.fetch(WEB)
            assert info.value.code == grpc.StatusCode.PERMISSION_DENIED

    run(lambda: with_server(ca, WorkloadAuthenticator(), body))


def test_client_rejects_chain_from_untrusted_root(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.generate("cluster.local")

    async def body(target: str) -> None:
        async with CaClient(target, token="token-a", trust_roots=other.roots_pem()) as client:
            with pytest.raises(CaClientError, match="does not chain to a trusted root"):
                await client.fetch(WEB)

    run(lambda: with_server(ca, RecordingAuthenticator(), body))


def test_run_ca_serves_tls_with_persistent_root(tmp_path: Path) -> None:
    auth_file = tmp_path / "auth.yaml"
    auth_file.write_text(
        "tokens:\n  token-a: node-a\nnodes:\n  node-a: ['spiffe://cluster.local/ns/shop/sa/web']\n"
    )
    (tmp_path / "token").write_text("token-a\n")

    async def main() -> tuple[str, str]:
        stop = asyncio.Event()
        started: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            run_ca(
                "127.0.0.1:0",
                str(tmp_path / "root"),
                auth_file=str(auth_file),
                stop=stop,
                ready=lambda server, ca: started.set_result((server.port, ca.roots_pem())),
            )
        )
        port, roots = await started
        creds = grpc.ssl_channel_credentials(root_certificates=roots.encode())
        async with CaClient(
            f"127.0.0.1:{port}",
            token=token_file(tmp_path / "token"),
            trust_roots=roots,
            channel_credentials=creds,
        ) as client:
            svid = await client.fetch(WEB)
        stop.set()
        await task
        return svid.leaf.issuer.rfc4514_string(), roots

    issuer, roots = run(main)
    assert "cluster.local" in issuer
    # The root persisted: a second CA from the same directory has the same root.
    again = CertificateAuthority.load(tmp_path / "root")
    assert again.roots_pem() == roots


# -- the node agent's way: key, CSR and checks in a worker process -----------


def test_round_trip_through_the_certificate_worker(ca: CertificateAuthority) -> None:
    """What the agent gets is PEM; checked here independently."""
    auth = RecordingAuthenticator()
    worker = workerproc.Worker(ISSUER)

    async def body(target: str) -> Any:
        client = CaClient(target, token="token-a", trust_roots=ca.roots_pem(), worker=worker)
        try:
            return await client.fetch(WEB), worker.started
        finally:
            await client.aclose()

    svid, started = run(lambda: with_server(ca, auth, body))
    assert isinstance(svid, PemSvid) and svid.identity == WEB and started == 1
    assert not worker.running  # aclose ended it
    chain = load_pem_certificates([svid.chain_pem()])
    roots = load_pem_certificates([svid.roots_pem()])
    assert identity_of(chain[0]) == WEB and roots == list(ca.roots)
    verify_chain(chain, roots, datetime.now(UTC))
    assert svid.serial == chain[0].serial_number
    ((caller, ident),) = auth.impersonations
    assert caller.node == "node-a" and ident == WEB


def _worker_fetch_fails(
    ca: CertificateAuthority, worker: workerproc.Worker, match: str, trust_roots: str = ""
) -> None:
    """A fetch through `worker` from the CA fails with CaClientError `match`."""

    async def body(target: str) -> None:
        client = CaClient(target, token="token-a", trust_roots=trust_roots or (), worker=worker)
        try:
            with pytest.raises(CaClientError, match=match):
                await client.fetch(WEB)
        finally:
            await client.aclose()

    run(lambda: with_server(ca, RecordingAuthenticator(), body))


def test_the_worker_refuses_a_chain_from_an_untrusted_root(ca: CertificateAuthority) -> None:
    other = CertificateAuthority.generate("cluster.local")
    _worker_fetch_fails(
        ca,
        workerproc.Worker(ISSUER),
        r"returned a bad certificate: .*trusted root",
        trust_roots=other.roots_pem(),
    )


def test_a_dead_certificate_worker_is_the_fetchs_error(ca: CertificateAuthority) -> None:
    worker = workerproc.Worker("dead", argv=[sys.executable, "-c", "pass"])
    _worker_fetch_fails(ca, worker, f"certificate worker for {WEB}: worker failed")
