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


def orphans(mesh: Mesh, namespace: str, refs: list[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(field, reason) for each targetRef that reaches no waypoint at all, so a
    policy that can never take effect is never silent."""
    snap = mesh.view.snapshot
    out = []
    for i, ref in enumerate(refs):
        kind, group, name = ref.get("kind"), ref.get("group", ""), ref.get("name")
        field = f"spec.targetRefs[{i}]"
        if (ref.get("namespace") or namespace) != namespace:
            out.append(
                (
                    f"{field}.namespace",
                    "a targetRef must name an object in the policy's own namespace: ignored",
                )
            )
        elif kind == "Gateway" and group == GATEWAY_API:
            if snap.waypoint_named(namespace, str(name)) is None:
                out.append((field, f"no waypoint {namespace}/{name} is known: no effect"))
        elif kind == "Service" and group in ("", "core"):
            svc = mesh.resolve(str(name), namespace)
            if svc is None:
                out.append((field, f"no Service {namespace}/{name}: no effect"))
            elif snap.waypoint_of_service(svc) is None:
                out.append(
                    (
                        field,
                        f"Service {namespace}/{name} uses no waypoint, so this "
                        "policy has no effect: label it (or its namespace) "
                        "istio.io/use-waypoint",
                    )
                )
        elif kind != "GatewayClass":
            out.append(
                (
                    field,
                    f"kind {kind} (group {group!r}): a waypoint policy targets a "
                    "Gateway (gateway.networking.k8s.io) or a Service",
                )
            )
    return out
