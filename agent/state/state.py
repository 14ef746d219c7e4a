"""The one proxy state: workloads, services, waypoints and the compiled
policies, as ztunnel's ProxyState.

One writer: `ProxyState.apply(snapshot)`, called with a full snapshot from a
source (the local file or the Kubernetes watchers).  It builds a new
immutable `StateView` (indexes, compiled policies) and swaps it in with one
assignment, so it can run on a worker thread while the data-plane loop keeps
reading the previous view.  Everyone else reads a view: the tunnel (the
outbound decision, L4 authorization), the pod reconciler, `tether status`.
Lookups are dictionary hits; nothing on the connection path scans.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from typing import Any

from agent.identity.spiffe import SpiffeId
from agent.model import (
    GATEWAY_NAME_LABEL,
    Service,
    ServicePort,
    Snapshot,
    Waypoint,
    Workload,
    norm_ip,
)
from agent.policy import Decision, LoadReport, PolicySet, compile_policies


@dataclasses.dataclass(frozen=True)
class StateView:
    """Everything the agent knows at one moment; never changed once built."""

    snapshot: Snapshot
    trust_domain: str
    policies: PolicySet
    policy_report: LoadReport
    by_ip: Mapping[str, Workload]
    by_key: Mapping[str, Workload]
    vips: Mapping[tuple[str, int], tuple[Service, ServicePort]]
    selected: Mapping[str, tuple[Workload, ...]]  # service key -> workloads its selector picks
    generation: int = 0
    # Waypoints.  service key -> the waypoint its service traffic goes through;
    # workload key -> the waypoint traffic to the pod's own address goes through.
    service_waypoint: Mapping[str, Waypoint] = dataclasses.field(default_factory=dict)
    workload_waypoint: Mapping[str, Waypoint] = dataclasses.field(default_factory=dict)
    # "service ns/name" | "workload ns/name" -> the waypoint its label names
    # that does not exist ("ns/name"): its traffic goes direct, and is reported.
    missing_waypoint: Mapping[str, str] = dataclasses.field(default_factory=dict)
    # waypoint address (and its pods' addresses) -> the waypoint
    waypoint_by_ip: Mapping[str, Waypoint] = dataclasses.field(default_factory=dict)
    # workload key -> the waypoints whose traffic it must come through (the
    # waypoint of a service selecting it, its own waypoint for workload traffic)
    guards: Mapping[str, tuple[Waypoint, ...]] = dataclasses.field(default_factory=dict)
    # agent.tunnel.context.authorize's decisions made with this view (never
    # copied by dataclasses.replace: a new view starts empty)
    authz_cache: dict[tuple[Any, ...], tuple[Workload, Decision]] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    @property
    def node(self) -> str:
        return self.snapshot.node

    def identity_of(self, w: Workload) -> SpiffeId:
        return SpiffeId(self.trust_domain, w.namespace, w.service_account)

    def identity_of_waypoint(self, wp: Waypoint) -> SpiffeId:
        return SpiffeId(self.trust_domain, wp.namespace, wp.account)

    def waypoint_at(self, ip: str) -> Waypoint | None:
        """The waypoint at this address (its own, or one of its pods')."""
        try:
            return self.waypoint_by_ip.get(norm_ip(ip))
        except ValueError:
            return None

    def is_waypoint(self, w: Workload) -> bool:
        """Is this workload a waypoint's pod?"""
        return any(self.waypoint_at(a) is not None for a in w.addresses)

    def guarded_by(self, w: Workload) -> tuple[Waypoint, ...]:
        """The waypoints mesh traffic to this workload must come through
        (empty: none; any mesh peer may reach it, as policy allows)."""
        return self.guards.get(w.key, ())

    def workload_by_ip(self, ip: str) -> Workload | None:
        try:
            return self.by_ip.get(norm_ip(ip))
        except ValueError:
            return None

    def captured(self, w: Workload) -> bool:
        """Does a mesh node capture this workload (so it speaks HBONE)?"""
        return self.snapshot.enrolled(w)

    def local_enrolled(self) -> list[Workload]:
        return self.snapshot.local_enrolled()

    def endpoints(self, s: Service) -> tuple[Workload, ...]:
        return self.selected.get(s.key, ())

    def describe(self) -> dict[str, Any]:
        snap = self.snapshot
        return {
            "node": snap.node,
            "generation": self.generation,
            "trust_domain": self.trust_domain,
            "workloads": [
                {
                    "name": w.key,
                    "node": w.node,
                    "addresses": list(w.addresses),
                    "identity": self.identity_of(w).uri,
                    "captured": self.captured(w),
                }
                for w in snap.workloads
            ],
            "services": [
                {
                    "name": s.key,
                    "addresses": list(s.addresses),
                    "ports": [{"port": p.port, "targetPort": p.target_port} for p in s.ports],
                    "endpoints": [e.address for e in s.endpoints]
                    if s.endpoints is not None
                    else [w.key for w in self.endpoints(s)],
                }
                for s in snap.services
            ],
            "waypoints": [
                {
                    "name": wp.key,
                    "addresses": list(wp.addresses),
                    "service_addresses": list(wp.service_addresses),
                    "node": wp.node,
                    "identity": self.identity_of_waypoint(wp).uri,
                    "for": wp.traffic_for,
                    "guards": sorted(k for k, wps in self.guards.items() if wp in wps),
                }
                for wp in snap.waypoints
            ],
        }


@dataclasses.dataclass(frozen=True)
class Change:
    """What an apply changed, for the reconciler."""

    view: StateView
    policies_changed: bool
    guards_changed: bool = False  # which pods take traffic only from a waypoint


def build_view(
    snapshot: Snapshot, trust_domain: str, previous: StateView | None, generation: int
) -> StateView:
    """A new view from a snapshot (pure; the expensive part, policy
    compilation, happens here, off the data-plane loop)."""
    by_ip: dict[str, Workload] = {}
    for w in snapshot.workloads:
        for a in w.addresses:
            by_ip[norm_ip(a)] = w
    vips: dict[tuple[str, int], tuple[Service, ServicePort]] = {}
    selected: dict[str, tuple[Workload, ...]] = {}
    for s in snapshot.services:
        for vip in s.addresses:
            for p in s.ports:
                vips[(norm_ip(vip), p.port)] = (s, p)
        if s.endpoints is None:
            selected[s.key] = tuple(
                w
                for w in snapshot.workloads
                if w.namespace == s.namespace
                and w.addresses
                and all(w.labels.get(k) == v for k, v in s.selector.items())
            )
    wps = _waypoint_indexes(snapshot, by_ip, selected)
    if previous is not None and previous.snapshot.policies == snapshot.policies:
        policies, report = previous.policies, previous.policy_report
    else:
        policies, report = compile_policies(
            snapshot.policies, previous.policies if previous is not None else None
        )
    return StateView(
        snapshot,
        trust_domain,
        policies,
        report,
        by_ip,
        {w.key: w for w in snapshot.workloads},
        vips,
        selected,
        generation,
        **wps,
    )


def _waypoint_indexes(
    snapshot: Snapshot,
    by_ip: Mapping[str, Workload],
    selected: Mapping[str, tuple[Workload, ...]],
) -> dict[str, Any]:
    service_wp: dict[str, Waypoint] = {}
    workload_wp: dict[str, Waypoint] = {}
    missing: dict[str, str] = {}
    guards: dict[str, list[Waypoint]] = {}

    def guard(w: Workload, wp: Waypoint) -> None:
        have = guards.setdefault(w.key, [])
        if wp not in have:
            have.append(wp)

    for s in snapshot.services:
        ref = snapshot.use_waypoint(s.namespace, s.labels)
        if ref is None:
            continue
        wp = snapshot.waypoint_named(*ref)
        if wp is None:
            missing[f"service {s.key}"] = "/".join(ref)
            continue
        if not wp.serves_services():
            continue
        service_wp[s.key] = wp
        if s.endpoints is not None:
            members = [by_ip.get(norm_ip(e.address)) for e in s.endpoints]
        else:
            members = list(selected.get(s.key, ()))
        for m in members:
            if m is not None:
                guard(m, wp)
    for w in snapshot.workloads:
        ref = snapshot.use_waypoint(w.namespace, w.labels)
        if ref is None:
            continue
        wp = snapshot.waypoint_named(*ref)
        if wp is None:
            missing[f"workload {w.key}"] = "/".join(ref)
        elif wp.serves_workloads():
            workload_wp[w.key] = wp
            guard(w, wp)
    at: dict[str, Waypoint] = {}
    for wp in snapshot.waypoints:
        for a in (*wp.addresses, *wp.service_addresses):
            at[norm_ip(a)] = wp
    for w in snapshot.workloads:  # its pods, as Istio labels them
        name = w.labels.get(GATEWAY_NAME_LABEL)
        wp = snapshot.waypoint_named(w.namespace, name) if name else None
        if wp is not None:
            for a in w.addresses:
                at.setdefault(norm_ip(a), wp)
    # a waypoint's own pods are never guarded by a waypoint (no loop)
    for w in snapshot.workloads:
        if any(norm_ip(a) in at for a in w.addresses):
            guards.pop(w.key, None)
    return {
        "service_waypoint": service_wp,
        "workload_waypoint": workload_wp,
        "missing_waypoint": missing,
        "waypoint_by_ip": at,
        "guards": {k: tuple(v) for k, v in guards.items()},
    }


class ProxyState:
    """Holds the current view; `apply` is the only way to change it."""

    def __init__(self, node: str, trust_domain: str = "cluster.local") -> None:
        self.trust_domain = trust_domain
        self._lock = threading.Lock()  # serialises writers; readers never wait
        self._view = build_view(Snapshot(node), trust_domain, None, 0)

    @property
    def view(self) -> StateView:
        return self._view

    def apply(self, snapshot: Snapshot) -> Change:
        """Install a full snapshot.  Safe on a worker thread: readers see the
        old view or the new one, never a mix."""
        with self._lock:
            old = self._view
            view = build_view(snapshot, self.trust_domain, old, old.generation + 1)
            self._view = view
        return Change(
            view,
            policies_changed=view.policies is not old.policies,
            guards_changed=view.guards != old.guards,
        )
