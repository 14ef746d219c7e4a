"""Waypoints: the per-namespace (or per-service) Envoy proxies that apply L7
policy, as Istio ambient defines them (istio/api label/labels.yaml, Gateway
API `Gateway` with `gatewayClassName: istio-waypoint`)."""

from __future__ import annotations

import dataclasses

WAYPOINT_CLASS = "istio-waypoint"
WAYPOINT_FOR = "istio.io/waypoint-for"
USE_WAYPOINT_NAMESPACE = "istio.io/use-waypoint-namespace"
FOR_VALUES = ("service", "workload", "all", "none")
# The label Istio puts on a waypoint's pods (and its Service, Deployment):
# istio.io/istio manifests/.../files/waypoint.yaml.
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"


@dataclasses.dataclass(frozen=True)
class Waypoint:
    name: str
    namespace: str
    addresses: tuple[str, ...] = ()  # its pods' IPs: HBONE 15008 listens there
    node: str = ""  # the node its pod runs on (that node's agent configures it)
    service_account: str = ""  # "" -> the Gateway's name, as Istio runs it
    traffic_for: str = "service"  # istio.io/waypoint-for: service | workload | all | none
    netns: str | None = None  # on its own node: the pod's netns (local file, or found by UID)
    cgroup: str | None = None
    # Kubernetes: the pod runs Envoy itself (`tether waypoint-proxy`, from the
    # deployer's Deployment); the node agent serves only its xDS socket.
    envoy_in_pod: bool = False
    # Kubernetes: the Gateway's status addresses (its Service's ClusterIP).
    # Only dialled when no serving pod is known: a node need not have
    # kube-proxy (ztunnel too resolves the waypoint's VIP to its pods).
    service_addresses: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def account(self) -> str:
        return self.service_account or self.name

    def serves_services(self) -> bool:
        return self.traffic_for in ("service", "all")

    def serves_workloads(self) -> bool:
        return self.traffic_for in ("workload", "all")
