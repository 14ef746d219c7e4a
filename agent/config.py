"""The local-file model: one YAML file describes a node's agent settings, the
namespaces (with their labels) and the workloads.  It plays the part of
ztunnel's LOCAL_XDS_PATH: the agent runs without a cluster, and the demo and
the tests drive it this way.

Enrollment follows Istio ambient: a workload is captured when its namespace
carries istio.io/dataplane-mode=ambient (or the pod does), unless the pod says
istio.io/dataplane-mode=none.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from typing import Any

import yaml

DATAPLANE_MODE = "istio.io/dataplane-mode"
USE_WAYPOINT = "istio.io/use-waypoint"
WAYPOINT_NOT_APPLIED = (
    "not applied: tether runs no waypoint (L7) proxy yet, so traffic to it goes "
    "direct over HBONE and only L4 authorization is enforced; L7 routes and "
    "policies attached to the waypoint have no effect"
)


class ConfigError(ValueError):
    """A field of the local file is wrong; the message names it and says what fits."""


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    namespace: str
    service_account: str
    node: str
    addresses: tuple[str, ...]
    labels: dict[str, str]
    netns: str | None = None
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
    def hostname(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"


@dataclasses.dataclass(frozen=True)
class IdentitySettings:
    trust_domain: str = "cluster.local"
    ca_dir: str | None = None  # local mode: root key and cert shared by the node agents
    cert_ttl: float | None = None  # seconds; None: the CA's default (24 h)
    ca_address: str | None = None  # host:port of an IstioCertificateService (tether ca, istiod)
    ca_root_file: str | None = None  # PEM of the mesh root; also verifies the CA's TLS
    token_file: str | None = None  # this node's bearer token for the CA
    ca_plaintext: bool = False  # gRPC without TLS to the CA (tests; never across nodes)


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


@dataclasses.dataclass(frozen=True)
class LocalConfig:
    node: str
    agent: AgentSettings
    namespaces: dict[str, dict[str, str]]  # name -> labels
    workloads: tuple[Workload, ...]
    services: tuple[Service, ...] = ()
    identity: IdentitySettings = dataclasses.field(default_factory=IdentitySettings)
    policies: tuple[dict[str, Any], ...] = ()  # Istio security documents, as given

    def enrolled(self, w: Workload) -> bool:
        mode = w.labels.get(DATAPLANE_MODE)
        if mode == "none":
            return False
        if mode == "ambient":
            return True
        return self.namespaces.get(w.namespace, {}).get(DATAPLANE_MODE) == "ambient"

    def local_enrolled(self) -> list[Workload]:
        return [w for w in self.workloads if w.node == self.node and self.enrolled(w)]

    def waypoint_uses(self) -> list[dict[str, str]]:
        """Every namespace, service and workload labelled istio.io/use-waypoint
        (the value `none` opts out), with what tether does about it."""
        out = []
        for ns, labels in sorted(self.namespaces.items()):
            if labels.get(USE_WAYPOINT, "none") != "none":
                out.append({"scope": "namespace", "name": ns, "waypoint": labels[USE_WAYPOINT]})
        for s in self.services:
            if s.labels.get(USE_WAYPOINT, "none") != "none":
                out.append(
                    {
                        "scope": "service",
                        "name": f"{s.namespace}/{s.name}",
                        "waypoint": s.labels[USE_WAYPOINT],
                    }
                )
        for w in self.workloads:
            if w.labels.get(USE_WAYPOINT, "none") != "none":
                out.append({"scope": "workload", "name": w.key, "waypoint": w.labels[USE_WAYPOINT]})
        return [{**u, "status": WAYPOINT_NOT_APPLIED} for u in out]


def _str_list(v: Any, where: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, str | int) for x in v):
        raise ConfigError(f"{where}: expected a list of strings")
    return tuple(str(x) for x in v)


def _ports(v: Any, where: str) -> tuple[int, ...]:
    out = []
    for x in _str_list(v, where):
        if not x.isdigit() or not 0 < int(x) < 65536:
            raise ConfigError(f"{where}: {x!r} is not a port number (1-65535)")
        out.append(int(x))
    return tuple(out)


def _named_with_addresses(d: Any, where: str) -> tuple[str, ...]:
    """Common to workloads and services: a mapping with name, namespace and
    a list of IP addresses; returns the addresses."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping")
    for field in ("name", "namespace"):
        if not isinstance(d.get(field), str) or not d[field]:
            raise ConfigError(f"{where}.{field}: required string")
    addrs = _str_list(d.get("addresses"), f"{where}.addresses")
    for a in addrs:
        try:
            ipaddress.ip_address(a)
        except ValueError:
            raise ConfigError(f"{where}.addresses: {a!r} is not an IP address") from None
    return addrs


def _workload(d: Any, i: int, node: str) -> Workload:
    where = f"workloads[{i}]"
    addrs = _named_with_addresses(d, where)
    cidrs = _str_list(d.get("excludeOutboundCIDRs"), f"{where}.excludeOutboundCIDRs")
    for c in cidrs:
        try:
            ipaddress.ip_network(c, strict=False)
        except ValueError:
            raise ConfigError(f"{where}.excludeOutboundCIDRs: {c!r} is not a CIDR") from None
    labels = d.get("labels") or {}
    if not isinstance(labels, dict):
        raise ConfigError(f"{where}.labels: expected a mapping")
    return Workload(
        name=d["name"],
        namespace=d["namespace"],
        service_account=str(d.get("serviceAccount", "default")),
        node=str(d.get("node", node)),
        addresses=addrs,
        labels={str(k): str(v) for k, v in labels.items()},
        netns=d.get("netns"),
        cgroup=d.get("cgroup"),
        exclude_outbound_ports=_ports(
            d.get("excludeOutboundPorts"), f"{where}.excludeOutboundPorts"
        ),
        exclude_inbound_ports=_ports(d.get("excludeInboundPorts"), f"{where}.excludeInboundPorts"),
        exclude_outbound_cidrs=cidrs,
    )


