"""Envoy resources for the waypoint tier, written as the proto3 JSON users read in docs."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from google.protobuf.message import Message

from waypoint.xds import (
    TYPE_CLUSTER,
    TYPE_ENDPOINT,
    TYPE_LISTENER,
    TYPE_SECRET,
    parse_resource,
)

HCM = (
    "type.googleapis.com/envoy.extensions.filters.network."
    "http_connection_manager.v3.HttpConnectionManager"
)
ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
ADS = {"ads": {}, "resource_api_version": "V3"}


def listener(
    port: int, body: str, *, name: str = "main", stat_prefix: str = "main", tls: bool = False
) -> Message:
    """HTTP on 127.0.0.1:port: ``/`` answers ``body``; ``/via`` goes through cluster ``self``
    (EDS) back to ``/`` on the same listener, so CDS and EDS are exercised too."""
    chain: dict[str, Any] = {
        "filters": [
            {
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": HCM,
                    "stat_prefix": stat_prefix,
                    "route_config": {
                        "name": "local",
                        "virtual_hosts": [
                            {
                                "name": "all",
                                "domains": ["*"],
                                "routes": [
                                    {
                                        "match": {"prefix": "/via"},
                                        "route": {"cluster": "self", "prefix_rewrite": "/"},
                                    },
                                    {
                                        "match": {"prefix": "/"},
                                        "direct_response": {
                                            "status": 200,
                                            "body": {"inline_string": body},
                                        },
                                    },
                                ],
                            }
                        ],
                    },
                    "http_filters": [
                        {"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER}}
                    ],
                },
            }
        ]
    }
    if tls:
        chain["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": TLS,
                "common_tls_context": {
                    "tls_certificate_sds_secret_configs": [{"name": "default", "sds_config": ADS}],
                    "validation_context_sds_secret_config": {"name": "ROOTCA", "sds_config": ADS},
                },
            },
        }
    return parse_resource(
        listener_pb2.Listener,
        {
            "name": name,
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [chain],
        },
    )


def cluster_self(port: int) -> tuple[Message, Message]:
    """Cluster ``self`` (EDS) and its endpoints: 127.0.0.1:port."""
    c = parse_resource(
        cluster_pb2.Cluster,
        {
            "name": "self",
            "type": "EDS",
            "connect_timeout": "1s",
            "eds_cluster_config": {"eds_config": ADS},
        },
    )
    e = parse_resource(
        endpoint_pb2.ClusterLoadAssignment,
        {
            "cluster_name": "self",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": port}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    )
    return c, e


def snapshot(port: int, body: str, **kw: Any) -> dict[str, list[Message]]:
    c, e = cluster_self(port)
    return {TYPE_CLUSTER: [c], TYPE_ENDPOINT: [e], TYPE_LISTENER: [listener(port, body, **kw)]}


def get_until(url: str, want: str, timeout: float = 5.0) -> str:
    """GET ``url`` until the body is ``want`` (a new listener replaces the old one
    shortly after the ACK); returns the last body seen."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                last = r.read().decode()
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            last = f"error: {e}"
        if last == want or time.monotonic() > deadline:
            return last
        time.sleep(0.02)


__all__ = ["TYPE_SECRET", "cluster_self", "get_until", "listener", "snapshot"]
