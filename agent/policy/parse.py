"""Validation and parsing of Istio security documents, as istio pkg/config/validation
(ValidateAuthorizationPolicy / ValidatePeerAuthentication) would accept or refuse them.
Every error carries its field path; one bad field never hides another."""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping, Sequence
from typing import Any

from agent.policy.model import (
    AUTHORIZATION_POLICY,
    L4_WHEN_KEYS,
    L7_WHEN_KEYS,
    L7_WHEN_MAP_PREFIXES,
    OPERATION_FIELDS,
    PEER_AUTHENTICATION,
    SECURITY_GROUP,
    SECURITY_VERSIONS,
    SOURCE_FIELDS,
    WHEN_IP_KEYS,
    Action,
    AuthorizationPolicy,
    Condition,
    IPNetwork,
    Labels,
    Mode,
    Operation,
    PeerAuthentication,
    PolicyError,
    Rule,
    Source,
    TargetRef,
    clip,
    clip_text,
    parse_ip_block,
    parse_port,
)


def type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__


class _Checker:
    """Collects every error in one document with its field path."""

    def __init__(self, document: str) -> None:
        self.document = document
        self.errors: list[PolicyError] = []

    def error(self, path: str, message: str) -> None:
        self.errors.append(PolicyError(self.document, path, message))

    def raise_if_any(self) -> None:
        if self.errors:
            first, *rest = self.errors
            raise PolicyError(first.document, first.path, first.message, rest)

    def mapping(
        self, value: object, path: str, allowed: Sequence[str], *, null_ok: bool = True
    ) -> Mapping[str, object] | None:
        if value is None:
            if null_ok:
                return {}
            self.error(path, "must not be empty")
            return None
        if not isinstance(value, Mapping):
            self.error(path, f"expected a mapping, got {type_name(value)}")
            return None
        for key in value:
            if key not in allowed:
                self.error(
                    f"{path}.{clip_text(str(key))}",
                    f"unknown field (expected one of: {', '.join(allowed)})",
                )
        return value

    def items(self, value: object, path: str) -> list[object]:
        if value is None:
            return []
        if not isinstance(value, list):
            hint = f"; write [{clip(value)}]" if isinstance(value, str | int) else ""
            self.error(path, f"expected a list, got {type_name(value)}{hint}")
            return []
        return value

    def strings(self, m: Mapping[str, object], key: str, path: str) -> tuple[str, ...]:
        out = []
        for i, item in enumerate(self.items(m.get(key), f"{path}.{key}")):
            where = f"{path}.{key}[{i}]"
            if not isinstance(item, str):
                self.error(where, f"expected a string, got {type_name(item)}")
            elif item == "":
                self.error(where, "empty value not allowed")
            else:
                out.append(item)
        return tuple(out)

    def ip_blocks(self, m: Mapping[str, object], key: str, path: str) -> tuple[IPNetwork, ...]:
        out = []
        for i, item in enumerate(self.items(m.get(key), f"{path}.{key}")):
            where = f"{path}.{key}[{i}]"
            net = parse_ip_block(item) if isinstance(item, str) else None
            if net is None:
                self.error(where, f"{clip(item)} is not an IP or CIDR")
            else:
                out.append(net)
        return tuple(out)

    def ports(self, m: Mapping[str, object], key: str, path: str) -> tuple[int, ...]:
        out = []
        for i, item in enumerate(self.items(m.get(key), f"{path}.{key}")):
            port = parse_port(item)
            if port is None:
                self.error(f"{path}.{key}[{i}]", f"{clip(item)} is not a port number (0-65535)")
            else:
                out.append(port)
        return tuple(out)

    def name_string(self, m: Mapping[str, object], key: str, path: str) -> str:
        value = m.get(key)
        if not isinstance(value, str) or not value:
            self.error(f"{path}.{key}", f"must be a non-empty string, got {type_name(value)}")
            return ""
        return value

    def selector(self, value: object, path: str) -> Labels | None:
        if value is None:
            return None
        sel = self.mapping(value, path, ("matchLabels",))
        if sel is None:
            return ()
        raw = sel.get("matchLabels")
        if raw is None:
            return ()
        labels = self.mapping(raw, f"{path}.matchLabels", _AnyKey())
        if labels is None:
            return ()
        out = []
        for k, v in labels.items():
            where = f"{path}.matchLabels.{clip_text(str(k))}"
            if not isinstance(k, str) or not k:
                self.error(where, "label key must be a non-empty string")
            elif not isinstance(v, str):
                self.error(where, f"label value must be a string, got {type_name(v)}")
            elif "*" in k or "*" in v:
                self.error(where, "wildcard is not supported in selector")
            else:
                out.append((k, v))
        return tuple(sorted(out))


