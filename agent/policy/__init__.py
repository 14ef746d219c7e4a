"""Istio security policy (AuthorizationPolicy, PeerAuthentication) as the node enforces it.

- ``model``: connections, decisions and the typed documents;
- ``parse``: validation as the Istio API would do it;
- ``attach``: which workloads a policy reaches;
- ``l4``: istiod's L4 translation and ztunnel's matcher;
- ``peerauth``: the mTLS mode of a workload and port;
- ``hints``: what to use instead of other meshes' kinds;
- ``policyset``: the immutable compiled set and its decisions;
- ``load``: ``compile_policies``, documents in, PolicySet and LoadReport out.
"""

from agent.policy.l4 import CompiledPolicy, compile_policy
from agent.policy.load import LoadReport, Rejected, Skipped, compile_policies
from agent.policy.model import (
    DEFAULT_ROOT_NAMESPACE,
    Action,
    AuthorizationPolicy,
    Conn,
    Decision,
    Enforcement,
    Mode,
    PeerAuthentication,
    PolicyError,
    Scope,
    WorkloadLike,
    WorkloadRef,
)
from agent.policy.parse import document_label, parse_authorization_policy, parse_peer_authentication
from agent.policy.policyset import Guard, PolicySet

__all__ = [
    "DEFAULT_ROOT_NAMESPACE",
    "Action",
    "AuthorizationPolicy",
    "CompiledPolicy",
    "Conn",
    "Decision",
    "Enforcement",
    "Guard",
    "LoadReport",
    "Mode",
    "PeerAuthentication",
    "PolicyError",
    "PolicySet",
    "Rejected",
    "Scope",
    "Skipped",
    "WorkloadLike",
    "WorkloadRef",
    "compile_policies",
    "compile_policy",
    "document_label",
    "parse_authorization_policy",
    "parse_peer_authentication",
]
