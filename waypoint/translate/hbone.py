"""HBONE in and out of the waypoint's Envoy.

In: listener ``hbone`` (15008) terminates mTLS and CONNECT, records the
CONNECT target and the peer's SPIFFE ID in filter state, and hands the
stream to the internal listener ``main_internal`` (the L7 chains).

Out: one internal listener + ORIGINAL_DST cluster per destination identity,
``connect_originate|<ns>|<sa>``: a service cluster's endpoint is that
listener, with the pod's ip:port in the endpoint metadata; the listener's
original_dst filter restores it as the local address and tcp_proxy opens a
CONNECT to it (port overridden to 15008) over mTLS that must present
exactly ``spiffe://<td>/ns/<ns>/sa/<sa>``.  One pair per identity because
an UpstreamTlsContext checks a fixed SAN list: a single shared originate
cluster could only check "any identity of the trust domain", letting one
pod's certificate answer for another's address.
"""

from __future__ import annotations

from typing import Any

from agent.model.addr import format_authority
from waypoint.translate.common import ads, typed

HBONE_PORT = 15008
MAIN_INTERNAL = "main_internal"
ORIGINATE = "connect_originate"
ORIGINATE_CLUSTER = "connect_originate_cluster"
PEER_PRINCIPAL_KEY = "io.istio.peer_principal"
ORIGINAL_DST_LOCAL = "envoy.filters.listener.original_dst.local_ip"
ORIGINAL_DST_REMOTE = "envoy.filters.listener.original_dst.remote_ip"
ORIGINAL_DST_FILTER = "envoy.filters.listener.original_dst"
TUNNEL_MATCH = {"tunnel": "hbone"}
CONNECT_TIMEOUT = "10s"

HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def tls_common(cert: str, root: str, sans: list[str] | None, trust_domain: str) -> dict[str, Any]:
    """TLS 1.3, ALPN h2, certificate and roots by SDS; peer SANs matched
    exactly (``sans``) or by the trust domain's prefix."""
    matchers = (
        [{"san_type": "URI", "matcher": {"exact": s}} for s in sans]
        if sans is not None
        else [{"san_type": "URI", "matcher": {"prefix": f"spiffe://{trust_domain}/"}}]
    )
    return {
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_3",
            "tls_maximum_protocol_version": "TLSv1_3",
        },
        "alpn_protocols": ["h2"],
        "tls_certificate_sds_secret_configs": [{"name": cert, "sds_config": ads()}],
        "combined_validation_context": {
            "default_validation_context": {"match_typed_subject_alt_names": matchers},
            "validation_context_sds_secret_config": {"name": root, "sds_config": ads()},
        },
    }


def raw_buffer() -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.raw_buffer",
        "typed_config": typed("envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"),
    }


def internal_upstream(passthrough: list[str]) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.internal_upstream",
        "typed_config": typed(
            "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
            {
                **(
                    {
                        "passthrough_metadata": [
                            {"kind": {"host": {}}, "name": n} for n in passthrough
                        ]
                    }
                    if passthrough
                    else {}
                ),
                "transport_socket": raw_buffer(),
            },
        ),
    }


def _filter_state(key: str, fmt: str, factory: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "object_key": key,
        "format_string": {"text_format_source": {"inline_string": fmt}},
        "shared_with_upstream": "ONCE",
    }
    if factory:
        out["factory_key"] = factory
    return out


def router() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.router",
        "typed_config": typed("envoy.extensions.filters.http.router.v3.Router"),
    }


