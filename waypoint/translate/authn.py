"""RequestAuthentication as Envoy's jwt_authn filter, with Istio's meaning:
a request with a token that fails verification is refused (401); a request
without a token passes (unauthenticated: AuthorizationPolicy decides).

JWKS are never fetched here (the translation does no I/O): ``jwksUri`` is
looked up in the ``jwks`` mapping the agent passes in (uri -> JWKS text).
Until it has one, the provider gets a key nobody holds (Envoy refuses an
empty key set, which would reject the whole listener), so tokens of that
issuer are refused, never accepted unchecked."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from waypoint.translate.attach import GATEWAY, orphans, raw_target_refs, scopes
from waypoint.translate.authz import JWT_PAYLOAD
from waypoint.translate.common import Report, show, typed
from waypoint.translate.mesh import Mesh, name_of, namespace_of, spec_of

JWT_AUTHN = "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
# A P-256 public key whose private key was discarded when it was generated:
# no token verifies against it.
UNFETCHED_JWKS = (
    '{"keys":[{"kty":"EC","crv":"P-256","alg":"ES256","kid":"tether-unfetched",'
    '"x":"mQ38iThx9Ogo5EMmLsrctgSvWfMXWveKjuheOzkd7N0",'
    '"y":"924i9sku_no1RcH9P23iOJg5NMQPwt_0kYKPK2rkHZk"}]}'
)


def _usable_jwks(text: str) -> bool:
    """JSON with a non-empty ``keys`` list (Envoy refuses the listener otherwise)."""
    try:
        value = json.loads(text)
    except ValueError:
        return False
    keys = value.get("keys") if isinstance(value, dict) else None
    return isinstance(keys, list) and bool(keys)


RULE_FIELDS = (
    "issuer",
    "audiences",
    "jwksUri",
    "jwks",
    "fromHeaders",
    "fromParams",
    "fromCookies",
    "outputPayloadToHeader",
    "forwardOriginalToken",
    "outputClaimToHeaders",
    "timeout",
)

# scope -> provider name -> JwtProvider
Providers = dict[str, dict[str, dict[str, Any]]]


def _provider(
    rule: Mapping[str, Any], path: str, label: str, jwks: Mapping[str, str], report: Report
) -> dict[str, Any] | None:
    issuer = rule.get("issuer")
    if not isinstance(issuer, str) or not issuer:
        report.add(label, f"{path}.issuer", "required: the rule is not applied")
        return None
    p: dict[str, Any] = {"issuer": issuer, "payload_in_metadata": JWT_PAYLOAD}
    for key in rule:
        if key not in RULE_FIELDS:
            report.add(label, f"{path}.{key}", "unknown field")
    aud = rule.get("audiences")
    if isinstance(aud, list) and aud:
        p["audiences"] = [a for a in aud if isinstance(a, str)]
    text: str | None = None
    if isinstance(rule.get("jwks"), str):
        text = rule["jwks"]
        if not _usable_jwks(rule["jwks"]):
            report.add(
                label, f"{path}.jwks", f"not a JWKS with keys: tokens of {issuer} are refused"
            )
            text = None
    elif isinstance(rule.get("jwksUri"), str):
        uri = rule["jwksUri"]
        text = jwks.get(uri)
        if text is None:
            report.add(
                label,
                f"{path}.jwksUri",
                f"{show(uri)} not fetched yet: tokens of {issuer} are refused until the agent "
                "passes its JWKS",
            )
        elif not _usable_jwks(text):
            report.add(
                label,
                f"{path}.jwksUri",
                f"{show(uri)} did not return a JWKS with keys: tokens of {issuer} are refused",
            )
            text = None
    else:
        report.add(
            label,
            f"{path}.jwks",
            f"neither jwks nor jwksUri: OpenID discovery is not supported; tokens of {issuer} "
            "are refused",
        )
    p["local_jwks"] = {"inline_string": text if text is not None else UNFETCHED_JWKS}
    if "timeout" in rule:
        report.add(label, f"{path}.timeout", "the agent fetches JWKS with its own timeout")
    if rule.get("forwardOriginalToken") is True:
        p["forward"] = True
    if isinstance(rule.get("outputPayloadToHeader"), str):
        p["forward_payload_header"] = rule["outputPayloadToHeader"]
    headers = rule.get("fromHeaders")
    if isinstance(headers, list):
        p["from_headers"] = [
            {
                "name": str(h.get("name")),
                **({"value_prefix": h["prefix"]} if isinstance(h.get("prefix"), str) else {}),
            }
            for h in headers
            if isinstance(h, Mapping) and h.get("name")
        ]
    for key, field in (("fromParams", "from_params"), ("fromCookies", "from_cookies")):
        values = rule.get(key)
        if isinstance(values, list):
            p[field] = [v for v in values if isinstance(v, str)]
    claims = rule.get("outputClaimToHeaders")
    if isinstance(claims, list):
        p["claim_to_headers"] = [
            {"header_name": str(c.get("header")), "claim_name": str(c.get("claim"))}
            for c in claims
            if isinstance(c, Mapping) and c.get("header") and c.get("claim")
        ]
    return p


def translate_authn(mesh: Mesh, jwks: Mapping[str, str], report: Report) -> Providers:
    out: Providers = {}
    served_ns = {s.namespace for s in mesh.services}
    for doc in mesh.kind("RequestAuthentication"):
        spec, ns, label = spec_of(doc), namespace_of(doc), mesh.label(doc)
        refs = raw_target_refs(spec)
        if not refs:
            if ns in served_ns:
                report.add(
                    label,
                    "spec.selector" if "selector" in spec else "spec",
                    "without targetRefs a RequestAuthentication is for sidecars; the "
                    "waypoint applies it with targetRefs (kind Gateway name "
                    f"{mesh.waypoint.name}, group gateway.networking.k8s.io, or kind "
                    "Service)",
                )
            continue
        for field, reason in orphans(mesh, ns, refs):
            report.add(label, field, reason)
        reach = scopes(mesh, ns, refs)
        if not reach:
            continue
        for key in spec:
            if key not in ("selector", "targetRef", "targetRefs", "jwtRules"):
                report.add(label, f"spec.{key}", "unknown field")
        rules = spec.get("jwtRules")
        for i, rule in enumerate(rules if isinstance(rules, list) else []):
            if not isinstance(rule, Mapping):
                continue
            p = _provider(rule, f"spec.jwtRules[{i}]", label, jwks, report)
            if p is None:
                continue
            for scope in reach:
                out.setdefault(scope, {})[f"{ns}/{name_of(doc)}/{i}"] = p
    return out


def jwt_filter(providers: Providers, service_key: str | None) -> list[dict[str, Any]]:
    merged: dict[str, Any] = dict(providers.get(GATEWAY, {}))
    if service_key:
        merged.update(providers.get(service_key, {}))
    if not merged:
        return []
    names = sorted(merged)
    return [
        {
            "name": "envoy.filters.http.jwt_authn",
            "typed_config": typed(
                JWT_AUTHN,
                {
                    "providers": {n: merged[n] for n in names},
                    "rules": [
                        {
                            "match": {"prefix": "/"},
                            "requires": {
                                "requires_any": {
                                    "requirements": [
                                        *({"provider_name": n} for n in names),
                                        {"allow_missing": {}},
                                    ]
                                }
                            },
                        }
                    ],
                },
            ),
        }
    ]


def jwks_uris(mesh: Mesh) -> set[str]:
    """Every ``jwksUri`` of a RequestAuthentication that reaches this waypoint:
    what the agent must fetch for it."""
    out: set[str] = set()
    for doc in mesh.kind("RequestAuthentication"):
        spec = spec_of(doc)
        if not scopes(mesh, namespace_of(doc), raw_target_refs(spec)):
            continue
        rules = spec.get("jwtRules")
        for rule in rules if isinstance(rules, list) else []:
            if (
                isinstance(rule, Mapping)
                and isinstance(rule.get("jwksUri"), str)
                and not isinstance(rule.get("jwks"), str)  # inline wins, as in _provider
            ):
                out.add(rule["jwksUri"])
    return out
