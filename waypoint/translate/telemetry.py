"""The waypoint's HTTP access log: Envoy's gRPC access log service, to the agent.

Every L7 chain's connection manager logs each request to
``envoy.service.accesslog.v3.AccessLogService`` on the bootstrap's
``xds_cluster``: the agent's per-waypoint unix socket, behind the same
SO_PEERCRED gate as ADS (waypoint/als.py).  The agent turns the entries into
Istio's request metrics and JSON access log lines.

Entries are batched: Envoy sends a message when ``BUFFER_BYTES`` have piled
up or every ``FLUSH_INTERVAL``, whichever comes first, so one request costs
a protobuf entry, not a gRPC message.  The config is the same on every chain
(one log stream per Envoy worker, not one per chain: Envoy keys its loggers
by this config).
"""

from __future__ import annotations

from typing import Any

from waypoint.translate.common import typed
from waypoint.translate.hbone import PEER_PRINCIPAL_KEY

#: the bootstrap's ADS cluster (waypoint/envoy.py XDS_CLUSTER): the agent's socket
ALS_CLUSTER = "xds_cluster"
LOG_NAME = "tether-waypoint"
FLUSH_INTERVAL = "0.2s"
BUFFER_BYTES = 16384
ALS_CONFIG = "envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig"


def access_log() -> list[dict[str, Any]]:
    """The HCM ``access_log`` list: every request, to the agent."""
    return [
        {
            "name": "envoy.access_loggers.http_grpc",
            "typed_config": typed(
                ALS_CONFIG,
                {
                    "common_config": {
                        "log_name": LOG_NAME,
                        "transport_api_version": "V3",
                        "grpc_service": {"envoy_grpc": {"cluster_name": ALS_CLUSTER}},
                        "buffer_flush_interval": FLUSH_INTERVAL,
                        "buffer_size_bytes": BUFFER_BYTES,
                        # the HBONE peer's SPIFFE ID, set by the hbone listener
                        "filter_state_objects_to_log": [PEER_PRINCIPAL_KEY],
                    },
                    "additional_response_headers_to_log": ["grpc-status"],
                    "additional_response_trailers_to_log": ["grpc-status"],
                },
            ),
        }
    ]
