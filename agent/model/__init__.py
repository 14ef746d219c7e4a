"""The mesh as tether sees it: workloads, services, namespaces, and the
snapshot every source (the local file, the Kubernetes watchers) produces.

The bottom layer: it imports nothing from the rest of the agent, so state,
policy, sources, tunnel and datapath can all depend on it without depending
on each other or on a file format.
"""

from agent.model.addr import HBONE_PORT, family, format_authority, norm_ip, plain, same_family
from agent.model.settings import AgentSettings, IdentitySettings, NodeSettings
from agent.model.snapshot import Snapshot
from agent.model.waypoint import WAYPOINT_CLASS, Waypoint
from agent.model.workload import (
    DATAPLANE_MODE,
    USE_WAYPOINT,
    WAYPOINT_NOT_APPLIED,
    Endpoint,
    Service,
    ServicePort,
    Workload,
)

__all__ = [
    "DATAPLANE_MODE",
    "HBONE_PORT",
    "USE_WAYPOINT",
    "WAYPOINT_CLASS",
    "WAYPOINT_NOT_APPLIED",
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
