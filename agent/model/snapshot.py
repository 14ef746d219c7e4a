"""The whole mesh at one moment, as a source produces it.  Sources always
hand over a full snapshot, never a partial one, so the state's one writer
can rebuild its views from it alone."""

from __future__ import annotations

import dataclasses
from typing import Any

from agent.model.waypoint import USE_WAYPOINT_NAMESPACE, Waypoint
from agent.model.workload import DATAPLANE_MODE, USE_WAYPOINT, Service, Workload


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

    def use_waypoint(self, namespace: str, labels: dict[str, str]) -> tuple[str, str] | None:
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
        ref = self.use_waypoint(s.namespace, s.labels)
        wp = self.waypoint_named(*ref) if ref else None
        return wp if wp is not None and wp.serves_services() else None

    def waypoint_of_workload(self, w: Workload) -> Waypoint | None:
        """The waypoint traffic addressed to this pod directly goes through."""
        ref = self.use_waypoint(w.namespace, w.labels)
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

    def waypoint_uses(self) -> list[dict[str, str | None]]:
        """Every namespace, service and workload labelled istio.io/use-waypoint
        (the value `none` opts out): the waypoint the label resolves to
        (`resolved`, None when no such Gateway exists) and what that means
        for its traffic (`status`)."""
        out: list[dict[str, str | None]] = []

        def use(scope: str, name: str, namespace: str, labels: dict[str, str]) -> None:
            wanted = labels.get(USE_WAYPOINT, "none")
            if wanted == "none":
                return
            ns = labels.get(USE_WAYPOINT_NAMESPACE, namespace)
            wp = self.waypoint_named(ns, wanted)
            out.append(
                {
                    "scope": scope,
                    "name": name,
                    "waypoint": wanted,
                    "resolved": wp.key if wp else None,
                    "status": waypoint_status(scope, wp, f"{ns}/{wanted}"),
                }
            )

        for ns, labels in sorted(self.namespaces.items()):
            use("namespace", ns, ns, labels)
        for s in self.services:
            use("service", s.key, s.namespace, s.labels)
        for w in self.workloads:
            use("workload", w.key, w.namespace, w.labels)
        return out


def waypoint_status(scope: str, wp: Waypoint | None, ref: str) -> str:
    """What a use-waypoint label does, in words (status, /config_dump, log)."""
    if wp is None:
        return f"no such waypoint {ref}: traffic goes direct"
    kinds = []
    if scope in ("namespace", "service"):
        kinds.append(("service", wp.serves_services()))
    if scope in ("namespace", "workload"):
        kinds.append(("workload", wp.serves_workloads()))
    via = [k for k, yes in kinds if yes]
    direct = [k for k, yes in kinds if not yes]
    parts = []
    if via:
        if not wp.addresses:
            parts.append(
                f"{' and '.join(via)} traffic goes through waypoint {wp.key}, which has no "
                "address yet: refused until it has one"
            )
        else:
            parts.append(f"{' and '.join(via)} traffic goes through waypoint {wp.key}")
    if direct:
        parts.append(
            f"waypoint {wp.key} is for {wp.traffic_for} traffic: "
            f"{' and '.join(direct)} traffic goes direct"
        )
    return "; ".join(parts)
