"""The agent's view of the mesh: workloads, services, policies.

One writer: `Store.replace()` is called by the agent's reconcile with a full
snapshot from a source (the local file today, the Kubernetes watchers next).
Everyone else reads: the tunnel through `resolve()` and `workload_by_ip()`,
the datapath through the list of local enrolled workloads.  Lookups are
dictionary hits; nothing on the connection path scans.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import itertools
import threading
from collections.abc import Iterable
from typing import Any

from agent.config import LocalConfig, Service, ServicePort, Workload
from agent.identity.spiffe import SpiffeId


@dataclasses.dataclass(frozen=True)
class Target:
    """Where an outbound connection goes, as the source node decides it."""

    address: tuple[str, int]  # the endpoint to reach (pod IP:targetPort, or the original)
    workload: Workload | None  # None: outside the mesh's knowledge
    service: Service | None
    hbone: bool  # the destination is captured by a mesh node: tunnel it
    identity: SpiffeId | None  # expected peer identity for HBONE

    @property
    def authority(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Store:
    def __init__(self, trust_domain: str = "cluster.local") -> None:
        self.trust_domain = trust_domain
        self._lock = threading.Lock()
        self.config: LocalConfig | None = None
        self._by_ip: dict[str, Workload] = {}
        self._vips: dict[tuple[str, int], tuple[Service, ServicePort]] = {}
        self._rr = itertools.count()

    def replace(self, cfg: LocalConfig) -> None:
        by_ip: dict[str, Workload] = {}
        for w in cfg.workloads:
            for a in w.addresses:
                by_ip[_norm(a)] = w
        vips: dict[tuple[str, int], tuple[Service, ServicePort]] = {}
        for s in cfg.services:
            for vip in s.addresses:
                for p in s.ports:
                    vips[(_norm(vip), p.port)] = (s, p)
        with self._lock:
            self.config = cfg
            self._by_ip = by_ip
            self._vips = vips

    def identity_of(self, w: Workload) -> SpiffeId:
        return SpiffeId(self.trust_domain, w.namespace, w.service_account)

    def workload_by_ip(self, ip: str) -> Workload | None:
        return self._by_ip.get(_norm(ip))

    def captured(self, w: Workload) -> bool:
        """Does a mesh node capture this workload (so it speaks HBONE)?"""
        return self.config is not None and self.config.enrolled(w)

    def endpoints(self, s: Service) -> list[Workload]:
        cfg = self.config
        if cfg is None:
            return []
        return [
            w
            for w in cfg.workloads
            if w.namespace == s.namespace
            and w.addresses
            and all(w.labels.get(k) == v for k, v in s.selector.items())
        ]

    def resolve(self, dst: tuple[str, int]) -> Target:
        """Pick the endpoint for an original destination (ztunnel's choice):
        a service VIP load-balances over its endpoints; a pod IP is itself;
        anything else is passed through untouched."""
        ip, port = _norm(dst[0]), dst[1]
        svc = self._vips.get((ip, port))
        if svc is not None:
            service, sport = svc
            if service.endpoints is not None:
                return self._from_slices(service, sport, ip, port)
            target_port = sport.target_port
            eps = self.endpoints(service)
            if eps:
                ep = eps[next(self._rr) % len(eps)]
                addr = _same_family(ep.addresses, ip)
                return self._target((addr, target_port), ep, service)
            return Target((ip, port), None, service, False, None)
        w = self.workload_by_ip(ip)
        if w is None:
            return Target((ip, port), None, None, False, None)
        return self._target((ip, port), w, None)

    def _from_slices(self, service: Service, sport: ServicePort, ip: str, port: int) -> Target:
        """EndpointSlice endpoints: ready addresses with resolved (named) ports;
        an endpoint that is no known workload is reached without the tunnel."""
        assert service.endpoints is not None
        want = ipaddress.ip_address(ip).version
        eps = [e for e in service.endpoints if ipaddress.ip_address(e.address).version == want]
        if not eps:
            return Target((ip, port), None, service, False, None)
        ep = eps[next(self._rr) % len(eps)]
        target = (ep.address, ep.ports.get(sport.name, sport.target_port))
        w = self.workload_by_ip(ep.address)
        if w is None:
            return Target(target, None, service, False, None)
        return self._target(target, w, service)

    def _target(self, addr: tuple[str, int], w: Workload, s: Service | None) -> Target:
        # A port the destination excludes from inbound capture takes no tunnel.
        hbone = self.captured(w) and addr[1] not in w.exclude_inbound_ports
        return Target(addr, w, s, hbone, self.identity_of(w) if hbone else None)

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        if cfg is None:
            return {}
        return {
            "node": cfg.node,
            "trust_domain": self.trust_domain,
            "workloads": [
                {
                    "name": w.key,
                    "node": w.node,
                    "addresses": list(w.addresses),
                    "identity": self.identity_of(w).uri,
                    "captured": self.captured(w),
                }
                for w in cfg.workloads
            ],
            "services": [
                {
                    "name": f"{s.namespace}/{s.name}",
                    "addresses": list(s.addresses),
                    "ports": [{"port": p.port, "targetPort": p.target_port} for p in s.ports],
                    "endpoints": [e.address for e in s.endpoints]
                    if s.endpoints is not None
                    else [w.key for w in self.endpoints(s)],
                }
                for s in cfg.services
            ],
        }


def _norm(ip: str) -> str:
    a = ipaddress.ip_address(ip)
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped:
        return str(a.ipv4_mapped)
    return str(a)


def _same_family(addresses: Iterable[str], like: str) -> str:
    want = ipaddress.ip_address(like).version
    addrs = list(addresses)
    for a in addrs:
        if ipaddress.ip_address(a).version == want:
            return a
    return addrs[0]
