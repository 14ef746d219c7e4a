"""k8s tier: `tether ca`'s Kubernetes authenticator against a real API server.

A node agent's pod-bound service-account token is checked with TokenReview;
the agent may get the identity of a workload only if a pod with that service
account runs on the agent's node (istiod's node authorizer rule).  Any other
service account may get only its own identity.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from agent.identity.server import CallContext, PermissionDeniedError
from agent.identity.spiffe import SpiffeId


def _pod(core: Any, ns: str, name: str, node: str, sa: str) -> Any:
    pod = core.create_namespaced_pod(
        ns,
        {
            "metadata": {"name": name},
            "spec": {
                "nodeName": node,
                "serviceAccountName": sa,
                "containers": [{"name": "c", "image": "stand-in"}],
            },
        },
    )
    core.patch_namespaced_pod_status(name, ns, {"status": {"phase": "Running"}})
    return pod


def test_token_review_and_node_placement(k8s_cluster: Any, k8s_namespace: str) -> None:
    from kubernetes import client

    from agent.sources.k8s_auth import TokenReviewAuthenticator

    ns = k8s_namespace
    core = client.CoreV1Api(k8s_cluster.api_client())
    for sa in ("agent", "web", "db"):
        core.create_namespaced_service_account(ns, {"metadata": {"name": sa}})
    agent_pod = _pod(core, ns, "tether-agent-n1", "n1", "agent")
    _pod(core, ns, "web-1", "n1", "web")
    _pod(core, ns, "db-1", "n2", "db")

    auth = TokenReviewAuthenticator(
        k8s_cluster.api_client(),
        "cluster.local",
        node_agents=(f"{ns}/agent",),
        audiences=("tether-ca",),
    )

    def call(token: str) -> CallContext:
        return CallContext({"authorization": f"Bearer {token}"})

    async def run() -> None:
        token = k8s_cluster.service_account_token(
            ns,
            "agent",
            audiences=["tether-ca"],
            bound_pod=(agent_pod.metadata.name, agent_pod.metadata.uid),
        )
        caller = await auth.authenticate(call(token))
        assert caller.node == "n1", caller
        await auth.authorize_impersonation(caller, SpiffeId("cluster.local", ns, "web"))
        with pytest.raises(PermissionDeniedError, match="does not run on node 'n1'"):
            await auth.authorize_impersonation(caller, SpiffeId("cluster.local", ns, "db"))
        with pytest.raises(PermissionDeniedError, match="trust domain"):
            await auth.authorize_impersonation(caller, SpiffeId("evil.local", ns, "web"))

        # a workload's own token: its own identity, never another's
        web_token = k8s_cluster.service_account_token(ns, "web", audiences=["tether-ca"])
        web = await auth.authenticate(call(web_token))
        assert web.node is None
        assert web.identities == frozenset({SpiffeId("cluster.local", ns, "web")})
        with pytest.raises(PermissionDeniedError):
            await auth.authorize_impersonation(web, SpiffeId("cluster.local", ns, "db"))

        # a token for another audience is refused
        from agent.identity.server import AuthenticationError

        other = k8s_cluster.service_account_token(ns, "agent", audiences=["somebody-else"])
        with pytest.raises(AuthenticationError):
            await auth.authenticate(call(other))

    asyncio.run(run())


def test_pod_token_gets_its_own_identity_through_grpc(k8s_cluster: Any, k8s_namespace: str) -> None:
    """A pod that is not a node agent (an Envoy waypoint running as its own service
    account) calls with its pod-bound token and no ImpersonatedIdentity: it gets
    ns/<namespace>/sa/<its service account> and nothing else.  The node agent
    still impersonates only identities on its node."""
    from kubernetes import client

    from agent.identity.ca import CertificateAuthority
    from agent.identity.client import CaClient, CaClientError
    from agent.identity.server import CaServer
    from agent.identity.svid import identity_of
    from agent.sources.k8s_auth import TokenReviewAuthenticator

    ns = k8s_namespace
    core = client.CoreV1Api(k8s_cluster.api_client())
    for sa in ("agent", "web", "waypoint"):
        core.create_namespaced_service_account(ns, {"metadata": {"name": sa}})
    agent_pod = _pod(core, ns, "tether-agent-n1", "n1", "agent")
    _pod(core, ns, "web-1", "n1", "web")
    waypoint_pod = _pod(core, ns, "waypoint-1", "n1", "waypoint")
    waypoint = SpiffeId("cluster.local", ns, "waypoint")
    web = SpiffeId("cluster.local", ns, "web")

    def token(sa: str, pod: Any) -> str:
        return str(
            k8s_cluster.service_account_token(
                ns, sa, audiences=["tether-ca"], bound_pod=(pod.metadata.name, pod.metadata.uid)
            )
        )

    waypoint_token = token("waypoint", waypoint_pod)
    agent_token = token("agent", agent_pod)
    ca = CertificateAuthority.generate("cluster.local")
    auth = TokenReviewAuthenticator(
        k8s_cluster.api_client(), "cluster.local", node_agents=(f"{ns}/agent",)
    )

    async def run() -> None:
        server = CaServer(ca, auth)
        target = f"127.0.0.1:{await server.start('127.0.0.1:0')}"
        try:
            async with CaClient(target, token=waypoint_token, impersonate=False) as c:
                assert identity_of((await c.fetch(waypoint)).leaf) == waypoint
                with pytest.raises(CaClientError, match="may get only its own identity") as info:
                    await c.fetch(web)
                assert "PERMISSION_DENIED" in str(info.value)
                assert f"pod {ns}/waypoint-1" in str(info.value)
            async with CaClient(target, token=waypoint_token, impersonate=True) as c:
                # web runs on the waypoint's node, but the waypoint is no node agent
                with pytest.raises(CaClientError, match="is not a node agent") as info:
                    await c.fetch(web)
                assert "PERMISSION_DENIED" in str(info.value)
            async with CaClient(target, token=agent_token) as c:
                assert identity_of((await c.fetch(web)).leaf) == web
        finally:
            await server.stop(grace=None)

    asyncio.run(asyncio.wait_for(run(), timeout=60))