def _service(d: Any, i: int) -> Service:
    where = f"services[{i}]"
    addrs = _named_with_addresses(d, where)
    ports = []
    for j, p in enumerate(d.get("ports") or []):
        pw = f"{where}.ports[{j}]"
        if not isinstance(p, dict) or "port" not in p:
            raise ConfigError(f"{pw}: expected a mapping with port (and targetPort)")
        port = _ports([p["port"]], f"{pw}.port")[0]
        target = _ports([p.get("targetPort", port)], f"{pw}.targetPort")[0]
        ports.append(ServicePort(port, target))
    selector = d.get("selector") or {}
    if not isinstance(selector, dict):
        raise ConfigError(f"{where}.selector: expected a mapping of labels")
    labels = d.get("labels") or {}
    if not isinstance(labels, dict):
        raise ConfigError(f"{where}.labels: expected a mapping of labels")
    return Service(
        d["name"],
        d["namespace"],
        addrs,
        tuple(ports),
        {str(k): str(v) for k, v in selector.items()},
        labels={str(k): str(v) for k, v in labels.items()},
    )


def _policies(doc: dict[str, Any], base: Path | None) -> tuple[Any, ...]:
    """Documents as given; a file's non-mapping document (a list where a document was
    expected) is kept for the policy loader to report and fail closed on, never dropped."""
    out: list[Any] = []
    for i, p in enumerate(doc.get("policies") or []):
        if not isinstance(p, dict):
            raise ConfigError(f"policies[{i}]: expected an Istio document (a mapping)")
        out.append(p)
    for i, f in enumerate(doc.get("policyFiles") or []):
        path = Path(str(f))
        if base is not None and not path.is_absolute():
            path = base / path
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except OSError as e:
            raise ConfigError(f"policyFiles[{i}]: cannot read {path}: {e.strerror}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"policyFiles[{i}]: {path} is not valid YAML: {e}") from e
        out.extend(d for d in docs if d is not None)
    return tuple(out)


def parse(doc: Any, base: Path | None = None) -> LocalConfig:
    if not isinstance(doc, dict):
        raise ConfigError("the file must be a YAML mapping with node, agent, namespaces, workloads")
    node = doc.get("node")
    if not isinstance(node, str) or not node:
        raise ConfigError("node: required, the name of the node this agent runs on")
    a = doc.get("agent") or {}
    if not isinstance(a, dict):
        raise ConfigError("agent: expected a mapping")
    known = {
        "pinDir",
        "stateDir",
        "cgroup",
        "kubeletCgroups",
        "skMsg",
        "adminPort",
        "readyPort",
        "metricsPort",
        "podCgroupRoot",
    }
    unknown = set(a) - known
    if unknown:
        raise ConfigError(f"agent: unknown field(s) {sorted(unknown)}; known: {sorted(known)}")
    agent = AgentSettings(
        pin_dir=str(a.get("pinDir", AgentSettings.pin_dir)),
        state_dir=str(a.get("stateDir", AgentSettings.state_dir)),
        cgroup=a.get("cgroup"),
        kubelet_cgroups=_str_list(a.get("kubeletCgroups"), "agent.kubeletCgroups"),
        pod_cgroup_root=a.get("podCgroupRoot"),
        sk_msg=bool(a.get("skMsg", False)),
        admin_port=int(a.get("adminPort", 15000)),
        ready_port=int(a.get("readyPort", 15021)),
        metrics_port=int(a.get("metricsPort", 15020)),
    )
    namespaces: dict[str, dict[str, str]] = {}
    for i, ns in enumerate(doc.get("namespaces") or []):
        if not isinstance(ns, dict) or not isinstance(ns.get("name"), str):
            raise ConfigError(f"namespaces[{i}]: expected a mapping with a name")
        namespaces[ns["name"]] = {str(k): str(v) for k, v in (ns.get("labels") or {}).items()}
    workloads = []
    for i, w in enumerate(doc.get("workloads") or []):
        workloads.append(_workload(w, i, node))
    services = tuple(_service(s, i) for i, s in enumerate(doc.get("services") or []))
    ident = doc.get("identity") or {}
    if not isinstance(ident, dict):
        raise ConfigError(
            "identity: expected a mapping (trustDomain, caDir | caAddress, "
            "caRootFile, tokenFile, certTTL)"
        )
    identity = IdentitySettings(
        trust_domain=str(ident.get("trustDomain", "cluster.local")),
        ca_dir=ident.get("caDir"),
        cert_ttl=float(ident["certTTL"]) if ident.get("certTTL") is not None else None,
        ca_address=ident.get("caAddress"),
        ca_root_file=ident.get("caRootFile"),
        token_file=ident.get("tokenFile"),
        ca_plaintext=bool(ident.get("caPlaintext", False)),
    )
    if identity.ca_address and identity.ca_dir:
        raise ConfigError("identity: give caDir (embedded CA) or caAddress (remote CA), not both")
    return LocalConfig(
        node, agent, namespaces, tuple(workloads), services, identity, _policies(doc, base)
    )


def load(path: str | Path) -> LocalConfig:
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e
    return parse(doc, Path(path).parent)