class _AnyKey(tuple[str, ...]):
    """An 'allowed keys' list that allows every key (for free-form maps such as labels)."""

    def __contains__(self, key: object) -> bool:
        return True


def metadata(
    doc: Mapping[str, object], default_namespace: str
) -> tuple[str, str, Mapping[str, object]]:
    meta = doc.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    name = meta.get("name")
    namespace = meta.get("namespace")
    name_s = name if isinstance(name, str) and name else "<unnamed>"
    ns_s = namespace if isinstance(namespace, str) and namespace else default_namespace
    return name_s, ns_s, meta


_CLUSTER_SCOPED = frozenset(
    {
        "Namespace",
        "Node",
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "GatewayClass",
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    }
)


def document_label(doc: object, default_namespace: str = "default") -> str:
    """``Kind namespace/name`` (``Kind name`` if cluster-scoped) for messages, whatever
    shape the document has."""
    if not isinstance(doc, Mapping):
        return f"document of type {type(doc).__name__}"
    kind = doc.get("kind")
    kind_s = kind if isinstance(kind, str) and kind else "<no kind>"
    name, ns, _ = metadata(doc, default_namespace)
    kind_s, name, ns = clip_text(kind_s), clip_text(name), clip_text(ns)
    return f"{kind_s} {name}" if kind_s in _CLUSTER_SCOPED else f"{kind_s} {ns}/{name}"


_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def dns1123_problem(value: str, *, subdomain: bool) -> str | None:
    """What the API server would say about a name (apimachinery IsDNS1123Subdomain for
    object names, IsDNS1123Label for namespaces), or None if it is valid."""
    limit, what = (253, "DNS-1123 subdomain") if subdomain else (63, "DNS-1123 label")
    if len(value) > limit:
        return f"is not a valid {what}: must be no more than {limit} characters"
    pattern = _DNS1123_SUBDOMAIN if subdomain else _DNS1123_LABEL
    if not pattern.fullmatch(value):
        chars = "'-' or '.'" if subdomain else "'-'"
        return (
            f"is not a valid {what}: lowercase letters, digits and {chars}, starting and "
            "ending with a letter or digit"
        )
    return None


def _check_header(
    c: _Checker, doc: Mapping[str, object], kind: str, default_namespace: str
) -> tuple[str, str, str, Mapping[str, object]]:
    api = doc.get("apiVersion")
    api_s = api if isinstance(api, str) else ""
    allowed = [f"{SECURITY_GROUP}/{v}" for v in SECURITY_VERSIONS]
    if api_s not in allowed:
        c.error(
            "apiVersion", f"{clip(api)} is not supported for {kind} (use {' or '.join(allowed)})"
        )
    if doc.get("kind") != kind:
        c.error("kind", f"expected {clip(kind)}, got {clip(doc.get('kind'))}")
    name, namespace, meta = metadata(doc, default_namespace)
    if name == "<unnamed>":
        c.error("metadata.name", "must be a non-empty string")
    else:
        problem = dns1123_problem(name, subdomain=True)
        if problem:
            c.error("metadata.name", f"{clip(name)} {problem}")
    ns_raw = meta.get("namespace")
    if ns_raw is not None and (not isinstance(ns_raw, str) or not ns_raw):
        c.error("metadata.namespace", "must be a non-empty string")
    else:
        problem = dns1123_problem(namespace, subdomain=False)
        if problem:
            c.error("metadata.namespace", f"{clip(namespace)} {problem}")
    return api_s or allowed[0], name, namespace, meta


