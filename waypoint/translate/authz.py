"""AuthorizationPolicy (L7) as Envoy RBAC filters, in Istio's order: AUDIT
(action LOG), DENY, then ALLOW (present only when an ALLOW policy reaches the
chain: then a request no ALLOW policy matches is denied).

The peer of a request is the HBONE client, whose SPIFFE ID the hbone
listener put in filter state (``io.istio.peer_principal``): inside an
internal listener there is no TLS, so RBAC's ``authenticated`` principal
never matches; principals, namespaces and service accounts are matched on
that filter state.  Request principals and claims come from jwt_authn's
payload (metadata ``envoy.filters.http.jwt_authn`` / ``payload``).

What cannot be translated fails closed: in an ALLOW rule the rule is
dropped (it allows less); in a DENY rule the condition is dropped (it
denies more).  Each is reported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from agent.policy.model import (
    Action,
    AuthorizationPolicy,
    Condition,
    Operation,
    PolicyError,
    Rule,
    Source,
)
from agent.policy.parse import parse_authorization_policy
from waypoint.translate.attach import GATEWAY, orphans, raw_target_refs, scopes
from waypoint.translate.common import Doc, Report, inner_wildcard, istio_string, re2_escape, typed
from waypoint.translate.hbone import PEER_PRINCIPAL_KEY
from waypoint.translate.mesh import Mesh, namespace_of, spec_of

JWT_FILTER = "envoy.filters.http.jwt_authn"
JWT_PAYLOAD = "payload"
RBAC = "envoy.extensions.filters.http.rbac.v3.RBAC"
ACTION_ORDER = (("AUDIT", "LOG"), ("DENY", "DENY"), ("ALLOW", "ALLOW"))


class Untranslatable(Exception):
    def __init__(self, field: str, reason: str) -> None:
        super().__init__(reason)
        self.field, self.reason = field, reason


def _any_of(items: list[dict[str, Any]], key: str) -> dict[str, Any]:
    return items[0] if len(items) == 1 else {key: {"ids" if key == "or_ids" else "rules": items}}


def _or_ids(items: list[dict[str, Any]]) -> dict[str, Any]:
    return items[0] if len(items) == 1 else {"or_ids": {"ids": items}}


def _and_ids(items: list[dict[str, Any]]) -> dict[str, Any]:
    if not items:
        return {"any": True}
    return items[0] if len(items) == 1 else {"and_ids": {"ids": items}}


def _or_rules(items: list[dict[str, Any]]) -> dict[str, Any]:
    return items[0] if len(items) == 1 else {"or_rules": {"rules": items}}


def _and_rules(items: list[dict[str, Any]]) -> dict[str, Any]:
    if not items:
        return {"any": True}
    return items[0] if len(items) == 1 else {"and_rules": {"rules": items}}


def _check(field: str, value: str) -> None:
    if inner_wildcard(value):
        raise Untranslatable(field, f"{value!r}: only a leading or trailing '*' is supported")


# -- principals ---------------------------------------------------------------


def _peer(match: dict[str, Any]) -> dict[str, Any]:
    return {"filter_state": {"key": PEER_PRINCIPAL_KEY, "string_match": match}}


def _principal(field: str, value: str) -> dict[str, Any]:
    _check(field, value)
    if value == "*":
        return _peer({"safe_regex": {"regex": ".+"}})
    if value.startswith("*"):
        return _peer({"suffix": value[1:]})
    if value.endswith("*"):
        return _peer({"prefix": f"spiffe://{value[:-1]}"})
    return _peer({"exact": f"spiffe://{value}"})


def _segment(value: str) -> str:
    if value == "*":
        return "[^/]+"
    if value.startswith("*"):
        return "[^/]*" + re2_escape(value[1:])
    if value.endswith("*"):
        return re2_escape(value[:-1]) + "[^/]*"
    return re2_escape(value)


def _namespace(field: str, value: str) -> dict[str, Any]:
    _check(field, value)
    return _peer({"safe_regex": {"regex": f"spiffe://[^/]+/ns/{_segment(value)}/sa/[^/]+"}})


def _service_account(value: str, policy_ns: str) -> dict[str, Any]:
    ns, _, sa = value.rpartition("/")
    return _peer(
        {
            "safe_regex": {
                "regex": f"spiffe://[^/]+/ns/{re2_escape(ns or policy_ns)}/sa/{re2_escape(sa)}"
            }
        }
    )


def _claim(path: list[str], match: dict[str, Any]) -> dict[str, Any]:
    """A JWT claim (string, or a list containing the value) matches."""
    meta = {"filter": JWT_FILTER, "path": [{"key": k} for k in [JWT_PAYLOAD, *path]]}
    return _or_ids(
        [
            {"metadata": {**meta, "value": {"string_match": match}}},
            {"metadata": {**meta, "value": {"list_match": {"one_of": {"string_match": match}}}}},
        ]
    )


def _claim_present(path: list[str]) -> dict[str, Any]:
    return {
        "metadata": {
            "filter": JWT_FILTER,
            "path": [{"key": k} for k in [JWT_PAYLOAD, *path]],
            "value": {"present_match": True},
        }
    }


def _jwt_str(claim: str, op: str, value: str) -> dict[str, Any]:
    """A string claim (iss, sub) matched exactly, by prefix or by suffix; an
    empty prefix or suffix only asks that the claim be there."""
    path = [{"key": JWT_PAYLOAD}, {"key": claim}]
    match: dict[str, Any] = (
        {"present_match": True} if op != "exact" and not value else {"string_match": {op: value}}
    )
    return {"metadata": {"filter": JWT_FILTER, "path": path, "value": match}}


def _request_principal(field: str, value: str) -> dict[str, Any]:
    """Istio's request principal is the string ``<iss>/<sub>``; jwt_authn gives
    the two claims apart, so the match is spelled out over every place the
    ``/`` between them can be (an issuer is usually a URL, full of ``/``)."""
    _check(field, value)
    if value == "*":
        return _claim_present(["iss"])
    cuts = [i for i, ch in enumerate(value) if ch == "/"]
    if value.endswith("*"):  # <iss>/<sub> starts with p
        p = value[:-1]
        options = [_jwt_str("iss", "prefix", p)]
        options += [
            _and_ids([_jwt_str("iss", "exact", p[:i]), _jwt_str("sub", "prefix", p[i + 1 :])])
            for i in cuts
            if i < len(p)
        ]
        return _or_ids(options)
    if value.startswith("*"):  # <iss>/<sub> ends with x
        x = value[1:]
        options = [_jwt_str("sub", "suffix", x)]
        options += [
            _and_ids([_jwt_str("iss", "suffix", x[:j]), _jwt_str("sub", "exact", x[j + 1 :])])
            for j, ch in enumerate(x)
            if ch == "/" and j < len(x) - 1
        ]
        return _or_ids(options)
    cuts = [j for j in cuts if 0 < j < len(value) - 1]
    if not cuts:
        raise Untranslatable(field, f"{value!r}: a request principal is '<iss>/<sub>'")
    return _or_ids(
        [
            _and_ids(
                [_jwt_str("iss", "exact", value[:i]), _jwt_str("sub", "exact", value[i + 1 :])]
            )
            for i in cuts
        ]
    )


def _cidr(net: Any, kind: str) -> dict[str, Any]:
    return {kind: {"address_prefix": str(net.network_address), "prefix_len": net.prefixlen}}


def _source(src: Source, path: str, policy_ns: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []

    def field(values: tuple[Any, ...], negated: bool, build: Any, name: str) -> None:
        if values:
            ids = [build(f"{path}.{name}[{i}]", v) for i, v in enumerate(values)]
            m = _or_ids(ids)
            parts.append({"not_id": m} if negated else m)

    for name, negated, values, build in (
        ("principals", False, src.principals, _principal),
        ("notPrincipals", True, src.not_principals, _principal),
        ("namespaces", False, src.namespaces, _namespace),
        ("notNamespaces", True, src.not_namespaces, _namespace),
        (
            "serviceAccounts",
            False,
            src.service_accounts,
            lambda _f, v: _service_account(v, policy_ns),
        ),
        (
            "notServiceAccounts",
            True,
            src.not_service_accounts,
            lambda _f, v: _service_account(v, policy_ns),
        ),
        ("ipBlocks", False, src.ip_blocks, lambda _f, v: _cidr(v, "direct_remote_ip")),
        ("notIpBlocks", True, src.not_ip_blocks, lambda _f, v: _cidr(v, "direct_remote_ip")),
        ("remoteIpBlocks", False, src.remote_ip_blocks, lambda _f, v: _cidr(v, "remote_ip")),
        ("notRemoteIpBlocks", True, src.not_remote_ip_blocks, lambda _f, v: _cidr(v, "remote_ip")),
        ("requestPrincipals", False, src.request_principals, _request_principal),
        ("notRequestPrincipals", True, src.not_request_principals, _request_principal),
    ):
        field(values, negated, build, name)
    return parts


# -- permissions --------------------------------------------------------------


def _host(field: str, value: str) -> dict[str, Any]:
    """``:authority`` against an Istio host, case-insensitive, with or without
    a port (``blog.example.com`` also matches ``blog.example.com:8080``)."""
    _check(field, value)
    port = "(:[0-9]+)?"
    if value == "*":
        regex = ".+"
    elif value.startswith("*"):
        regex = f"(?i).*{re2_escape(value[1:])}{port}"
    elif value.endswith("*"):
        regex = f"(?i){re2_escape(value[:-1])}.*"
    else:
        regex = f"(?i){re2_escape(value)}{port}"
    return {"header": {"name": ":authority", "string_match": {"safe_regex": {"regex": regex}}}}


def _path(field: str, value: str) -> dict[str, Any]:
    _check(field, value)
    return {"url_path": {"path": istio_string(value)}}


def _operation(op: Operation, path: str) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    fields: list[tuple[str, bool, tuple[Any, ...], Any]] = [
        (
            "methods",
            False,
            op.methods,
            lambda _f, v: {"header": {"name": ":method", "string_match": {"exact": v}}},
        ),
        (
            "notMethods",
            True,
            op.not_methods,
            lambda _f, v: {"header": {"name": ":method", "string_match": {"exact": v}}},
        ),
        ("paths", False, op.paths, _path),
        ("notPaths", True, op.not_paths, _path),
        ("hosts", False, op.hosts, _host),
        ("notHosts", True, op.not_hosts, _host),
        ("ports", False, op.ports, lambda _f, v: {"destination_port": v}),
        ("notPorts", True, op.not_ports, lambda _f, v: {"destination_port": v}),
    ]
    for name, negated, values, build in fields:
        if values:
            m = _or_rules([build(f"{path}.{name}[{i}]", v) for i, v in enumerate(values)])
            parts.append({"not_rule": m} if negated else m)
    return parts


# -- conditions ---------------------------------------------------------------


def _map_key(key: str, prefix: str) -> list[str]:
    rest = key[len(prefix) :]
    return rest[1:-1].split("][")


def _condition_one(key: str, value: str, field: str) -> tuple[str, dict[str, Any]]:
    """('principal' | 'permission', matcher) for one value of a when key."""
    if key.startswith("request.headers["):
        _check(field, value)
        name = _map_key(key, "request.headers")[0]
        return "principal", {"header": {"name": name, "string_match": istio_string(value)}}
    if key.startswith("request.auth.claims["):
        _check(field, value)
        return "principal", _claim(_map_key(key, "request.auth.claims"), istio_string(value))
    if key == "request.auth.principal":
        return "principal", _request_principal(field, value)
    if key == "request.auth.audiences":
        _check(field, value)
        return "principal", _claim(["aud"], istio_string(value))
    if key == "request.auth.presenter":
        _check(field, value)
        return "principal", _claim(["azp"], istio_string(value))
    if key == "source.principal":
        return "principal", _principal(field, value)
    if key == "source.namespace":
        return "principal", _namespace(field, value)
    if key in ("source.ip", "remote.ip"):
        from agent.policy.model import parse_ip_block

        net = parse_ip_block(value)
        if net is None:
            raise Untranslatable(field, f"{value!r} is not an IP or CIDR")
        return "principal", _cidr(net, "direct_remote_ip" if key == "source.ip" else "remote_ip")
    if key == "destination.ip":
        from agent.policy.model import parse_ip_block

        net = parse_ip_block(value)
        if net is None:
            raise Untranslatable(field, f"{value!r} is not an IP or CIDR")
        return "permission", _cidr(net, "destination_ip")
    if key == "destination.port":
        return "permission", {"destination_port": int(value)}
    if key == "connection.sni":
        raise Untranslatable(
            field, "connection.sni: the waypoint sees HBONE, not the client's TLS ClientHello"
        )
    raise Untranslatable(field, f"{key}: not supported by tether's waypoint")


def _condition(cond: Condition, path: str) -> tuple[str, dict[str, Any]]:
    side = ""
    parts: list[dict[str, Any]] = []
    for field, values, negated in (
        ("values", cond.values, False),
        ("notValues", cond.not_values, True),
    ):
        if not values:
            continue
        ms = []
        for i, v in enumerate(values):
            side, m = _condition_one(cond.key, v, f"{path}.{field}[{i}]")
            ms.append(m)
        if side == "principal":
            m = _or_ids(ms)
            parts.append({"not_id": m} if negated else m)
        else:
            m = _or_rules(ms)
            parts.append({"not_rule": m} if negated else m)
    if side == "principal":
        return side, _and_ids(parts)
    return side, _and_rules(parts)


# -- rules and policies -------------------------------------------------------


def _rule(
    p: AuthorizationPolicy, rule: Rule, path: str, report: Report, label: str
) -> dict[str, Any] | None:
    """An RBAC Policy for one rule; None when an ALLOW rule cannot be translated."""
    lenient = p.action is not Action.ALLOW

    def attempt(build: Any, where: str) -> Any:
        try:
            return build()
        except Untranslatable as e:
            if lenient:
                report.add(
                    label,
                    e.field,
                    f"{e.reason}; left out of this {p.action.value} "
                    "rule, which therefore matches more (fails closed)",
                )
                return None
            raise

    try:
        froms = [
            x
            for x in (
                attempt(
                    lambda s=s, i=i: _and_ids(_source(s, f"{path}.from[{i}].source", p.namespace)),
                    f"{path}.from[{i}]",
                )
                for i, s in enumerate(rule.sources)
            )
            if x is not None
        ]
        tos = [
            x
            for x in (
                attempt(
                    lambda o=o, i=i: _and_rules(_operation(o, f"{path}.to[{i}].operation")),
                    f"{path}.to[{i}]",
                )
                for i, o in enumerate(rule.operations)
            )
            if x is not None
        ]
        principals: list[dict[str, Any]] = [_or_ids(froms)] if froms else []
        permissions: list[dict[str, Any]] = [_or_rules(tos)] if tos else []
        for i, cond in enumerate(rule.conditions):
            got = attempt(
                lambda c=cond, i=i: _condition(c, f"{path}.when[{i}]"), f"{path}.when[{i}]"
            )
            if got is None:
                continue
            side, m = got
            (principals if side == "principal" else permissions).append(m)
    except Untranslatable as e:
        report.add(
            label,
            e.field,
            f"{e.reason}; this ALLOW rule is left out, so it allows nothing (fails closed)",
        )
        return None
    return {"permissions": [_and_rules(permissions)], "principals": [_and_ids(principals)]}


@dataclasses.dataclass
class Authz:
    """RBAC rules by scope (GATEWAY or a service key) and action."""

    # scope -> action -> policy name -> RBAC Policy
    rules: dict[str, dict[str, dict[str, dict[str, Any]]]] = dataclasses.field(default_factory=dict)

    def add(self, scope: str, action: str, name: str, policy: dict[str, Any] | None) -> None:
        by_action = self.rules.setdefault(scope, {}).setdefault(action, {})
        if policy is not None:
            by_action[name] = policy

    def filters(self, service_key: str | None) -> list[dict[str, Any]]:
        """The RBAC filters of a chain (a service's, or None for a pod's)."""
        scopes_ = [GATEWAY] + ([service_key] if service_key else [])
        out = []
        for action, envoy_action in ACTION_ORDER:
            present = any(action in self.rules.get(s, {}) for s in scopes_)
            if not present:
                continue
            policies: dict[str, Any] = {}
            for s in scopes_:
                policies.update(self.rules.get(s, {}).get(action, {}))
            rules: dict[str, Any] = {"action": envoy_action}
            if policies:
                rules["policies"] = dict(sorted(policies.items()))
            out.append(
                {"name": "envoy.filters.http.rbac", "typed_config": typed(RBAC, {"rules": rules})}
            )
        return out


def translate_authz(mesh: Mesh, report: Report) -> Authz:
    authz = Authz()
    served_ns = {s.namespace for s in mesh.services} | {w.namespace for w in mesh.workloads}
    for doc in mesh.kind("AuthorizationPolicy"):
        spec, ns = spec_of(doc), namespace_of(doc)
        refs = raw_target_refs(spec)
        reach = scopes(mesh, ns, refs)
        label = mesh.label(doc)
        if not refs:
            _report_selector_policy(doc, spec, ns, served_ns, mesh, report)
            continue
        for field, reason in orphans(mesh, ns, refs):
            report.add(label, field, reason)
        if not reach:
            continue  # another waypoint's or another service's
        try:
            p = parse_authorization_policy(doc)
        except PolicyError as e:
            for err in e.all:
                report.add(
                    label,
                    err.path,
                    f"{err.message}; the policy is invalid, so "
                    "every request in its reach is denied until it is fixed",
                )
            for scope in sorted(reach):
                authz.add(
                    scope,
                    "DENY",
                    f"ns[{ns}]-policy[{_name(doc)}]-invalid",
                    {"permissions": [{"any": True}], "principals": [{"any": True}]},
                )
            continue
        if p.action is Action.CUSTOM:
            report.add(
                label,
                "spec.action",
                "CUSTOM (external authorization) is not "
                "supported by tether's waypoint: the policy is not applied",
            )
            continue
        for scope in sorted(reach):
            if not p.rules:
                authz.add(scope, p.action.value, "", None)  # ALLOW nothing
            for i, rule in enumerate(p.rules):
                built = _rule(p, rule, f"spec.rules[{i}]", report, label)
                authz.add(
                    scope, p.action.value, f"ns[{p.namespace}]-policy[{p.name}]-rule[{i}]", built
                )
    return authz


def _name(doc: Doc) -> str:
    meta = doc.get("metadata")
    return str(meta.get("name", "")) if isinstance(meta, Mapping) else ""


def _report_selector_policy(
    doc: Doc, spec: Mapping[str, Any], ns: str, served_ns: set[str], mesh: Mesh, report: Report
) -> None:
    """A policy without targetRefs is the node's (L4), not this waypoint's:
    say so where this waypoint serves, with what that means for traffic
    that comes through the waypoint."""
    if ns not in served_ns:
        return
    where = "spec.selector" if "selector" in spec else "spec"
    try:
        p = parse_authorization_policy(doc)
    except PolicyError:
        return  # the node's loader reports it
    fields = sorted(
        {f for r in p.rules for s in r.sources for f in s.l7_fields()}
        | {f for r in p.rules for o in r.operations for f in o.l7_fields()}
        | {c.key for r in p.rules for c in r.conditions if not c.is_l4}
    )
    attach = (
        "the waypoint applies only policies with targetRefs (kind Gateway name "
        f"{mesh.waypoint.name}, group gateway.networking.k8s.io, or kind Service)"
    )
    if fields:
        reason = (
            f"L7 fields ({', '.join(fields)}) in a policy without targetRefs: the node "
            f"enforces it at L4, where those never match; {attach}"
        )
    else:
        reason = f"no targetRefs: enforced by the destination's node at L4, not here; {attach}"
    if p.action is Action.ALLOW:
        reason += (
            ". Traffic through the waypoint reaches the pods as the waypoint's identity "
            f"(spiffe://{mesh.trust_domain}/ns/{mesh.waypoint.namespace}/sa/"
            f"{mesh.waypoint.account}): an L4 ALLOW must admit it"
        )
    report.add(mesh.label(doc), where, reason)