def hbone_listener(
    addresses: tuple[str, ...], trust_domain: str, cert: str, root: str
) -> dict[str, Any]:
    """The outer listener: mTLS (any identity of the trust domain), HTTP/2
    CONNECT, target and peer identity into filter state, on to main_internal."""
    address = addresses[0] if addresses else "0.0.0.0"
    extra = [
        {"address": {"socket_address": {"address": a, "port_value": HBONE_PORT}}}
        for a in addresses[1:]
    ]
    hcm = {
        "stat_prefix": "hbone",
        "codec_type": "HTTP2",
        "http2_protocol_options": {"allow_connect": True},
        "upgrade_configs": [{"upgrade_type": "CONNECT"}],
        "http_filters": [
            {
                "name": "envoy.filters.http.set_filter_state",
                "typed_config": typed(
                    "envoy.extensions.filters.http.set_filter_state.v3.Config",
                    {
                        "on_request_headers": [
                            _filter_state(ORIGINAL_DST_LOCAL, "%REQ(:AUTHORITY)%"),
                            _filter_state(ORIGINAL_DST_REMOTE, "%DOWNSTREAM_REMOTE_ADDRESS%"),
                            _filter_state(
                                PEER_PRINCIPAL_KEY, "%DOWNSTREAM_PEER_URI_SAN%", "envoy.string"
                            ),
                        ]
                    },
                ),
            },
            router(),
        ],
        "route_config": {
            "name": "hbone",
            "virtual_hosts": [
                {
                    "name": "connect",
                    "domains": ["*"],
                    "routes": [
                        {
                            "name": "connect",
                            "match": {"connect_matcher": {}},
                            "route": {
                                "cluster": MAIN_INTERNAL,
                                "upgrade_configs": [
                                    {"upgrade_type": "CONNECT", "connect_config": {}}
                                ],
                            },
                        }
                    ],
                }
            ],
        },
    }
    listener: dict[str, Any] = {
        "name": "hbone",
        "address": {"socket_address": {"address": address, "port_value": HBONE_PORT}},
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.http_connection_manager",
                        "typed_config": typed(HCM, hcm),
                    }
                ],
                "transport_socket": {
                    "name": "envoy.transport_sockets.tls",
                    "typed_config": typed(
                        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                        {
                            "require_client_certificate": True,
                            "common_tls_context": tls_common(cert, root, None, trust_domain),
                        },
                    ),
                },
            }
        ],
    }
    if extra:
        listener["additional_addresses"] = extra
    return listener


def main_internal_cluster() -> dict[str, Any]:
    return {
        "name": MAIN_INTERNAL,
        "type": "STATIC",
        "connect_timeout": CONNECT_TIMEOUT,
        "load_assignment": {
            "cluster_name": MAIN_INTERNAL,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "envoy_internal_address": {
                                        "server_listener_name": MAIN_INTERNAL
                                    }
                                }
                            }
                        }
                    ]
                }
            ],
        },
        "transport_socket": internal_upstream([]),
    }


def originate_name(namespace: str, account: str) -> str:
    return f"{ORIGINATE}|{namespace}|{account}"


def originate_cluster_name(namespace: str, account: str) -> str:
    return f"{ORIGINATE_CLUSTER}|{namespace}|{account}"


def originate_listener(namespace: str, account: str) -> dict[str, Any]:
    return {
        "name": originate_name(namespace, account),
        "internal_listener": {},
        "listener_filters": [
            {
                "name": ORIGINAL_DST_FILTER,
                "typed_config": typed(
                    "envoy.extensions.filters.listener.original_dst.v3.OriginalDst"
                ),
            }
        ],
        "filter_chains": [
            {
                "filters": [
                    {
                        "name": "envoy.filters.network.tcp_proxy",
                        "typed_config": typed(
                            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                            {
                                "stat_prefix": originate_name(namespace, account),
                                "cluster": originate_cluster_name(namespace, account),
                                "tunneling_config": {"hostname": "%DOWNSTREAM_LOCAL_ADDRESS%"},
                            },
                        ),
                    }
                ]
            }
        ],
    }


def originate_cluster(
    namespace: str, account: str, trust_domain: str, cert: str, root: str
) -> dict[str, Any]:
    identity = f"spiffe://{trust_domain}/ns/{namespace}/sa/{account}"
    return {
        "name": originate_cluster_name(namespace, account),
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": CONNECT_TIMEOUT,
        "original_dst_lb_config": {"upstream_port_override": HBONE_PORT},
        "typed_extension_protocol_options": {
            HTTP_OPTIONS: typed(
                HTTP_OPTIONS, {"explicit_http_config": {"http2_protocol_options": {}}}
            )
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": typed(
                "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                {"common_tls_context": tls_common(cert, root, [identity], trust_domain)},
            ),
        },
    }


def hbone_endpoint(ip: str, port: int, namespace: str, account: str) -> dict[str, Any]:
    """An endpoint reached through the identity's originate listener."""
    target = format_authority(ip, port)
    return {
        "endpoint": {
            "address": {
                "envoy_internal_address": {
                    "server_listener_name": originate_name(namespace, account),
                    "endpoint_id": target,
                }
            }
        },
        "metadata": {
            "filter_metadata": {
                ORIGINAL_DST_FILTER: {"local": target},
                "envoy.transport_socket_match": TUNNEL_MATCH,
            }
        },
    }


def plain_endpoint(ip: str, port: int) -> dict[str, Any]:
    """A pod outside the mesh: plaintext, as Istio's waypoint does."""
    return {"endpoint": {"address": {"socket_address": {"address": ip, "port_value": port}}}}
