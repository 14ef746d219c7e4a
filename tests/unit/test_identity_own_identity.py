"""A client that is not a node agent gets its own identity, and only that, through the real
gRPC server: a token bound to one identity in the auth file, and a pod's TokenReview'd
service-account token (the Kubernetes authenticator against a stand-in API).

Node agents keep impersonating the identities on their node.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any, TypeVar

import grpc
import grpc.aio
import pytest

from agent.identity.ca import CertificateAuthority
from agent.identity.client import CaClient, CaClientError
from agent.identity.proto import ca_pb2, ca_pb2_grpc
from agent.identity.serve_ca import run_ca
from agent.identity.server import Authenticator, AuthFileError, CaServer, StaticAuthenticator
from agent.identity.spiffe import SpiffeId
from agent.identity.svid import build_csr, generate_key, identity_of, load_pem_certificates

T = TypeVar("T")

WEB = SpiffeId("cluster.local", "shop", "web")
DB = SpiffeId("cluster.local", "shop", "db")
WAYPOINT = SpiffeId("cluster.local", "shop", "waypoint")

AUTH_FILE = """\
tokens:
  token-n1: n1
  token-n2: {node: n2}
  token-waypoint: {identity: spiffe://cluster.local/ns/shop/sa/waypoint}
  token-db: {namespace: shop, serviceAccount: db}
nodes:
  n1: [spiffe://cluster.local/ns/shop/sa/web]
  n2: [spiffe://cluster.local/ns/shop/sa/db]
"""


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate("cluster.local")


@pytest.fixture
def auth_file(tmp_path: Path) -> Path:
    path = tmp_path / "auth.yaml"
    path.write_text(AUTH_FILE)
    return path


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await asyncio.wait_for(coro_fn(), timeout=30)

    return asyncio.run(main())


async def with_server(
    ca: CertificateAuthority, auth: Authenticator, body: Callable[[str], Awaitable[T]]
) -> T:
    server = CaServer(ca, auth)
    port = await server.start("127.0.0.1:0")
    try:
        return await body(f"127.0.0.1:{port}")
    finally:
        await server.stop(grace=None)


async def refused(client: CaClient, identity: SpiffeId) -> CaClientError:
    with pytest.raises(CaClientError) as info:
        await client.fetch(identity)
    return info.value


# -- the auth file -----------------------------------------------------------


def test_auth_file_bound_token_gets_its_own_identity_over_tls(
    tmp_path: Path, auth_file: Path
) -> None:
    """The finding: this was refused ("has no single identity of its own")."""

    async def main() -> SpiffeId:
        stop = asyncio.Event()
        started: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            run_ca(
                "127.0.0.1:0",
                None,
                auth_file=str(auth_file),
                stop=stop,
                ready=lambda server, ca: started.set_result((server.port, ca.roots_pem())),
            )
        )
        try:
            port, roots = await started
            async with CaClient(
                f"127.0.0.1:{port}",
                token="token-waypoint",
                impersonate=False,
                trust_roots=roots,
                channel_credentials=grpc.ssl_channel_credentials(roots.encode()),
            ) as client:
                svid = await client.fetch(WAYPOINT)
            return identity_of(svid.leaf)
        finally:
            stop.set()
            await task

    assert run(main) == WAYPOINT


@pytest.mark.parametrize(("token", "own"), [("token-waypoint", WAYPOINT), ("token-db", DB)])
def test_auth_file_bound_token_own_identity_only(
    ca: CertificateAuthority, auth_file: Path, token: str, own: SpiffeId
) -> None:
    auth = StaticAuthenticator.from_file(auth_file)
    other = WEB

    async def body(target: str) -> None:
        async with CaClient(target, token=token, impersonate=False) as client:
            assert identity_of((await client.fetch(own)).leaf) == own
            err = await refused(client, other)
            assert err.code == grpc.StatusCode.PERMISSION_DENIED
            assert f"may get only its own identity {own}, not {other.uri}" in str(err)
        async with CaClient(target, token=token, impersonate=True) as client:
            # impersonating anyone, itself included, is for node agents only
            for asked in (other, own):
                err = await refused(client, asked)
                assert err.code == grpc.StatusCode.PERMISSION_DENIED
                assert "is not a node agent and may not send ImpersonatedIdentity" in str(err)
                assert f"it gets only its own identity {own}" in str(err)

    run(lambda: with_server(ca, auth, body))


@pytest.mark.parametrize("token", ["token-n1", "token-n2"])
def test_auth_file_node_agent_unchanged(
    ca: CertificateAuthority, auth_file: Path, token: str
) -> None:
    auth = StaticAuthenticator.from_file(auth_file)
    mine, theirs, node = (WEB, DB, "n1") if token == "token-n1" else (DB, WEB, "n2")

    async def body(target: str) -> None:
        async with CaClient(target, token=token) as client:
            assert identity_of((await client.fetch(mine)).leaf) == mine
            err = await refused(client, theirs)
            assert err.code == grpc.StatusCode.PERMISSION_DENIED
            assert f"identity {theirs} does not run on node {node!r}" in str(err)
        async with CaClient(target, token=token, impersonate=False) as client:
            err = await refused(client, mine)
            assert err.code == grpc.StatusCode.PERMISSION_DENIED
            assert f"node agent on {node} has no single identity of its own" in str(err)

    run(lambda: with_server(ca, auth, body))


def test_the_ca_port_cannot_be_shared(ca: CertificateAuthority, auth_file: Path) -> None:
    """gRPC listens with SO_REUSEPORT unless told not to: then a second
    socket of the same user could bind the CA's port and take CSRs."""

    async def body(target: str) -> OSError | None:
        port = int(target.rsplit(":", 1)[1])
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError as e:
                return e
        return None

    err = run(lambda: with_server(ca, StaticAuthenticator.from_file(auth_file), body))
    assert err is not None and err.errno == errno.EADDRINUSE, err


def test_auth_file_unknown_token_is_unauthenticated(
    ca: CertificateAuthority, auth_file: Path
) -> None:
    async def body(target: str) -> CaClientError:
        async with CaClient(target, token="token-nobody", impersonate=False) as client:
            return await refused(client, WAYPOINT)

    err = run(lambda: with_server(ca, StaticAuthenticator.from_file(auth_file), body))
    assert err.code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("entry", "text"),
    [
        (
            "{node: n1, identity: 'spiffe://cluster.local/ns/shop/sa/web'}",
            "is both a node agent's token and a workload's",
        ),
        ("{node: n1, namespace: shop, serviceAccount: web}", "is both"),
        ("{}", "names neither a node nor an identity"),
        ("", "is None"),
        ("{nod: n1}", "unknown keys ['nod']"),
        ("{namespace: shop}", "namespace and serviceAccount go together"),
        (
            "{identity: 'spiffe://cluster.local/ns/a/sa/b', namespace: a, serviceAccount: b}",
            "identity alone, or namespace + serviceAccount",
        ),
        ("{identity: 'http://x'}", "must start with"),
        ("{identity: 'spiffe://other.td/ns/a/sa/b'}", "outside this CA's trust domain"),
        ("{node: ''}", "node must be a non-empty string"),
    ],
)
def test_auth_file_bad_token_entry_names_entry_and_fix(
    tmp_path: Path, entry: str, text: str
) -> None:
    path = tmp_path / "auth.yaml"
    path.write_text(f"tokens:\n  good-token: n1\n  secret-token-xyz: {entry}\n")
    with pytest.raises(AuthFileError) as info:
        StaticAuthenticator.from_file(path, "cluster.local")
    msg = str(info.value)
    assert f"auth file {path}: tokens entry 2" in msg and text in msg
    assert "secret-token-xyz" not in msg  # tokens are secrets
    if "both" in text or "neither" in text:
        assert "use two tokens for both" in msg


def test_bad_auth_file_stops_run_ca_before_listening(tmp_path: Path) -> None:
    path = tmp_path / "auth.yaml"
    path.write_text("tokens:\n  t: {}\n")
    with pytest.raises(AuthFileError, match="tokens entry 1"):
        run(lambda: run_ca("127.0.0.1:0", None, auth_file=str(path), tls=False))


# -- Kubernetes TokenReview --------------------------------------------------

NS_AGENT = "tether-system"
TOKENS = {
    # token -> (service account user, extras) as the API server's TokenReview reports them
    "agent-n1": (
        f"system:serviceaccount:{NS_AGENT}:tether-agent",
        {
            "authentication.kubernetes.io/pod-name": ["tether-agent-x1"],
            "authentication.kubernetes.io/pod-uid": ["u-agent"],
            "authentication.kubernetes.io/node-name": ["n1"],
        },
    ),
    "waypoint-pod": (
        "system:serviceaccount:shop:waypoint",
        {
            "authentication.kubernetes.io/pod-name": ["waypoint-7d9f"],
            "authentication.kubernetes.io/pod-uid": ["u-waypoint"],
        },
    ),
}
PODS = [  # (namespace, service account, node)
    ("shop", "web", "n1"),
    ("shop", "db", "n2"),
    ("shop", "waypoint", "n1"),
]


class FakeAuthenticationApi:
    def create_token_review(self, review: Any) -> Any:
        found = TOKENS.get(review.spec.token)
        if found is None:
            return SimpleNamespace(
                status=SimpleNamespace(authenticated=False, user=None, error="invalid token")
            )
        user, extra = found
        return SimpleNamespace(
            status=SimpleNamespace(
                authenticated=True, user=SimpleNamespace(username=user, extra=extra), error=None
            )
        )


class FakeCoreApi:
    def list_namespaced_pod(self, namespace: str, field_selector: str) -> Any:
        node = field_selector.removeprefix("spec.nodeName=")
        return SimpleNamespace(
            items=[
                SimpleNamespace(
                    spec=SimpleNamespace(service_account_name=sa),
                    status=SimpleNamespace(phase="Running"),
                )
                for ns, sa, n in PODS
                if ns == namespace and n == node
            ]
        )


@pytest.fixture
def kube_auth() -> Any:
    pytest.importorskip("kubernetes")
    from kubernetes import client

    from agent.sources.k8s_auth import TokenReviewAuthenticator

    auth = TokenReviewAuthenticator(client.ApiClient(), "cluster.local")
    auth.auth = FakeAuthenticationApi()  # type: ignore[assignment]
    auth.core = FakeCoreApi()  # type: ignore[assignment]
    return auth


def test_kube_pod_token_gets_its_own_identity_only(
    ca: CertificateAuthority, kube_auth: Any
) -> None:
    async def body(target: str) -> None:
        async with CaClient(target, token="waypoint-pod", impersonate=False) as client:
            assert identity_of((await client.fetch(WAYPOINT)).leaf) == WAYPOINT
            err = await refused(client, WEB)
            assert err.code == grpc.StatusCode.PERMISSION_DENIED
            assert (
                "system:serviceaccount:shop:waypoint (pod shop/waypoint-7d9f) may get only "
                f"its own identity {WAYPOINT}" in str(err)
            )
        async with CaClient(target, token="waypoint-pod", impersonate=True) as client:
            # WEB runs on the waypoint pod's node, but the pod is no node agent
            for asked in (WEB, WAYPOINT):
                err = await refused(client, asked)
                assert err.code == grpc.StatusCode.PERMISSION_DENIED
                assert "is not a node agent and may not send ImpersonatedIdentity" in str(err)

    run(lambda: with_server(ca, kube_auth, body))


def test_kube_node_agent_unchanged(ca: CertificateAuthority, kube_auth: Any) -> None:
    agent = SpiffeId("cluster.local", NS_AGENT, "tether-agent")

    async def body(target: str) -> None:
        async with CaClient(target, token="agent-n1") as client:
            assert identity_of((await client.fetch(WEB)).leaf) == WEB
            assert identity_of((await client.fetch(WAYPOINT)).leaf) == WAYPOINT
            err = await refused(client, DB)
            assert err.code == grpc.StatusCode.PERMISSION_DENIED
            assert f"identity {DB} does not run on node 'n1'" in str(err)
        async with CaClient(target, token="agent-n1", impersonate=False) as client:
            # its own service account, as istiod gives it; a workload's only by impersonation
            assert identity_of((await client.fetch(agent)).leaf) == agent
            err = await refused(client, WEB)
            assert "a node agent names a workload identity in ImpersonatedIdentity" in str(err)
        async with CaClient(target, token="forged", impersonate=False) as client:
            assert (await refused(client, WEB)).code == grpc.StatusCode.UNAUTHENTICATED

    run(lambda: with_server(ca, kube_auth, body))


def test_raw_request_without_metadata_for_own_identity(
    ca: CertificateAuthority, auth_file: Path
) -> None:
    """What a dedicated Envoy/ztunnel sends: a CSR and a token, no metadata Struct at all."""
    request = ca_pb2.IstioCertificateRequest(csr=build_csr(WAYPOINT, generate_key()))

    async def body(target: str) -> Any:
        async with grpc.aio.insecure_channel(target) as channel:
            stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)
            return await stub.CreateCertificate(
                request, metadata=[("authorization", "Bearer token-waypoint")], timeout=10
            )

    response = run(lambda: with_server(ca, StaticAuthenticator.from_file(auth_file), body))
    leaf = load_pem_certificates(list(response.cert_chain)[:1])[0]
    assert identity_of(leaf) == WAYPOINT