def _parse_source(c: _Checker, value: object, path: str) -> Source | None:
    m = c.mapping(value, path, SOURCE_FIELDS, null_ok=False)
    if m is None:
        return None
    if not any(m.get(f) for f in SOURCE_FIELDS):
        c.error(path, "must not be empty (set at least one of principals, namespaces, ipBlocks, …)")
    src = Source(
        principals=c.strings(m, "principals", path),
        not_principals=c.strings(m, "notPrincipals", path),
        request_principals=c.strings(m, "requestPrincipals", path),
        not_request_principals=c.strings(m, "notRequestPrincipals", path),
        namespaces=c.strings(m, "namespaces", path),
        not_namespaces=c.strings(m, "notNamespaces", path),
        service_accounts=c.strings(m, "serviceAccounts", path),
        not_service_accounts=c.strings(m, "notServiceAccounts", path),
        ip_blocks=c.ip_blocks(m, "ipBlocks", path),
        not_ip_blocks=c.ip_blocks(m, "notIpBlocks", path),
        remote_ip_blocks=c.ip_blocks(m, "remoteIpBlocks", path),
        not_remote_ip_blocks=c.ip_blocks(m, "notRemoteIpBlocks", path),
    )
    for key, values in (
        ("serviceAccounts", src.service_accounts),
        ("notServiceAccounts", src.not_service_accounts),
    ):
        for i, sa in enumerate(values):
            parts = sa.split("/")
            if "*" in sa:
                # istio pkg/config/security CheckServiceAccount
                c.error(f"{path}.{key}[{i}]", f"{clip(sa)}: wildcard not allowed in {key}")
            elif len(parts) > 2 or not all(parts):
                c.error(
                    f"{path}.{key}[{i}]", f"{clip(sa)} is not 'serviceaccount' or 'namespace/sa'"
                )
    if (src.service_accounts or src.not_service_accounts) and (
        src.principals or src.not_principals or src.namespaces or src.not_namespaces
    ):
        c.error(path, "cannot set serviceAccounts with namespaces or principals")
    return src


def _parse_operation(c: _Checker, value: object, path: str) -> Operation | None:
    m = c.mapping(value, path, OPERATION_FIELDS, null_ok=False)
    if m is None:
        return None
    if not any(m.get(f) for f in OPERATION_FIELDS):
        c.error(path, "must not be empty (set at least one of ports, methods, paths, hosts, …)")
    return Operation(
        ports=c.ports(m, "ports", path),
        not_ports=c.ports(m, "notPorts", path),
        hosts=c.strings(m, "hosts", path),
        not_hosts=c.strings(m, "notHosts", path),
        methods=c.strings(m, "methods", path),
        not_methods=c.strings(m, "notMethods", path),
        paths=c.strings(m, "paths", path),
        not_paths=c.strings(m, "notPaths", path),
    )


def _is_map_key(key: str, prefix: str) -> bool:
    """``prefix[name]`` with a non-empty name (Istio's validateMapKey)."""
    rest = key[len(prefix) :]
    return rest.startswith("[") and rest.endswith("]") and len(rest) > 2


def _check_condition_key(c: _Checker, key: str, path: str) -> None:
    if key in L4_WHEN_KEYS or key in L7_WHEN_KEYS:
        return
    for prefix in L7_WHEN_MAP_PREFIXES:
        if key.startswith(prefix):
            if prefix.endswith(".") or _is_map_key(key, prefix):
                return
            c.error(path, f"bad key {clip(key)}: should have the form {prefix}[name]")
            return
    if key == "destination.namespace":
        c.error(path, f"attribute {clip(key)} is replaced by metadata.namespace")
    elif key.startswith("destination.labels"):
        c.error(path, f"attribute {clip(key)} is replaced by the workload selector")
    elif key in ("destination.name", "destination.user"):
        c.error(path, f"deprecated attribute {clip(key)}: only supported in v1alpha1")
    else:
        c.error(path, f"unknown attribute {clip(key)}")


