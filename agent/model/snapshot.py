"""The whole mesh at one moment, as a source produces it.  Sources always
hand over a full snapshot, never a partial one, so the state's one writer
can rebuild its views from it alone."""

from __future__ import annotations

import dataclasses
from typing import Any

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
