"""The compiled set of policies the node enforces, and the decisions it makes.

A PolicySet is immutable: ``compile_policies`` builds a new one (off the event
loop if it likes) and the owner swaps it in atomically; readers never see a
half-built set and need no lock.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from agent.policy.attach import Reach
from agent.policy.l4 import CompiledPolicy
from agent.policy.model import (
    AUTHORIZATION_POLICY,
    DEFAULT_ROOT_NAMESPACE,
    PEER_AUTHENTICATION,
    Action,
    Conn,
    Decision,
    Mode,
    PeerAuthentication,
    WorkloadLike,
)
from agent.policy.peerauth import peer_notes, resolve_mtls


@dataclasses.dataclass(frozen=True)
class Guard:
    """What stands in for a policy that could not be applied (see ``agent.policy.load``):
    for an AuthorizationPolicy a deny-all, for a PeerAuthentication a refusal of
    plaintext, over ``reaches``, until the document is fixed or deleted."""

    kind: str
    key: str  # namespace/name, or the document label when the name is unreadable
    document: str
    reaches: tuple[Reach, ...]
    reason: str
    # The last good version of this key, kept across loads while it stays broken.
    last_good: CompiledPolicy | PeerAuthentication | None = None

    def applies_to(self, workload: WorkloadLike, root_namespace: str) -> bool:
        return any(r.reaches(workload, root_namespace) for r in self.reaches)


@dataclasses.dataclass(frozen=True)
class PolicySet:
    """Every valid Istio security policy the node knows, in key order, and what was refused."""

    root_namespace: str = DEFAULT_ROOT_NAMESPACE
    authorization_policies: tuple[CompiledPolicy, ...] = ()
    peer_authentications: tuple[PeerAuthentication, ...] = ()
    # document label -> every error found in it
    rejected: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # document label -> why it is not applied, and what to use instead
    skipped: tuple[tuple[str, str], ...] = ()
    # fail-closed stand-ins for documents that could not be applied
    guards: tuple[Guard, ...] = ()

    def guards_for(self, workload: WorkloadLike, kind: str) -> tuple[Guard, ...]:
        root = self.root_namespace
        return tuple(g for g in self.guards if g.kind == kind and g.applies_to(workload, root))

    def policies_for(self, workload: WorkloadLike) -> tuple[CompiledPolicy, ...]:
        """AuthorizationPolicies the node enforces for a workload, in key order."""
        return tuple(p for p in self.authorization_policies if p.applies_to(workload))

    def evaluate(self, conn: Conn) -> Decision:
        """ztunnel's assert_rbac: any matching DENY denies; then ALLOW policies, if any apply,
        must match; otherwise allow.  Order of loading never changes the answer."""
        wl = conn.dst
        if conn.src_principal is None:
            for guard in self.guards_for(wl, PEER_AUTHENTICATION):
                return Decision(False, guard.key, f"plaintext connection refused: {guard.reason}")
            mode, source = self._resolve_mtls(wl, conn.dst_port)
            if mode is Mode.STRICT:
                # istiod sends STRICT as a DENY policy with notPrincipals ["*"].
                name = source.key if source is not None else None
                return Decision(
                    False,
                    name,
                    f"plaintext connection refused: PeerAuthentication {name} sets mTLS "
                    f"STRICT for port {conn.dst_port}",
                )
        for guard in self.guards_for(wl, AUTHORIZATION_POLICY):
            return Decision(False, guard.key, f"denied: {guard.reason}")
        applicable = self.policies_for(wl)
        for pol in applicable:
            if pol.policy.action is Action.DENY:
                rule = pol.first_match(conn)
                if rule is not None:
                    return Decision(
                        False, pol.key, f"denied by DENY policy {pol.key} rule {rule.index}"
                    )
        allows = [p for p in applicable if p.policy.action is Action.ALLOW]
        if not allows:
            return Decision(True, None, "no ALLOW policy applies to the workload; allowed")
        for pol in allows:
            rule = pol.first_match(conn)
            if rule is not None:
                return Decision(
                    True, pol.key, f"allowed by ALLOW policy {pol.key} rule {rule.index}"
                )
        keys = [p.key for p in allows]
        return Decision(
            False,
            keys[0] if len(keys) == 1 else None,
            f"no ALLOW policy matched (in force: {', '.join(keys)})",
        )

    def _resolve_mtls(
        self, workload: WorkloadLike, port: int | None
    ) -> tuple[Mode, PeerAuthentication | None]:
        return resolve_mtls(self.peer_authentications, self.root_namespace, workload, port)

    def mtls_mode(self, workload: WorkloadLike, port: int | None = None) -> Mode:
        """Effective mode: mesh < namespace < workload < port, UNSET inherits; PERMISSIVE if
        nothing is set.  Without a port, the workload-level mode."""
        if self.guards_for(workload, PEER_AUTHENTICATION):
            return Mode.STRICT
        return self._resolve_mtls(workload, port)[0]

    def plaintext_allowed(self, workload: WorkloadLike, port: int) -> bool:
        """STRICT refuses plaintext; PERMISSIVE and DISABLE accept it (ztunnel cannot turn
        mTLS off for HBONE, so DISABLE behaves as PERMISSIVE on the node)."""
        return self.mtls_mode(workload, port) is not Mode.STRICT

    def describe(self) -> dict[str, Any]:
        """Everything the node enforces and why, JSON-able, for /config_dump."""
        root = self.root_namespace
        authz = []
        for cp in self.authorization_policies:
            p = cp.policy
            authz.append(
                {
                    "key": p.key,
                    "namespace": p.namespace,
                    "name": p.name,
                    "apiVersion": p.api_version,
                    "action": p.action.value,
                    "scope": cp.scope.value,
                    "selector": p.match_labels,
                    "targetRefs": [dataclasses.asdict(r) for r in p.target_refs],
                    "enforcement": cp.enforcement.value,
                    "rules": [r.to_dict() for r in cp.rules],
                    "notes": list(cp.notes),
                }
            )
        peers = self.peer_authentications
        peer = [
            {
                "key": pa.key,
                "namespace": pa.namespace,
                "name": pa.name,
                "level": (
                    "workload"
                    if pa.is_workload_level
                    else "mesh"
                    if pa.namespace == root
                    else "namespace"
                ),
                "selector": None if pa.selector is None else dict(pa.selector),
                "mode": pa.mode.value,
                "portLevelMtls": {str(port): mode.value for port, mode in pa.port_modes},
                "notes": peer_notes(peers, root, pa),
            }
            for pa in peers
        ]
        return {
            "rootNamespace": root,
            "authorizationPolicies": authz,
            "peerAuthentications": peer,
            "rejected": {k: list(v) for k, v in self.rejected},
            "skipped": dict(self.skipped),
            "failClosed": [
                {
                    "document": g.document,
                    "kind": g.kind,
                    "key": g.key,
                    "reaches": [r.describe(root) for r in g.reaches],
                    "reason": g.reason,
                }
                for g in self.guards
            ],
        }
