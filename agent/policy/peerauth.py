"""PeerAuthentication: the mTLS mode of a workload and port, as istiod resolves it.

Levels go mesh (root namespace, no selector) < namespace < workload (selector
with labels) < port (``portLevelMtls``); UNSET inherits from the level above and
PERMISSIVE is the default.  With several policies at one level the oldest wins.
STRICT is enforced the way istiod tells ztunnel to: as a DENY of connections
that carry no peer identity.  ztunnel cannot turn mTLS off for HBONE, so
DISABLE behaves as PERMISSIVE on the node.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Sequence

from agent.policy.model import Mode, PeerAuthentication, WorkloadLike, WorkloadRef

Levels = tuple[PeerAuthentication | None, PeerAuthentication | None, PeerAuthentication | None]


def oldest(candidates: Iterable[PeerAuthentication]) -> PeerAuthentication | None:
    """istiod's conflict rule: the oldest policy wins; without timestamps, the first name."""
    far = datetime.datetime.max.replace(tzinfo=datetime.UTC)
    ordered = sorted(candidates, key=lambda p: (p.created or far, p.namespace, p.name))
    return ordered[0] if ordered else None


def mtls_levels(peers: Sequence[PeerAuthentication], root: str, workload: WorkloadLike) -> Levels:
    """The deciding policy at the mesh, namespace and workload level (None where unset)."""
    mesh = oldest(p for p in peers if p.namespace == root and not p.is_workload_level)
    ns = oldest(
        p for p in peers if p.namespace == workload.namespace != root and not p.is_workload_level
    )
    labels = workload.labels
    # istiod (convertedSelectorPeerAuthentications) ignores selector policies in the
    # root namespace for ambient workloads.
    wl = oldest(
        p
        for p in peers
        if p.namespace == workload.namespace != root
        and p.is_workload_level
        and all(labels.get(k) == v for k, v in p.selector or ())
    )
    return mesh, ns, wl


def resolve_mtls(
    peers: Sequence[PeerAuthentication], root: str, workload: WorkloadLike, port: int | None
) -> tuple[Mode, PeerAuthentication | None]:
    """Effective mode and the policy that set it (None: Istio's default, PERMISSIVE)."""
    mode, source = Mode.PERMISSIVE, None
    mesh, ns, wl = mtls_levels(peers, root, workload)
    for pa in (mesh, ns, wl):
        if pa is not None and pa.mode is not Mode.UNSET:
            mode, source = pa.mode, pa
    if wl is not None and port is not None:
        port_mode = wl.port_mode(port)
        if port_mode is not Mode.UNSET:
            mode, source = port_mode, wl
    return mode, source


def inherited_mode(
    peers: Sequence[PeerAuthentication], root: str, namespace: str
) -> tuple[Mode, PeerAuthentication | None]:
    """The mode a namespace's workloads get before any workload-level policy."""
    mode, source = Mode.PERMISSIVE, None
    mesh, ns, _ = mtls_levels(peers, root, WorkloadRef(namespace))
    for pa in (mesh, ns):
        if pa is not None and pa.mode is not Mode.UNSET:
            mode, source = pa.mode, pa
    return mode, source


def peer_notes(peers: Sequence[PeerAuthentication], root: str, pa: PeerAuthentication) -> list[str]:
    """What a user should know about one PeerAuthentication (for /config_dump)."""
    notes: list[str] = []
    if pa.namespace == root and pa.is_workload_level:
        notes.append(
            "selector policy in the root namespace: ignored for ambient workloads "
            "(istiod does the same)"
        )
    if pa.mode is Mode.DISABLE or any(m is Mode.DISABLE for _, m in pa.port_modes):
        notes.append("DISABLE acts as PERMISSIVE on the node: plaintext and mTLS accepted")
    if pa.is_workload_level and pa.mode is not Mode.UNSET:
        inherited, parent = inherited_mode(peers, root, pa.namespace)
        if inherited is pa.mode and parent is not None:
            notes.append(
                f"mode {pa.mode.value} repeats the namespace/mesh mode set by {parent.key}"
            )
    for port, mode in pa.port_modes:
        if mode is pa.mode and mode is not Mode.UNSET:
            notes.append(f"portLevelMtls {port}: {mode.value} repeats the workload mode")
    if not pa.is_workload_level:
        level = [p for p in peers if p.namespace == pa.namespace and not p.is_workload_level]
        winner = oldest(level)
        if winner is not None and winner.key != pa.key:
            notes.append(f"shadowed by {winner.key}: with several, the oldest policy wins")
    return notes
