"""Kinds the node does not handle (Linkerd, SMI, Consul, Istio networking and Gateway
API kinds, Kubernetes kinds): say why nothing is applied, and what to write instead."""

from __future__ import annotations

from collections.abc import Mapping

from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN
from agent.policy.model import AUTHORIZATION_POLICY, PEER_AUTHENTICATION, SECURITY_GROUP


def _principal(namespace: str, account: str) -> str:
    return f"{DEFAULT_TRUST_DOMAIN}/ns/{namespace}/sa/{account}"


def get_str(m: object, key: str) -> str:
    if isinstance(m, Mapping):
        value = m.get(key)
        if isinstance(value, str):
            return value
    return ""


def _list_of_maps(value: object) -> list[Mapping[str, object]]:
    return [v for v in value if isinstance(v, Mapping)] if isinstance(value, list) else []


def _traffic_target_hint(doc: Mapping[str, object], namespace: str) -> str:
    spec = doc.get("spec")
    principals = [
        _principal(get_str(s, "namespace") or namespace, get_str(s, "name"))
        for s in _list_of_maps(spec.get("sources") if isinstance(spec, Mapping) else None)
        if get_str(s, "kind") == "ServiceAccount" and get_str(s, "name")
    ]
    dest = spec.get("destination") if isinstance(spec, Mapping) else None
    dest_sa = get_str(dest, "name")
    text = (
        f"use an Istio AuthorizationPolicy (security.istio.io/v1) in namespace {namespace}, "
        "action ALLOW"
    )
    if principals:
        text += f", rules[].from[].source.principals {principals}"
    if dest_sa:
        text += (
            f", selecting the pods that run as service account {dest_sa!r} by their labels "
            "(selectors match labels, not service accounts)"
        )
    return text + "; HTTPRouteGroup matches become to[].operation paths/methods on a waypoint"


def _intentions_hint(doc: Mapping[str, object], namespace: str) -> str:
    spec = doc.get("spec")
    dest = get_str(spec.get("destination") if isinstance(spec, Mapping) else None, "name")
    allow: list[str] = []
    deny: list[str] = []
    for s in _list_of_maps(spec.get("sources") if isinstance(spec, Mapping) else None):
        name = get_str(s, "name")
        if not name or name == "*":
            continue
        target = allow if get_str(s, "action") == "allow" else deny
        target.append(_principal(get_str(s, "namespace") or namespace, name))
    text = f"use an Istio AuthorizationPolicy (security.istio.io/v1) in namespace {namespace}" + (
        f" selecting the {dest!r} pods by label" if dest else ""
    )
    if allow:
        text += f": ALLOW from.source.principals {allow}"
    if deny:
        text += f"; a DENY policy for {deny}"
    return (
        text + " (Consul service names taken as Kubernetes service accounts; a '*' deny "
        "source is Istio's default once an ALLOW policy selects the workload)"
    )


_AP_INSTEAD = "use an Istio AuthorizationPolicy (security.istio.io/v1)"
_STATIC_HINTS: dict[tuple[str, str], str] = {
    ("linkerd.io", "ServiceProfile"): (
        "Linkerd ServiceProfile routes, retries and timeouts are L7: use an Istio "
        "VirtualService or HTTPRoute served by a waypoint; for access control "
        f"{_AP_INSTEAD}"
    ),
    ("policy.linkerd.io", "Server"): f"{_AP_INSTEAD} with to[].operation.ports",
    ("policy.linkerd.io", "ServerAuthorization"): (
        f"{_AP_INSTEAD}: meshTLS identities become from[].source.principals, networks "
        "become from[].source.ipBlocks"
    ),
    ("policy.linkerd.io", "AuthorizationPolicy"): (
        f"{_AP_INSTEAD}; the Linkerd kind of the same name is not read"
    ),
    ("policy.linkerd.io", "MeshTLSAuthentication"): (
        f"{_AP_INSTEAD} with from[].source.principals"
    ),
    ("policy.linkerd.io", "NetworkAuthentication"): f"{_AP_INSTEAD} with from[].source.ipBlocks",
    ("specs.smi-spec.io", "HTTPRouteGroup"): (
        f"{_AP_INSTEAD} attached to a waypoint, with to[].operation methods/paths"
    ),
    ("split.smi-spec.io", "TrafficSplit"): (
        "use an Istio VirtualService (route weights) or an HTTPRoute (backendRefs weights)"
    ),
    ("consul.hashicorp.com", "ServiceDefaults"): (
        "use a PeerAuthentication for the mTLS mode and a DestinationRule for connection settings"
    ),
    ("consul.hashicorp.com", "ServiceResolver"): (
        "use a DestinationRule (subsets, failover) and a VirtualService"
    ),
    ("consul.hashicorp.com", "ServiceSplitter"): "use an Istio VirtualService (route weights)",
    ("consul.hashicorp.com", "ServiceRouter"): "use an Istio VirtualService or an HTTPRoute",
}
_MESH_NAMES = {
    "linkerd.io": "Linkerd",
    "policy.linkerd.io": "Linkerd",
    "access.smi-spec.io": "SMI",
    "specs.smi-spec.io": "SMI",
    "split.smi-spec.io": "SMI",
    "consul.hashicorp.com": "Consul",
}
_WAYPOINT_GROUPS = ("networking.istio.io", "gateway.networking.k8s.io")
_ISTIO_ELSEWHERE = {
    "networking.istio.io": "Istio traffic configuration",
    "telemetry.istio.io": "Istio telemetry configuration",
    "extensions.istio.io": "an Istio extension",
    "gateway.networking.k8s.io": "Gateway API configuration",
}


def unhandled_reason(doc: Mapping[str, object], namespace: str) -> str:
    api = get_str(doc, "apiVersion")
    kind = get_str(doc, "kind") or "<no kind>"
    group = api.split("/")[0] if "/" in api else ""
    if group == SECURITY_GROUP and kind == "RequestAuthentication":
        return (
            "not handled by the node: RequestAuthentication (JWT) needs HTTP; a waypoint "
            "enforces it (attach it with targetRefs)"
        )
    if group in _MESH_NAMES:
        if kind == "TrafficTarget":
            hint = _traffic_target_hint(doc, namespace)
        elif kind == "ServiceIntentions":
            hint = _intentions_hint(doc, namespace)
        else:
            hint = _STATIC_HINTS.get((group, kind), _AP_INSTEAD)
        return f"not supported: {_MESH_NAMES[group]} {kind} ({api}); {hint}"
    if group in _ISTIO_ELSEWHERE:
        if group in _WAYPOINT_GROUPS:
            return (
                f"not applied: {kind} is {_ISTIO_ELSEWHERE[group]}, which a waypoint or "
                "gateway (L7) would apply; tether runs none yet, so its routes and L7 rules "
                "have no effect and traffic goes direct under L4 authorization"
            )
        return (
            f"not handled by L4 authorization: {kind} is {_ISTIO_ELSEWHERE[group]}; tether "
            "does not apply it"
        )
    if kind == "NetworkPolicy":
        return (
            "not handled by tether: Kubernetes NetworkPolicy is enforced by the CNI; tether's "
            "L4 policy is the Istio AuthorizationPolicy"
        )
    if group in ("", "apps", "batch", "discovery.k8s.io"):
        return f"not handled by L4 authorization: Kubernetes {kind} describes workloads"
    if kind in (AUTHORIZATION_POLICY, PEER_AUTHENTICATION):
        return f"not supported: {kind} from {api!r}; {_AP_INSTEAD}"
    return f"not handled by L4 authorization: {kind} ({api or 'no apiVersion'})"
