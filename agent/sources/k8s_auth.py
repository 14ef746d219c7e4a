"""The CA's Kubernetes authenticator: who is calling (TokenReview of the
caller's service-account token) and whether a node agent may get an identity
(a pod with that service account runs on the agent's node), as istiod's
node authorizer decides it (security/pkg/server/ca/node_auth.go).

A node agent is the tether-agent service account; its node comes from the
bound token's `authentication.kubernetes.io/node-name` extra (Kubernetes
1.30+ puts it in pod-bound tokens), or else from the pod it is bound to.
Any other service account gets its own identity, ns/<namespace>/sa/<name>,
and only that, asked for without impersonation: a pod's bound token (the
API server has checked in the TokenReview that the pod named in its
pod-name/pod-uid extras still exists) serves a dedicated proxy or an Envoy
waypoint running as its own service account.
"""

from __future__ import annotations

import asyncio
from typing import Any

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from agent.identity.server import AuthenticationError, CallContext, Caller, PermissionDeniedError
from agent.identity.spiffe import SpiffeId

NODE_NAME_EXTRA = "authentication.kubernetes.io/node-name"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
SA_PREFIX = "system:serviceaccount:"


class TokenReviewAuthenticator:
    def __init__(
        self,
        api: client.ApiClient,
        trust_domain: str = "cluster.local",
        node_agents: tuple[str, ...] = ("tether-system/tether-agent",),
        audiences: tuple[str, ...] = ("tether-ca",),
    ) -> None:
        self.auth = client.AuthenticationV1Api(api)
        self.core = client.CoreV1Api(api)
        self.trust_domain = trust_domain
        self.node_agents = set(node_agents)
        self.audiences = list(audiences)

    async def authenticate(self, call: CallContext) -> Caller:
        token = call.bearer_token()
        if token is None:
            raise AuthenticationError("no bearer token in the authorization metadata")
        review = client.V1TokenReview(
            spec=client.V1TokenReviewSpec(token=token, audiences=self.audiences or None)
        )
        try:
            res: Any = await asyncio.to_thread(self.auth.create_token_review, review)
        except ApiException as e:
            raise AuthenticationError(f"TokenReview failed: {e.status} {e.reason}") from e
        st = res.status
        if not st or not st.authenticated or not st.user:
            raise AuthenticationError(
                f"token rejected by the API server: "
                f"{getattr(st, 'error', None) or 'not authenticated'}"
            )
        user = st.user.username or ""
        if not user.startswith(SA_PREFIX):
            raise AuthenticationError(f"{user} is not a service account")
        ns, _, sa = user[len(SA_PREFIX) :].partition(":")
        own = frozenset({SpiffeId(self.trust_domain, ns, sa)})
        extra = st.user.extra or {}
        pod = (extra.get(POD_NAME_EXTRA) or [None])[0]
        if f"{ns}/{sa}" not in self.node_agents:
            # Not a node agent: its own identity only (node stays None, so the
            # server refuses ImpersonatedIdentity from it).
            name = f"{user} (pod {ns}/{pod})" if pod else user
            return Caller(name=name, identities=own)
        node = (extra.get(NODE_NAME_EXTRA) or [None])[0]
        if node is None:
            if pod is None:
                raise AuthenticationError(
                    f"{user}: token is not bound to a pod, so its node "
                    "is unknown (use a projected token)"
                )
            p = await asyncio.to_thread(self.core.read_namespaced_pod, pod, ns)
            node = p.spec.node_name if p.spec else None
        return Caller(name=f"{user} on {node}", identities=own, node=node)

    async def authorize_impersonation(self, caller: Caller, identity: SpiffeId) -> None:
        if caller.node is None:
            raise PermissionDeniedError(
                f"{caller.name} is not a node agent "
                f"({', '.join(sorted(self.node_agents))}) and may not request other identities"
            )
        if identity.trust_domain != self.trust_domain:
            raise PermissionDeniedError(
                f"identity {identity} is not in trust domain {self.trust_domain}"
            )
        pods: Any = await asyncio.to_thread(
            self.core.list_namespaced_pod,
            identity.namespace,
            field_selector=f"spec.nodeName={caller.node}",
        )
        for p in pods.items:
            if (
                p.spec.service_account_name or "default"
            ) == identity.service_account and p.status.phase not in ("Succeeded", "Failed"):
                return
        raise PermissionDeniedError(f"identity {identity} does not run on node {caller.node!r}")


def kube_authenticator(
    trust_domain: str, kubeconfig: str | None = None
) -> TokenReviewAuthenticator:
    """For `tether ca --kube`: in-cluster credentials, or a kubeconfig."""
    from agent.sources.k8s import api_client

    return TokenReviewAuthenticator(api_client(kubeconfig), trust_domain)