def _parse_condition(c: _Checker, value: object, path: str) -> Condition | None:
    m = c.mapping(value, path, ("key", "values", "notValues"), null_ok=False)
    if m is None:
        return None
    key = m.get("key")
    if not isinstance(key, str) or not key:
        c.error(f"{path}.key", "must not be empty")
        return None
    _check_condition_key(c, key, f"{path}.key")
    values = c.strings(m, "values", path)
    not_values = c.strings(m, "notValues", path)
    if not m.get("values") and not m.get("notValues"):
        c.error(path, f"at least one of values or notValues must be set for key {clip(key)}")
    for field, vals in (("values", values), ("notValues", not_values)):
        for i, v in enumerate(vals):
            where = f"{path}.{field}[{i}]"
            if key in WHEN_IP_KEYS and parse_ip_block(v) is None:
                c.error(where, f"{clip(v)} is not an IP or CIDR")
            elif key == "destination.port" and parse_port(v) is None:
                c.error(where, f"{clip(v)} is not a port number (0-65535)")
    return Condition(key, values, not_values)


def _parse_rule(c: _Checker, value: object, path: str) -> Rule:
    m = c.mapping(value, path, ("from", "to", "when"))
    if m is None:
        return Rule()
    sources: list[Source] = []
    operations: list[Operation] = []
    conditions: list[Condition] = []
    for clause in ("from", "to"):
        # Istio rejects an empty list; a null is the same as leaving the key out.
        if isinstance(m.get(clause), list) and not m.get(clause):
            c.error(f"{path}.{clause}", "must not be empty (leave it out to match anything)")
    for i, entry in enumerate(c.items(m.get("from"), f"{path}.from")):
        e = c.mapping(entry, f"{path}.from[{i}]", ("source",), null_ok=False)
        if e is not None:
            src = _parse_source(c, e.get("source"), f"{path}.from[{i}].source")
            if src is not None:
                sources.append(src)
    for i, entry in enumerate(c.items(m.get("to"), f"{path}.to")):
        e = c.mapping(entry, f"{path}.to[{i}]", ("operation",), null_ok=False)
        if e is not None:
            op = _parse_operation(c, e.get("operation"), f"{path}.to[{i}].operation")
            if op is not None:
                operations.append(op)
    for i, entry in enumerate(c.items(m.get("when"), f"{path}.when")):
        cond = _parse_condition(c, entry, f"{path}.when[{i}]")
        if cond is not None:
            conditions.append(cond)
    return Rule(tuple(sources), tuple(operations), tuple(conditions))


def _parse_target_ref(c: _Checker, value: object, path: str) -> TargetRef | None:
    m = c.mapping(value, path, ("group", "kind", "name", "namespace"), null_ok=False)
    if m is None:
        return None
    kind = c.name_string(m, "kind", path)
    name = c.name_string(m, "name", path)
    group = m.get("group", "")
    namespace = m.get("namespace", "")
    return TargetRef(
        kind=kind,
        name=name,
        group=group if isinstance(group, str) else "",
        namespace=namespace if isinstance(namespace, str) else "",
    )


_AP_SPEC_FIELDS = ("selector", "targetRef", "targetRefs", "action", "rules", "provider")


