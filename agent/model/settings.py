"""How one node's agent runs (from the local file, or the DaemonSet's
ConfigMap in Kubernetes mode): not mesh state, never changed by a source."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class IdentitySettings:
    trust_domain: str = "cluster.local"
    ca_dir: str | None = None  # local mode: root key and cert shared by the node agents
    cert_ttl: float | None = None  # seconds; None: the CA's default (24 h)
    ca_address: str | None = None  # host:port of an IstioCertificateService (tether ca, istiod)
    ca_root_file: str | None = None  # PEM of the mesh root; also verifies the CA's TLS
    token_file: str | None = None  # this node's bearer token for the CA
    ca_plaintext: bool = False  # gRPC without TLS to the CA (tests; never across nodes)


MAX_TUNNEL_LOOPS = 64  # agent.tunnelLoops


@dataclasses.dataclass(frozen=True)
class AgentSettings:
    pin_dir: str = "/sys/fs/bpf/tether"
    state_dir: str = "/run/tether"
    cgroup: str | None = None  # None: the agent's own cgroup
    kubelet_cgroups: tuple[str, ...] = ()
    pod_cgroup_root: str | None = None  # where kubepods lives (default: the cgroup2 root)
    sk_msg: bool = False
    admin_port: int = 15000
    ready_port: int = 15021
    metrics_port: int = 15020
    # A workload whose traffic goes through a waypoint refuses mesh traffic
    # that did not come from that waypoint (false: Istio's default, which
    # does not enforce it).
    require_waypoint: bool = True
    # The local waypoints' Envoys send every HTTP request's access log entry
    # to the agent (request metrics with reporter="waypoint", JSON access log).
    waypoint_access_log: bool = True
    # Kubernetes mode: the agent holding the Lease deploys istio-waypoint
    # Gateways (agent/sources/waypoint_deploy.py); off where istiod does it.
    waypoint_deployer: bool = True
    waypoint_image: str | None = None  # None: the agent pod's own image
    # Event loops serving the tunnel, each on its own thread
    # (agent/tunnel/loops.py); TETHER_TUNNEL_LOOPS overrides it.
    tunnel_loops: int = 1


@dataclasses.dataclass(frozen=True)
class NodeSettings:
    node: str
    agent: AgentSettings = dataclasses.field(default_factory=AgentSettings)
    identity: IdentitySettings = dataclasses.field(default_factory=IdentitySettings)
