"""``translate``: one waypoint's Envoy resources from the mesh state.  Pure:
no I/O, same input, byte-identical output (sorted, stable names), so the
xDS server can hash resources and send only what changed."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

from agent.model import Service, ServicePort, Workload
from agent.model.waypoint import Waypoint
from agent.state.state import StateView
from waypoint.translate import hbone, protos, telemetry
from waypoint.translate.authn import Providers, jwks_uris, jwt_filter, translate_authn
from waypoint.translate.authz import Authz, translate_authz
from waypoint.translate.common import (
    CLUSTER,
    LISTENER,
    ROUTE,
    Report,
    Resources,
    ads,
    message,
    typed,
)
from waypoint.translate.destination import DestinationRules, service_cluster
from waypoint.translate.mesh import Mesh, index_documents
from waypoint.translate.routes import FAULT, HTTP_FAULT, Router

DEFAULT_CERT_SECRET = "default"
DEFAULT_ROOT_SECRET = "ROOTCA"


def referenced_jwks(
    view: StateView, waypoint: Waypoint, trust_domain: str | None = None
) -> set[str]:
    """The ``jwksUri``s of the RequestAuthentications that reach ``waypoint``
    (the agent fetches them and passes them back as ``translate(jwks=...)``)."""
    td = trust_domain or view.trust_domain
    mesh = Mesh(view, waypoint, td, index_documents(view.snapshot.policies, Report()))
    return jwks_uris(mesh)


def translate(
    view: StateView,
    waypoint: Waypoint,
    trust_domain: str | None = None,
    *,
    jwks: Mapping[str, str] | None = None,
    cert_secret: str = DEFAULT_CERT_SECRET,
    root_secret: str = DEFAULT_ROOT_SECRET,
    access_log: bool = True,
) -> tuple[Resources, Report]:
    """Listeners, clusters and route configurations for ``waypoint``, and the
    report of every document field not applied.  ``jwks`` maps a
    RequestAuthentication ``jwksUri`` to the JWKS text the agent fetched;
    ``cert_secret``/``root_secret`` name the SDS secrets (the waypoint's
    certificate and the mesh roots); ``access_log`` sends every request's
    log entry to the agent (waypoint/translate/telemetry.py)."""
    td = trust_domain or view.trust_domain
    report = Report()
    mesh = Mesh(view, waypoint, td, index_documents(view.snapshot.policies, report))
    rules = DestinationRules(mesh, report)
    router = Router(mesh, rules, report)
    authz = translate_authz(mesh, report)
    providers = translate_authn(mesh, jwks or {}, report)

    listeners: dict[str, dict[str, Any]] = {}
    clusters: dict[str, dict[str, Any]] = {}
    routes: dict[str, dict[str, Any]] = {}
    chains: list[dict[str, Any]] = []

    for s in mesh.services:
        if not s.addresses:
            report.add(
                f"Service {s.key}",
                "spec.clusterIP",
                "headless: no VIP to route through the waypoint",
            )
            continue
        for port in sorted(s.ports, key=lambda p: p.port):
            rc = router.route_config(s, port)
            routes[rc["name"]] = rc
            chains.append(_service_chain(s, port, rc["name"], authz, providers, access_log))
            router.cluster_for(s, port, "")
            for subset in sorted(rules.subsets(s)):
                router.cluster_for(s, port, subset)

    identities: set[tuple[str, str]] = set()
    for name, (s, port, subset) in sorted(router.refs.items()):
        clusters[name] = service_cluster(mesh, s, port, subset, rules, report, identities)

    for w in mesh.workloads:
        if not w.addresses:
            continue
        identities.add((w.namespace, w.service_account))
        chain, rc, cluster = _workload_chain(w, authz, access_log)
        chains.append(chain)
        routes[rc["name"]] = rc
        clusters[cluster["name"]] = cluster

    listeners["hbone"] = hbone.hbone_listener(waypoint.addresses, td, cert_secret, root_secret)
    listeners[hbone.MAIN_INTERNAL] = {
        "name": hbone.MAIN_INTERNAL,
        "internal_listener": {},
        "listener_filters": [
            {
                "name": hbone.ORIGINAL_DST_FILTER,
                "typed_config": typed(
                    "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
                ),
            }
        ],
        "filter_chains": chains,
    }
    clusters[hbone.MAIN_INTERNAL] = hbone.main_internal_cluster()
    for ns, sa in sorted(identities):
        lis = hbone.originate_listener(ns, sa)
        listeners[lis["name"]] = lis
        cl = hbone.originate_cluster(ns, sa, td, cert_secret, root_secret)
        clusters[cl["name"]] = cl

    resources: Resources = {
        LISTENER: {n: message(protos.Listener, listeners[n]) for n in sorted(listeners)},
        CLUSTER: {n: message(protos.Cluster, clusters[n]) for n in sorted(clusters)},
        ROUTE: {n: message(protos.RouteConfiguration, routes[n]) for n in sorted(routes)},
    }
    report.sort()
    return resources, report


def _prefix(ip: str) -> dict[str, Any]:
    addr = ipaddress.ip_address(ip)
    return {"address_prefix": str(addr), "prefix_len": addr.max_prefixlen}


def _hcm(
    stat: str, route_name: str, filters: list[dict[str, Any]], access_log: bool
) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": typed(
            hbone.HCM,
            {
                "stat_prefix": stat,
                "codec_type": "AUTO",  # HTTP/1.1 and h2c apps alike
                "normalize_path": True,  # Istio's default (BASE): authz sees one path form
                "rds": {"route_config_name": route_name, "config_source": ads()},
                "http_filters": [
                    *filters,
                    {"name": FAULT, "typed_config": typed(HTTP_FAULT)},
                    hbone.router(),
                ],
                **({"access_log": telemetry.access_log()} if access_log else {}),
            },
        ),
    }


def _service_chain(
    s: Service,
    port: ServicePort,
    route_name: str,
    authz: Authz,
    providers: Providers,
    access_log: bool,
) -> dict[str, Any]:
    return {
        "name": route_name,
        "filter_chain_match": {
            "prefix_ranges": [_prefix(a) for a in sorted(s.addresses)],
            "destination_port": port.port,
        },
        "filters": [
            _hcm(
                route_name,
                route_name,
                [*jwt_filter(providers, s.key), *authz.filters(s.key)],
                access_log,
            )
        ],
    }


def _workload_chain(
    w: Workload, authz: Authz, access_log: bool
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A pod addressed directly (istio.io/waypoint-for workload|all): any port;
    its cluster is the identity's originate listener, which learns the pod's
    ip:port from filter state set here."""
    name = f"inbound-pod|{w.namespace}/{w.name}"
    set_dst = {
        "name": "envoy.filters.http.set_filter_state",
        "typed_config": typed(
            "envoy.extensions.filters.http.set_filter_state.v3.Config",
            {
                "on_request_headers": [
                    {
                        "object_key": hbone.ORIGINAL_DST_LOCAL,
                        "format_string": {
                            "text_format_source": {"inline_string": "%DOWNSTREAM_LOCAL_ADDRESS%"}
                        },
                        "shared_with_upstream": "ONCE",
                    }
                ]
            },
        ),
    }
    chain = {
        "name": name,
        "filter_chain_match": {"prefix_ranges": [_prefix(a) for a in sorted(w.addresses)]},
        "filters": [_hcm(name, name, [*authz.filters(None), set_dst], access_log)],
    }
    rc = {
        "name": name,
        "virtual_hosts": [
            {
                "name": name,
                "domains": ["*"],
                "routes": [
                    {
                        "name": "default",
                        "match": {"prefix": "/"},
                        "route": {"cluster": name, "timeout": "0s"},
                    }
                ],
            }
        ],
        "validate_clusters": False,
    }
    cluster = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": hbone.CONNECT_TIMEOUT,
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "envoy_internal_address": {
                                        "server_listener_name": hbone.originate_name(
                                            w.namespace, w.service_account
                                        )
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
        "transport_socket": hbone.internal_upstream([]),
        "typed_extension_protocol_options": {
            hbone.HTTP_OPTIONS: typed(
                hbone.HTTP_OPTIONS,
                {
                    "use_downstream_protocol_config": {
                        "http_protocol_options": {},
                        "http2_protocol_options": {},
                    }
                },
            )
        },
    }
    return chain, rc, cluster
