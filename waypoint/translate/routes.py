"""Route configurations, one per served service port
(``inbound-vip|<port>|http|<host>``), from the HTTPRoutes whose parentRefs
name the Service, else the VirtualService whose hosts name it (bound to
the mesh), else one default route to the service's cluster."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from agent.model import Service, ServicePort
from waypoint.translate.common import Doc, Report, as_list, duration, show, string_match, typed
from waypoint.translate.destination import DestinationRules, cluster_name
from waypoint.translate.mesh import GATEWAY_API, Mesh, name_of, namespace_of, spec_of

# Istio's default retry policy (networking/core/route/retry), used when a
# route says nothing about retries.
DEFAULT_RETRY_ON = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
FAULT = "envoy.filters.http.fault"
HTTP_FAULT = "envoy.extensions.filters.http.fault.v3.HTTPFault"

# cluster name -> (service, port, subset) the routes send to
ClusterRefs = dict[str, tuple[Service, ServicePort, str]]


class Unroutable(Exception):
    """A destination that names no service, port or subset: the route answers
    with an error status instead (never a guess)."""


def route_config_name(s: Service, port: int) -> str:
    return f"inbound-vip|{port}|http|{s.hostname}"


def default_retry(attempts: int = 2) -> dict[str, Any]:
    return {
        "retry_on": DEFAULT_RETRY_ON,
        "num_retries": attempts,
        "retriable_status_codes": [503],
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": typed(
                    "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                ),
            }
        ],
        "host_selection_retry_max_attempts": "5",
    }


def fraction(percent: object) -> dict[str, Any] | None:
    if isinstance(percent, bool) or not isinstance(percent, int | float):
        return None
    if not 0 <= percent <= 100:
        return None
    return {"numerator": round(float(percent) * 10000), "denominator": "MILLION"}


def _headers_to_add(set_: Mapping[str, Any], add: Mapping[str, Any]) -> list[dict[str, Any]]:
    out = [
        {"header": {"key": k, "value": str(v)}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        for k, v in sorted(set_.items())
    ]
    out += [
        {"header": {"key": k, "value": str(v)}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}
        for k, v in sorted(add.items())
    ]
    return out


def _str_list(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _map(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


class Router:
    """Builds the route configurations and records the clusters they use."""

    def __init__(self, mesh: Mesh, rules: DestinationRules, report: Report) -> None:
        self.mesh, self.rules, self.report = mesh, rules, report
        self.refs: ClusterRefs = {}
        self.vs_by_service: dict[str, Doc] = {}
        self.hr_by_service: dict[str, list[Doc]] = {}
        self._index()

    # -- which document routes which service ---------------------------------

    def _index(self) -> None:
        mesh, r = self.mesh, self.report
        served = {s.key for s in mesh.services}
        for doc in mesh.kind("VirtualService"):
            spec, ns = spec_of(doc), namespace_of(doc)
            gateways = _str_list(spec.get("gateways"))
            if gateways and "mesh" not in gateways:
                r.add(
                    doc,
                    "spec.gateways",
                    f"bound to {', '.join(gateways)} only (not 'mesh'): "
                    "an ingress gateway's routes; waypoints apply VirtualServices bound to "
                    "the mesh (leave gateways out or add 'mesh')",
                )
                continue
            for i, host in enumerate(_str_list(spec.get("hosts"))):
                s = mesh.resolve(host, ns)
                if s is None:
                    r.add(
                        doc,
                        f"spec.hosts[{i}]",
                        f"{show(host)} names no known Service "
                        "(ServiceEntry hosts are not supported)",
                    )
                elif s.key not in served:
                    r.add(
                        doc,
                        f"spec.hosts[{i}]",
                        f"{s.hostname} does not use this waypoint "
                        f"({self.mesh.waypoint.key}); label the Service or its namespace "
                        "istio.io/use-waypoint",
                    )
                elif s.key in self.vs_by_service:
                    other = self.vs_by_service[s.key]
                    r.add(
                        doc,
                        f"spec.hosts[{i}]",
                        f"{s.hostname} is already routed by "
                        f"VirtualService {namespace_of(other)}/{name_of(other)}; "
                        "merge the two (Istio does not merge them for the mesh either)",
                    )
                else:
                    self.vs_by_service[s.key] = doc
            for key in ("tls", "tcp"):
                if spec.get(key):
                    r.add(
                        doc,
                        f"spec.{key}",
                        "TLS and TCP routes are not applied by the waypoint (HTTP only)",
                    )
            if "exportTo" in spec:
                r.add(doc, "spec.exportTo", "ignored: every document is visible mesh-wide")
        for doc in mesh.kind("HTTPRoute"):
            spec, ns = spec_of(doc), namespace_of(doc)
            if _str_list(spec.get("hostnames")):
                r.add(
                    doc,
                    "spec.hostnames",
                    "ignored for a Service parent (GAMMA): the route "
                    "applies to all traffic to the Service",
                )
            refs = spec.get("parentRefs")
            for i, ref in enumerate(as_list(refs)):
                ref = _map(ref)
                kind, group = ref.get("kind", "Gateway"), ref.get("group", GATEWAY_API)
                if kind != "Service" or group not in ("", "core"):
                    r.add(
                        doc,
                        f"spec.parentRefs[{i}]",
                        f"parent {kind} {show(ref.get('name'))}: "
                        "a waypoint applies HTTPRoutes whose parentRefs name a Service "
                        '(group "", kind Service)',
                    )
                    continue
                s = mesh.resolve(str(ref.get("name", "")), str(ref.get("namespace", ns)))
                if s is None:
                    r.add(
                        doc,
                        f"spec.parentRefs[{i}]",
                        f"{show(ref.get('name'))} names no known Service",
                    )
                elif s.key not in served:
                    r.add(
                        doc,
                        f"spec.parentRefs[{i}]",
                        f"{s.hostname} does not use this waypoint ({self.mesh.waypoint.key})",
                    )
                else:
                    port = ref.get("port")
                    self.hr_by_service.setdefault(s.key, []).append(doc)
                    if port is not None and self.mesh.port_of(s, port) is None:
                        r.add(
                            doc,
                            f"spec.parentRefs[{i}].port",
                            f"{s.hostname} has no port {show(port)}",
                        )
        for key, docs in self.hr_by_service.items():
            if key in self.vs_by_service:
                vs = self.vs_by_service.pop(key)
                r.add(
                    vs,
                    "spec.hosts",
                    f"{key} also has HTTPRoute "
                    f"{namespace_of(docs[0])}/{name_of(docs[0])}; the HTTPRoute is applied "
                    "and this VirtualService is not (use one of the two)",
                )

    # -- destinations ---------------------------------------------------------

    def cluster_for(self, s: Service, port: ServicePort, subset: str) -> str:
        name = cluster_name(s, port.port, subset)
        self.refs[name] = (s, port, subset)
        return name

    def vs_destination(
        self, doc: Doc, dest: object, path: str, chain: ServicePort, chain_svc: Service
    ) -> str:
        d = _map(dest)
        host = d.get("host")
        s = self.mesh.resolve(host, namespace_of(doc)) if isinstance(host, str) else None
        if s is None:
            self.report.add(
                doc, f"{path}.host", f"{show(host)} names no known Service: the route answers 503"
            )
            raise Unroutable
        number = _map(d.get("port")).get("number")
        if number is None and s.key == chain_svc.key:
            port: ServicePort | None = chain
        else:
            port = self.mesh.port_of(s, number if isinstance(number, int) else None)
        if port is None:
            self.report.add(
                doc,
                f"{path}.port",
                f"{s.hostname} has no port {show(number)} (or "
                "several ports and none named): the route answers 503",
            )
            raise Unroutable
        subset = d.get("subset") or ""
        if subset and subset not in self.rules.subsets(s):
            self.report.add(
                doc,
                f"{path}.subset",
                f"no DestinationRule defines subset "
                f"{show(subset)} of {s.hostname}: the route answers 503",
            )
            raise Unroutable
        return self.cluster_for(s, port, str(subset))

    # -- route configurations -------------------------------------------------

    def route_config(self, s: Service, port: ServicePort) -> dict[str, Any]:
        if s.key in self.hr_by_service:
            routes = self.httproute_routes(s, port)
        elif s.key in self.vs_by_service:
            routes = self.vs_routes(self.vs_by_service[s.key], s, port)
        else:
            routes = [
                {
                    "name": "default",
                    "match": {"prefix": "/"},
                    "route": {
                        "cluster": self.cluster_for(s, port, ""),
                        "timeout": "0s",
                        "retry_policy": default_retry(),
                    },
                }
            ]
        name = route_config_name(s, port.port)
        return {
            "name": name,
            "virtual_hosts": [
                {"name": f"{s.hostname}:{port.port}", "domains": ["*"], "routes": routes}
            ],
            "validate_clusters": False,
        }

    # -- VirtualService -------------------------------------------------------

    _HTTP_FIELDS = (
        "name",
        "match",
        "route",
        "redirect",
        "directResponse",
        "delegate",
        "rewrite",
        "timeout",
        "retries",
        "fault",
        "mirror",
        "mirrorPercentage",
        "mirrorPercent",
        "mirrors",
        "corsPolicy",
        "headers",
    )
    _MATCH_FIELDS = (
        "name",
        "uri",
        "scheme",
        "method",
        "authority",
        "headers",
        "port",
        "sourceLabels",
        "gateways",
        "queryParams",
        "ignoreUriCase",
        "withoutHeaders",
        "sourceNamespace",
        "statPrefix",
    )

    def vs_routes(self, doc: Doc, s: Service, port: ServicePort) -> list[dict[str, Any]]:
        r = self.report
        http = spec_of(doc).get("http")
        out: list[dict[str, Any]] = []
        for i, h in enumerate(as_list(http)):
            path = f"spec.http[{i}]"
            h = _map(h)
            for key in h:
                if key not in self._HTTP_FIELDS:
                    r.add(doc, f"{path}.{key}", "unknown field")
            for key in ("delegate", "corsPolicy", "mirrorPercent"):
                if key in h:
                    why = (
                        "deprecated; use mirrorPercentage"
                        if key == "mirrorPercent"
                        else "not supported by tether's waypoint yet"
                    )
                    r.add(doc, f"{path}.{key}", why)
            action = self._vs_action(doc, h, path, s, port)
            matches = as_list(h.get("match")) or [{}]
            for j, m in enumerate(matches):
                match = self._vs_match(doc, _map(m), f"{path}.match[{j}]", port)
                if match is None:
                    continue
                out.append(
                    {
                        "name": f"{namespace_of(doc)}.{name_of(doc)}.{i}.{j}",
                        "match": match,
                        **action,
                    }
                )
        return out

    def _vs_match(
        self, doc: Doc, m: Mapping[str, Any], path: str, port: ServicePort
    ) -> dict[str, Any] | None:
        r = self.report
        for key in m:
            if key not in self._MATCH_FIELDS:
                r.add(doc, f"{path}.{key}", "unknown field")
        for key in ("sourceLabels", "gateways", "sourceNamespace"):
            if key in m:
                r.add(
                    doc,
                    f"{path}.{key}",
                    "not applied by the waypoint: this match is "
                    "dropped (an AuthorizationPolicy can restrict by source)",
                )
                return None
        if "port" in m and m["port"] != port.port:
            return None
        out: dict[str, Any] = {}
        uri = m.get("uri")
        if uri is not None:
            sm = string_match(uri)
            if sm is None:
                r.add(
                    doc,
                    f"{path}.uri",
                    f"{show(uri)} is not one of exact, prefix, regex: this match is dropped",
                )
                return None
            key = next(iter(sm))
            out.update(
                {"path": sm["exact"]}
                if key == "exact"
                else {"prefix": sm["prefix"]}
                if key == "prefix"
                else {"safe_regex": sm["safe_regex"]}
            )
        else:
            out["prefix"] = "/"
        if m.get("ignoreUriCase") is True:
            out["case_sensitive"] = False
        headers: list[dict[str, Any]] = []
        for field, name_of_hdr in (
            ("method", ":method"),
            ("authority", ":authority"),
            ("scheme", ":scheme"),
        ):
            if field in m:
                sm = string_match(m[field])
                if sm is None:
                    r.add(doc, f"{path}.{field}", "not a StringMatch: this match is dropped")
                    return None
                headers.append({"name": name_of_hdr, "string_match": sm})
        for field, invert in (("headers", False), ("withoutHeaders", True)):
            for name, spec in sorted(_map(m.get(field)).items()):
                hm: dict[str, Any] = {"name": name}
                if spec in ({}, None):
                    hm["present_match"] = True
                else:
                    sm = string_match(spec)
                    if sm is None:
                        r.add(
                            doc,
                            f"{path}.{field}.{name}",
                            "not a StringMatch: this match is dropped",
                        )
                        return None
                    hm["string_match"] = sm
                if invert:
                    hm["invert_match"] = True
                headers.append(hm)
        if headers:
            out["headers"] = headers
        qps = []
        for name, spec in sorted(_map(m.get("queryParams")).items()):
            sm = string_match(spec)
            if sm is None:
                if spec in ({}, None):
                    qps.append({"name": name, "present_match": True})
                    continue
                r.add(doc, f"{path}.queryParams.{name}", "not a StringMatch: dropped match")
                return None
            qps.append({"name": name, "string_match": sm})
        if qps:
            out["query_parameters"] = qps
        return out

    def _vs_action(
        self, doc: Doc, h: Mapping[str, Any], path: str, s: Service, port: ServicePort
    ) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        hdrs = _map(h.get("headers"))
        for side, add_key, rm_key in (
            ("request", "request_headers_to_add", "request_headers_to_remove"),
            ("response", "response_headers_to_add", "response_headers_to_remove"),
        ):
            part = _map(hdrs.get(side))
            adds = _headers_to_add(_map(part.get("set")), _map(part.get("add")))
            if adds:
                extra[add_key] = adds
            if _str_list(part.get("remove")):
                extra[rm_key] = sorted(_str_list(part.get("remove")))
        fault = self._vs_fault(doc, _map(h.get("fault")), f"{path}.fault") if "fault" in h else None
        if fault:
            extra["typed_per_filter_config"] = {FAULT: typed(HTTP_FAULT, fault)}
        if "directResponse" in h:
            dr = _map(h["directResponse"])
            body = _map(dr.get("body")).get("string")
            resp: dict[str, Any] = {"status": dr.get("status", 200)}
            if isinstance(body, str):
                resp["body"] = {"inline_string": body}
            return {"direct_response": resp, **extra}
        if "redirect" in h:
            return {
                "redirect": self._vs_redirect(doc, _map(h["redirect"]), f"{path}.redirect"),
                **extra,
            }
        try:
            action = self._vs_route_action(doc, h, path, s, port)
        except Unroutable:
            return {"direct_response": {"status": 503}, **extra}
        return {"route": action, **extra}

    def _vs_redirect(self, doc: Doc, red: Mapping[str, Any], path: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if isinstance(red.get("uri"), str):
            out["path_redirect"] = red["uri"]
        if isinstance(red.get("authority"), str):
            out["host_redirect"] = red["authority"]
        if isinstance(red.get("port"), int):
            out["port_redirect"] = red["port"]
        if isinstance(red.get("scheme"), str):
            out["scheme_redirect"] = red["scheme"]
        codes = {
            301: "MOVED_PERMANENTLY",
            302: "FOUND",
            303: "SEE_OTHER",
            307: "TEMPORARY_REDIRECT",
            308: "PERMANENT_REDIRECT",
        }
        code = red.get("redirectCode", 301)
        if code in codes:
            out["response_code"] = codes[code]
        else:
            self.report.add(
                doc,
                f"{path}.redirectCode",
                f"{show(code)}: Envoy redirects with 301, 302, 303, 307 or 308; 301 is used",
            )
        for key in red:
            if key not in ("uri", "authority", "port", "scheme", "redirectCode"):
                self.report.add(doc, f"{path}.{key}", "not supported by tether's waypoint")
        return out

    def _vs_fault(self, doc: Doc, f: Mapping[str, Any], path: str) -> dict[str, Any]:
        r = self.report
        out: dict[str, Any] = {}
        delay = _map(f.get("delay"))
        if delay:
            d = duration(delay.get("fixedDelay"))
            pct = fraction(_map(delay.get("percentage")).get("value", 100))
            if d is None:
                r.add(
                    doc,
                    f"{path}.delay",
                    "only fixedDelay is supported (exponentialDelay is not): no delay injected",
                )
            else:
                out["delay"] = {"fixed_delay": d, "percentage": pct}
            if "percent" in delay:
                r.add(doc, f"{path}.delay.percent", "deprecated; use percentage.value")
        abort = _map(f.get("abort"))
        if abort:
            status = abort.get("httpStatus")
            pct = fraction(_map(abort.get("percentage")).get("value", 100))
            if isinstance(status, int) and 200 <= status < 600:
                out["abort"] = {"http_status": status, "percentage": pct}
            else:
                r.add(
                    doc,
                    f"{path}.abort",
                    "only httpStatus (200-599) is supported "
                    "(grpcStatus, http2Error are not): no abort injected",
                )
        return out

    def _vs_route_action(
        self, doc: Doc, h: Mapping[str, Any], path: str, s: Service, port: ServicePort
    ) -> dict[str, Any]:
        r = self.report
        dests = as_list(h.get("route"))
        if not dests:
            r.add(doc, f"{path}.route", "no destination: the route answers 503")
            raise Unroutable
        weighted: list[tuple[str, int]] = []
        for k, d in enumerate(dests):
            d = _map(d)
            name = self.vs_destination(
                doc, d.get("destination"), f"{path}.route[{k}].destination", port, s
            )
            w = d.get("weight", 0)
            weighted.append((name, w if isinstance(w, int) and w >= 0 else 0))
            if "headers" in d:
                r.add(
                    doc,
                    f"{path}.route[{k}].headers",
                    "per-destination headers are not supported yet; use http[].headers",
                )
        action: dict[str, Any] = {}
        if len(weighted) == 1:
            action["cluster"] = weighted[0][0]
        else:
            if not any(w for _, w in weighted):
                weighted = [(n, 1) for n, _ in weighted]
            merged: dict[str, int] = {}
            for n, w in weighted:
                if w:
                    merged[n] = merged.get(n, 0) + w
            if len(merged) == 1:
                action["cluster"] = next(iter(merged))
            else:
                action["weighted_clusters"] = {
                    "clusters": [{"name": n, "weight": w} for n, w in merged.items()]
                }
        timeout = h.get("timeout")
        action["timeout"] = duration(timeout) or "0s"
        if timeout is not None and duration(timeout) is None:
            r.add(doc, f"{path}.timeout", f"{show(timeout)} is not a duration; no timeout")
        retries = h.get("retries")
        if retries is None:
            action["retry_policy"] = default_retry()
        else:
            policy = self._vs_retries(doc, _map(retries), f"{path}.retries")
            if policy:
                action["retry_policy"] = policy
        rw = _map(h.get("rewrite"))
        for key in rw:
            if key == "uri" and isinstance(rw[key], str):
                action["prefix_rewrite"] = rw[key]
            elif key == "authority" and isinstance(rw[key], str):
                action["host_rewrite_literal"] = rw[key]
            elif key == "uriRegexRewrite" and isinstance(rw[key], Mapping):
                action["regex_rewrite"] = {
                    "pattern": {"regex": str(rw[key].get("match", ""))},
                    "substitution": str(rw[key].get("rewrite", "")),
                }
            else:
                r.add(doc, f"{path}.rewrite.{key}", "not supported")
        mirrors: list[dict[str, Any]] = []
        if "mirror" in h:
            pct = h.get("mirrorPercentage")
            mirrors.append(
                self._mirror(
                    doc,
                    h["mirror"],
                    _map(pct).get("value", 100) if pct is not None else 100,
                    f"{path}.mirror",
                    s,
                    port,
                )
            )
        for k, m in enumerate(as_list(h.get("mirrors"))):
            m = _map(m)
            mirrors.append(
                self._mirror(
                    doc,
                    m.get("destination"),
                    _map(m.get("percentage")).get("value", 100),
                    f"{path}.mirrors[{k}]",
                    s,
                    port,
                )
            )
        mirrors = [m for m in mirrors if m]
        if mirrors:
            action["request_mirror_policies"] = mirrors
        return action

    def _mirror(
        self, doc: Doc, dest: object, pct: object, path: str, s: Service, port: ServicePort
    ) -> dict[str, Any]:
        try:
            cluster = self.vs_destination(doc, dest, path, port, s)
        except Unroutable:
            return {}
        frac = fraction(pct)
        if frac is None:
            self.report.add(doc, path, f"mirror percentage {show(pct)} is not 0-100: 100 used")
        return {"cluster": cluster, "runtime_fraction": {"default_value": frac or fraction(100)}}

    def _vs_retries(self, doc: Doc, ret: Mapping[str, Any], path: str) -> dict[str, Any] | None:
        attempts = ret.get("attempts", 2)
        if not isinstance(attempts, int) or attempts <= 0:
            return None
        policy = default_retry(attempts)
        if "perTryTimeout" in ret:
            d = duration(ret["perTryTimeout"])
            if d:
                policy["per_try_timeout"] = d
            else:
                self.report.add(doc, f"{path}.perTryTimeout", "not a duration")
        if isinstance(ret.get("retryOn"), str):
            conds, codes = [], []
            for item in ret["retryOn"].split(","):
                item = item.strip()
                if item.isdigit():
                    codes.append(int(item))
                elif item:
                    conds.append(item)
            if codes and "retriable-status-codes" not in conds:
                conds.append("retriable-status-codes")
            policy["retry_on"] = ",".join(conds)
            if codes:
                policy["retriable_status_codes"] = codes
            else:
                policy.pop("retriable_status_codes")
        for key in ret:
            if key not in ("attempts", "perTryTimeout", "retryOn"):
                self.report.add(doc, f"{path}.{key}", "not supported by tether's waypoint")
        return policy

    # -- HTTPRoute ------------------------------------------------------------

    def httproute_routes(self, s: Service, port: ServicePort) -> list[dict[str, Any]]:
        entries: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        for doc in sorted(self.hr_by_service[s.key], key=lambda d: (namespace_of(d), name_of(d))):
            if not self._parent_port_ok(doc, s, port):
                continue
            rules = spec_of(doc).get("rules")
            for i, rule in enumerate(as_list(rules)):
                rule = _map(rule)
                path = f"spec.rules[{i}]"
                for key in rule:
                    if key not in (
                        "name",
                        "matches",
                        "filters",
                        "backendRefs",
                        "timeouts",
                        "retry",
                        "sessionPersistence",
                    ):
                        self.report.add(doc, f"{path}.{key}", "unknown field")
                if "sessionPersistence" in rule:
                    self.report.add(doc, f"{path}.sessionPersistence", "not supported")
                action = self._hr_action(doc, rule, path, s, port)
                matches = as_list(rule.get("matches")) or [{}]
                for j, m in enumerate(matches):
                    match = self._hr_match(doc, _map(m), f"{path}.matches[{j}]")
                    if match is None:
                        continue
                    route = {
                        "name": f"{namespace_of(doc)}.{name_of(doc)}.{i}.{j}",
                        "match": match,
                        **action,
                    }
                    entries.append((self._precedence(_map(m)), route))
        entries.sort(key=lambda e: e[0])
        return [e[1] for e in entries]

    def _parent_port_ok(self, doc: Doc, s: Service, port: ServicePort) -> bool:
        for ref in spec_of(doc).get("parentRefs") or []:
            ref = _map(ref)
            if (
                ref.get("kind") == "Service"
                and self.mesh.resolve(
                    str(ref.get("name", "")), str(ref.get("namespace", namespace_of(doc)))
                )
                == s
                and ref.get("port") in (None, port.port)
            ):
                return True
        return False

    @staticmethod
    def _precedence(m: Mapping[str, Any]) -> tuple[Any, ...]:
        """Gateway API match precedence: Exact path, then the longest prefix,
        then method, most header matches, most query matches (ties keep order)."""
        p = _map(m.get("path"))
        kind = p.get("type", "PathPrefix")
        value = str(p.get("value", "/"))
        rank = {"Exact": 0, "PathPrefix": 1}.get(kind, 2)
        return (
            rank,
            -len(value) if rank == 1 else 0,
            0 if "method" in m else 1,
            -len(m.get("headers") or []),
            -len(m.get("queryParams") or []),
        )

    def _hr_match(self, doc: Doc, m: Mapping[str, Any], path: str) -> dict[str, Any] | None:
        out: dict[str, Any] = {}
        p = _map(m.get("path"))
        kind, value = p.get("type", "PathPrefix"), p.get("value", "/")
        if not isinstance(value, str):
            self.report.add(doc, f"{path}.path.value", "must be a string: match dropped")
            return None
        if kind == "Exact":
            out["path"] = value
        elif kind == "PathPrefix":
            trimmed = value.rstrip("/")
            # Gateway API prefixes match whole path segments (/foo: /foo, /foo/x, not /foobar)
            out.update({"path_separated_prefix": trimmed} if trimmed else {"prefix": "/"})
        elif kind == "RegularExpression":
            out["safe_regex"] = {"regex": value}
        else:
            self.report.add(doc, f"{path}.path.type", f"{show(kind)}: match dropped")
            return None
        headers: list[dict[str, Any]] = []
        if "method" in m:
            headers.append({"name": ":method", "string_match": {"exact": str(m["method"])}})
        for field, target in (("headers", headers), ("queryParams", None)):
            items = as_list(m.get(field))
            qps: list[dict[str, Any]] = []
            for k, h in enumerate(items):
                h = _map(h)
                t, name, val = h.get("type", "Exact"), h.get("name"), h.get("value")
                if t not in ("Exact", "RegularExpression") or not isinstance(name, str):
                    self.report.add(
                        doc,
                        f"{path}.{field}[{k}]",
                        "type Exact or RegularExpression with a name: match dropped",
                    )
                    return None
                sm = {"exact": str(val)} if t == "Exact" else {"safe_regex": {"regex": str(val)}}
                (target if target is not None else qps).append({"name": name, "string_match": sm})
            if qps:
                out["query_parameters"] = qps
        if headers:
            out["headers"] = headers
        return out

    def _hr_backend(self, doc: Doc, ref: Mapping[str, Any], path: str) -> str:
        kind, group = ref.get("kind", "Service"), ref.get("group", "")
        if kind != "Service" or group not in ("", "core"):
            self.report.add(doc, path, f"backend kind {show(kind)}: only Services")
            raise Unroutable
        ns = ref.get("namespace", namespace_of(doc))
        if ns != namespace_of(doc):
            self.report.add(
                doc,
                f"{path}.namespace",
                "a backend in another namespace needs a "
                "ReferenceGrant, which tether does not read: refused (500)",
            )
            raise Unroutable
        s = self.mesh.resolve(str(ref.get("name", "")), str(ns))
        if s is None:
            self.report.add(
                doc,
                f"{path}.name",
                f"{show(ref.get('name'))} names no known Service: the route answers 500",
            )
            raise Unroutable
        port = self.mesh.port_of(s, ref.get("port") if isinstance(ref.get("port"), int) else None)
        if port is None:
            self.report.add(
                doc,
                f"{path}.port",
                f"{s.hostname} has no port {show(ref.get('port'))}: the route answers 500",
            )
            raise Unroutable
        if "filters" in ref:
            self.report.add(doc, f"{path}.filters", "per-backend filters are not supported")
        return self.cluster_for(s, port, "")

    def _hr_action(
        self, doc: Doc, rule: Mapping[str, Any], path: str, s: Service, port: ServicePort
    ) -> dict[str, Any]:
        r = self.report
        extra: dict[str, Any] = {}
        action: dict[str, Any] = {}
        redirect: dict[str, Any] | None = None
        filters = as_list(rule.get("filters"))
        for k, f in enumerate(filters):
            f = _map(f)
            t, fpath = f.get("type"), f"{path}.filters[{k}]"
            if t in ("RequestHeaderModifier", "ResponseHeaderModifier"):
                mod = _map(
                    f.get(
                        "requestHeaderModifier"
                        if t == "RequestHeaderModifier"
                        else "responseHeaderModifier"
                    )
                )
                side = "request" if t == "RequestHeaderModifier" else "response"
                set_ = {
                    str(_map(x).get("name")): _map(x).get("value", "") for x in mod.get("set") or []
                }
                add = {
                    str(_map(x).get("name")): _map(x).get("value", "") for x in mod.get("add") or []
                }
                adds = _headers_to_add(set_, add)
                if adds:
                    extra[f"{side}_headers_to_add"] = adds
                if _str_list(mod.get("remove")):
                    extra[f"{side}_headers_to_remove"] = sorted(_str_list(mod.get("remove")))
            elif t == "RequestRedirect":
                red = _map(f.get("requestRedirect"))
                redirect = {}
                if isinstance(red.get("scheme"), str):
                    redirect["scheme_redirect"] = red["scheme"]
                if isinstance(red.get("hostname"), str):
                    redirect["host_redirect"] = red["hostname"]
                if isinstance(red.get("port"), int):
                    redirect["port_redirect"] = red["port"]
                rp = _map(red.get("path"))
                if rp.get("type") == "ReplaceFullPath":
                    redirect["path_redirect"] = str(rp.get("replaceFullPath", "/"))
                elif rp.get("type") == "ReplacePrefixMatch":
                    redirect["prefix_rewrite"] = str(rp.get("replacePrefixMatch", "/"))
                code = red.get("statusCode", 302)
                codes = {
                    301: "MOVED_PERMANENTLY",
                    302: "FOUND",
                    303: "SEE_OTHER",
                    307: "TEMPORARY_REDIRECT",
                    308: "PERMANENT_REDIRECT",
                }
                redirect["response_code"] = codes.get(code, "FOUND")
            elif t == "URLRewrite":
                rw = _map(f.get("urlRewrite"))
                if isinstance(rw.get("hostname"), str):
                    action["host_rewrite_literal"] = rw["hostname"]
                rp = _map(rw.get("path"))
                if rp.get("type") == "ReplaceFullPath":
                    action["regex_rewrite"] = {
                        "pattern": {"regex": "^/.*$"},
                        "substitution": str(rp.get("replaceFullPath")),
                    }
                elif rp.get("type") == "ReplacePrefixMatch":
                    action["prefix_rewrite"] = str(rp.get("replacePrefixMatch", "/"))
            elif t == "RequestMirror":
                mir = _map(f.get("requestMirror"))
                try:
                    cluster = self._hr_backend(
                        doc, _map(mir.get("backendRef")), f"{fpath}.requestMirror.backendRef"
                    )
                except Unroutable:
                    continue
                pct: object = 100
                if isinstance(mir.get("percent"), int):
                    pct = mir["percent"]
                elif isinstance(mir.get("fraction"), Mapping):
                    fr = mir["fraction"]
                    pct = 100 * fr.get("numerator", 0) / (fr.get("denominator") or 100)
                action.setdefault("request_mirror_policies", []).append(
                    {
                        "cluster": cluster,
                        "runtime_fraction": {"default_value": fraction(pct) or fraction(100)},
                    }
                )
            else:
                r.add(doc, f"{fpath}.type", f"filter {show(t)} is not supported")
        if redirect is not None:
            return {"redirect": redirect, **extra}
        backends = as_list(rule.get("backendRefs"))
        if not backends:
            return {"direct_response": {"status": 500}, **extra}
        weighted: dict[str, int] = {}
        try:
            for k, b in enumerate(backends):
                b = _map(b)
                name = self._hr_backend(doc, b, f"{path}.backendRefs[{k}]")
                w = b.get("weight", 1)
                w = w if isinstance(w, int) and w >= 0 else 0
                if w:
                    weighted[name] = weighted.get(name, 0) + w
        except Unroutable:
            return {"direct_response": {"status": 500}, **extra}
        if not weighted:
            return {"direct_response": {"status": 500}, **extra}
        if len(weighted) == 1:
            action["cluster"] = next(iter(weighted))
        else:
            action["weighted_clusters"] = {
                "clusters": [{"name": n, "weight": w} for n, w in weighted.items()]
            }
        timeouts = _map(rule.get("timeouts"))
        action["timeout"] = duration(timeouts.get("request")) or "0s"
        retry = default_retry()
        ret = _map(rule.get("retry"))
        if ret:
            attempts = ret.get("attempts", 2)
            if isinstance(attempts, int):
                retry["num_retries"] = attempts
            retry_codes = [c for c in as_list(ret.get("codes")) if isinstance(c, int)]
            if retry_codes:
                retry["retriable_status_codes"] = sorted(retry_codes)
            if duration(ret.get("backoff")):
                retry["retry_back_off"] = {"base_interval": duration(ret.get("backoff"))}
        if duration(timeouts.get("backendRequest")):
            retry["per_try_timeout"] = duration(timeouts.get("backendRequest"))
        for key in timeouts:
            if key not in ("request", "backendRequest") or duration(timeouts[key]) is None:
                r.add(
                    doc,
                    f"{path}.timeouts.{key}",
                    "not a supported timeout (request, backendRequest with a duration)",
                )
        if retry["num_retries"]:
            action["retry_policy"] = retry
        return {"route": action, **extra}