def parse_authorization_policy(
    doc: Mapping[str, Any], *, default_namespace: str = "default"
) -> AuthorizationPolicy:
    """Parse and validate one AuthorizationPolicy; raises PolicyError (``.all`` = every error)."""
    c = _Checker(document_label(doc, default_namespace))
    api, name, namespace, _ = _check_header(c, doc, AUTHORIZATION_POLICY, default_namespace)
    spec = c.mapping(doc.get("spec"), "spec", _AP_SPEC_FIELDS) or {}

    selector = c.selector(spec.get("selector"), "spec.selector")
    refs: list[TargetRef] = []
    if spec.get("targetRef") is not None:
        ref = _parse_target_ref(c, spec.get("targetRef"), "spec.targetRef")
        if ref is not None:
            refs.append(ref)
    for i, item in enumerate(c.items(spec.get("targetRefs"), "spec.targetRefs")):
        ref = _parse_target_ref(c, item, f"spec.targetRefs[{i}]")
        if ref is not None:
            refs.append(ref)
    if selector is not None and refs:
        c.error("spec", "only one of targetRefs or selector can be set")

    raw_action = spec.get("action", "ALLOW")
    action = Action.ALLOW
    if isinstance(raw_action, str) and raw_action in Action.__members__:
        action = Action[raw_action]
    else:
        c.error("spec.action", f"{clip(raw_action)} is not one of ALLOW, DENY, AUDIT, CUSTOM")

    provider: str | None = None
    raw_provider = spec.get("provider")
    if raw_provider is not None:
        pm = c.mapping(raw_provider, "spec.provider", ("name",))
        if pm is not None:
            provider = c.name_string(pm, "name", "spec.provider")
        if action is not Action.CUSTOM:
            c.error("spec.provider", f"must not be set with action {action.value}")

    raw_rules = spec.get("rules")
    rules = [
        _parse_rule(c, r, f"spec.rules[{i}]")
        for i, r in enumerate(c.items(raw_rules, "spec.rules"))
    ]
    if action in (Action.DENY, Action.CUSTOM) and not raw_rules:
        c.error(
            "spec.rules",
            f"{action.value} action without rules is meaningless as it will never be "
            "triggered; add an empty rule {} if you want it to apply to every connection",
        )
    if action is Action.CUSTOM and raw_rules and not provider:
        c.error("spec.provider.name", "must not be empty with action CUSTOM")

    c.raise_if_any()
    return AuthorizationPolicy(
        name=name,
        namespace=namespace,
        action=action,
        selector=selector,
        target_refs=tuple(refs),
        rules=tuple(rules),
        provider=provider,
        api_version=api,
    )


def _parse_mode(c: _Checker, value: object, path: str) -> Mode:
    m = c.mapping(value, path, ("mode",))
    if m is None:
        return Mode.UNSET
    raw = m.get("mode", "UNSET")
    if isinstance(raw, str) and raw in Mode.__members__:
        return Mode[raw]
    c.error(f"{path}.mode", f"{clip(raw)} is not one of UNSET, DISABLE, PERMISSIVE, STRICT")
    return Mode.UNSET


def _parse_created(value: object) -> datetime.datetime | None:
    if isinstance(value, datetime.datetime):
        created = value
    elif isinstance(value, str):
        try:
            created = datetime.datetime.fromisoformat(value)
        except ValueError:
            return None
    else:
        return None
    return created if created.tzinfo else created.replace(tzinfo=datetime.UTC)


def parse_peer_authentication(
    doc: Mapping[str, Any], *, default_namespace: str = "default"
) -> PeerAuthentication:
    """Parse and validate one PeerAuthentication; raises PolicyError (``.all`` = every error)."""
    c = _Checker(document_label(doc, default_namespace))
    api, name, namespace, meta = _check_header(c, doc, PEER_AUTHENTICATION, default_namespace)
    spec = c.mapping(doc.get("spec"), "spec", ("selector", "mtls", "portLevelMtls")) or {}
    selector = c.selector(spec.get("selector"), "spec.selector")
    mode = _parse_mode(c, spec.get("mtls"), "spec.mtls")
    ports: list[tuple[int, Mode]] = []
    raw_ports = spec.get("portLevelMtls")
    if raw_ports is not None:
        pm = c.mapping(raw_ports, "spec.portLevelMtls", _AnyKey())
        if pm is not None:
            if not pm:
                c.error("spec.portLevelMtls", "if defined, must have at least one element")
            if not selector:
                c.error(
                    "spec.portLevelMtls",
                    "mesh/namespace peer authentication cannot have port level mTLS "
                    "(add a selector with matchLabels)",
                )
            for key, value in pm.items():
                port = parse_port(key)
                where = f"spec.portLevelMtls.{clip_text(str(key))}"
                if port is None or port == 0:
                    c.error(where, f"{clip(key)}: port must be in range 1..65535")
                    continue
                ports.append((port, _parse_mode(c, value, where)))
    c.raise_if_any()
    return PeerAuthentication(
        name=name,
        namespace=namespace,
        mode=mode,
        selector=selector,
        port_modes=tuple(sorted(ports)),
        created=_parse_created(meta.get("creationTimestamp")),
        api_version=api,
    )
