"""Workloads (pods) and services, in the terms Istio ambient uses."""

from __future__ import annotations

import dataclasses

DATAPLANE_MODE = "istio.io/dataplane-mode"
USE_WAYPOINT = "istio.io/use-waypoint"


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    namespace: str
    service_account: str
    node: str
    addresses: tuple[str, ...]
    labels: dict[str, str]
    netns: str | None = None  # only for pods on this node
    cgroup: str | None = None
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_inbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclasses.dataclass(frozen=True)
class ServicePort:
    port: int
    target_port: int
    name: str = ""


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A ready endpoint from EndpointSlices: address and port numbers by port name."""

    address: str
    ports: dict[str, int]


@dataclasses.dataclass(frozen=True)
class Service:
    name: str
    namespace: str
    addresses: tuple[str, ...]  # cluster VIPs
    ports: tuple[ServicePort, ...]
    selector: dict[str, str]
    # From EndpointSlices when a source has them (Kubernetes); None: select
    # workloads by the selector (the local file).
    endpoints: tuple[Endpoint, ...] | None = None
    labels: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"
