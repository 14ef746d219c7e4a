"""The whole mesh at one moment, as a source produces it.  Sources always
hand over a full snapshot, never a partial one, so the state's one writer
can rebuild its views from it alone."""

from __future__ import annotations

import dataclasses
from typing import Any

from agent.model.waypoint import USE_WAYPOINT_NAMESPACE, Waypoint
from agent.model.workload import (
    DATAPLANE_MODE,
    USE_WAYPOINT,
    WAYPOINT_NOT_APPLIED,
    Service,
    Workload,
)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    node: str  # the node whose agent reads this (its local workloads have netns/cgroup)
    namespaces: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)  # labels
    workloads: tuple[Workload, ...] = ()
    services: tuple[Service, ...] = ()
    # Istio (and other) documents as given; anything that is not a mapping is
    # kept too, for the policy loader to report and fail closed on.
    policies: tuple[Any, ...] = ()
    waypoints: tuple[Waypoint, ...] = ()

    def waypoint_named(self, namespace: str, name: str) -> Waypoint | None:
        for wp in self.waypoints:
            if wp.namespace == namespace and wp.name == name:
                return wp
        return None

    def _use_waypoint(self, namespace: str, labels: dict[str, str]) -> tuple[str, str] | None:
        """(namespace, name) the object's own istio.io/use-waypoint label names,
        else its namespace's; None if neither asks or `none` opts out."""
        for lab in (labels, self.namespaces.get(namespace, {})):
            name = lab.get(USE_WAYPOINT)
            if name is not None:
                if name == "none":
                    return None
                return lab.get(USE_WAYPOINT_NAMESPACE, namespace), name
        return None

    def waypoint_of_service(self, s: Service) -> Waypoint | None:
        """The waypoint traffic addressed to this service goes through."""
        ref = self._use_waypoint(s.namespace, s.labels)
        wp = self.waypoint_named(*ref) if ref else None
        return wp if wp is not None and wp.serves_services() else None

    def waypoint_of_workload(self, w: Workload) -> Waypoint | None:
        """The waypoint traffic addressed to this pod directly goes through."""
        ref = self._use_waypoint(w.namespace, w.labels)
        wp = self.waypoint_named(*ref) if ref else None
        return wp if wp is not None and wp.serves_workloads() else None

    def enrolled(self, w: Workload) -> bool:
        """Istio ambient's rule: the pod's label wins (`none` opts out), else
        its namespace's."""
        mode = w.labels.get(DATAPLANE_MODE)
        if mode == "none":
            return False
        if mode == "ambient":
            return True
        return self.namespaces.get(w.namespace, {}).get(DATAPLANE_MODE) == "ambient"

    def local_enrolled(self) -> list[Workload]:
        return [w for w in self.workloads if w.node == self.node and self.enrolled(w)]

    def waypoint_uses(self) -> list[dict[str, str]]:
        """Every namespace, service and workload labelled istio.io/use-waypoint
        (the value `none` opts out), with what tether does about it."""
        out = []
        for ns, labels in sorted(self.namespaces.items()):
            if labels.get(USE_WAYPOINT, "none") != "none":
                out.append({"scope": "namespace", "name": ns, "waypoint": labels[USE_WAYPOINT]})
        for s in self.services:
            if s.labels.get(USE_WAYPOINT, "none") != "none":
                out.append({"scope": "service", "name": s.key, "waypoint": s.labels[USE_WAYPOINT]})
        for w in self.workloads:
            if w.labels.get(USE_WAYPOINT, "none") != "none":
                out.append({"scope": "workload", "name": w.key, "waypoint": w.labels[USE_WAYPOINT]})
        return [{**u, "status": WAYPOINT_NOT_APPLIED} for u in out]
