"""Which scope of a waypoint a security document attached by ``targetRefs``
reaches: the whole waypoint (the Gateway, or the istio-waypoint GatewayClass
from the root namespace) or one of its services."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.model.waypoint import WAYPOINT_CLASS
from agent.policy.model import DEFAULT_ROOT_NAMESPACE
from waypoint.translate.mesh import GATEWAY_API, Mesh

GATEWAY = "*"  # the scope of every chain of the waypoint


def raw_target_refs(spec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    refs: list[Any] = []
    if isinstance(spec.get("targetRef"), Mapping):
        refs.append(spec["targetRef"])
    if isinstance(spec.get("targetRefs"), list):
        refs.extend(spec["targetRefs"])
    return [r for r in refs if isinstance(r, Mapping)]


def scopes(mesh: Mesh, namespace: str, refs: list[Mapping[str, Any]]) -> set[str]:
    """GATEWAY and/or the keys of this waypoint's services the refs name."""
    wp = mesh.waypoint
    served = {s.key for s in mesh.services}
    out: set[str] = set()
    for ref in refs:
        kind, group, name = ref.get("kind"), ref.get("group", ""), ref.get("name")
        ns = ref.get("namespace") or namespace
        if ns != namespace:
            continue  # Istio: a targetRef reaches only the policy's own namespace
        if kind == "Gateway" and group == GATEWAY_API:
            if name == wp.name and namespace == wp.namespace:
                out.add(GATEWAY)
        elif kind == "GatewayClass" and group == GATEWAY_API:
            if name == WAYPOINT_CLASS and namespace == DEFAULT_ROOT_NAMESPACE:
                out.add(GATEWAY)
        elif kind == "Service" and group in ("", "core"):
            key = f"{namespace}/{name}"
            if key in served:
                out.add(key)
    return out
