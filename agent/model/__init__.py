"""The mesh as tether sees it: workloads, services, namespaces, and the
snapshot every source (the local file, the Kubernetes watchers) produces.

The bottom layer: it imports nothing from the rest of the agent, so state,
policy, sources, tunnel and datapath can all depend on it without depending
on each other or on a file format.
"""

from agent.model.addr import HBONE_PORT, family, format_authority, norm_ip, plain, same_family
from agent.model.settings import AgentSettings, IdentitySettings, NodeSettings
from agent.model.snapshot import Snapshot
from agent.model.waypoint import (
    FOR_VALUES,
    GATEWAY_NAME_LABEL,
    USE_WAYPOINT_NAMESPACE,
    WAYPOINT_CLASS,
    WAYPOINT_FOR,
    Waypoint,
)
from agent.model.workload import (
    DATAPLANE_MODE,
    USE_WAYPOINT,
    Endpoint,
    Service,
    ServicePort,
    Workload,
)

__all__ = [
    "DATAPLANE_MODE",
    "FOR_VALUES",
    "GATEWAY_NAME_LABEL",
    "HBONE_PORT",
    "USE_WAYPOINT",
    "USE_WAYPOINT_NAMESPACE",
    "WAYPOINT_CLASS",
    "WAYPOINT_FOR",
    "AgentSettings",
    "Endpoint",
    "IdentitySettings",
    "NodeSettings",
    "Service",
    "ServicePort",
    "Snapshot",
    "Waypoint",
    "Workload",
    "family",
    "format_authority",
    "norm_ip",
    "plain",
    "same_family",
]
