"""The enrolled pods: make the datapath and the in-pod listeners match the
state.  Reads a StateView, never writes state; the datapath changes only
through here (enroll/unenroll), plus the tunnel's per-connection
DeliveryBypass.

One bad pod is reported and skipped; it never stops the others.  A pod whose
network namespace disappears under a live agent (deleted without the source
noticing yet) is found by a periodic check and unenrolled, with the reason
kept in `errors`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

from agent.datapath.datapath import Datapath, PodSpec, check_pod
from agent.datapath.errors import DatapathError, PodError
from agent.datapath.structs import Listen
from agent.identity.manager import CertificateManager
from agent.identity.spiffe import SpiffeId
from agent.model import Workload
from agent.state.state import StateView
from agent.tunnel.context import PodRef, Ports, Tunnel
from agent.tunnel.pod import PodProxy

log = logging.getLogger(__name__)

LISTEN_KINDS = {
    "in4": Listen.PLAIN4,
    "in6": Listen.PLAIN6,
    "hbone4": Listen.HBONE4,
    "hbone6": Listen.HBONE6,
}

Report = Callable[[str, str, str], None]  # (pod key, enabled|failed|disabled, message)


class Pods:
    def __init__(
        self,
        datapath: Datapath,
        tunnel: Tunnel,
        certs: CertificateManager | None,
        *,
        kube: bool = False,
        report: Report | None = None,
    ) -> None:
        self.datapath = datapath
        self.tunnel = tunnel
        self.certs = certs
        self.kube = kube
        self.report = report
        self.proxies: dict[str, PodProxy] = tunnel.local
        self.errors: dict[str, str] = {}
        # identities other parts of the agent hold certificates for (the local
        # waypoints'): kept when the pods' set is retained
        self.keep_identities: Callable[[StateView], Iterable[SpiffeId]] | None = None

    def reconcile(
        self, view: StateView, inherited: dict[str, dict[str, Any]] | None = None
    ) -> None:
        want = {w.key: w for w in view.local_enrolled()}
        gone = [k for k in self.proxies if k not in want]
        gone += [k for k in self.datapath.leftover_pods() if k not in want and k not in gone]
        for key in gone:
            self._unenroll(key)
            self.errors.pop(key, None)
        if self.certs is not None:
            keep = list(self.keep_identities(view)) if self.keep_identities is not None else []
            self.certs.retain([*(view.identity_of(w) for w in want.values()), *keep])
        for key, w in want.items():
            if key in self.proxies:
                continue
            try:
                self._enroll(view, w, (inherited or {}).get(key))
                self.errors.pop(key, None)
            except (PodError, OSError, DatapathError) as e:
                self.errors[key] = str(e)
                log.error("%s", e)
        if self.report is not None:
            for key in want:
                state = "enabled" if key in self.proxies else "failed"
                self.report(key, state, self.errors.get(key, ""))
            for key in gone:
                self.report(key, "disabled", "")

    def check_netns(self, view: StateView) -> list[str]:
        """Unenroll every pod whose network namespace is gone; returns their keys."""
        lost = []
        for key, proxy in list(self.proxies.items()):
            if os.path.exists(proxy.pod.netns):
                continue
            lost.append(key)
            log.warning("pod %s: network namespace %s is gone; unenrolling", key, proxy.pod.netns)
            self._unenroll(key)
            self.errors[key] = (
                f"network namespace {proxy.pod.netns} disappeared (pod deleted?); "
                "unenrolled until the pod's record changes"
            )
            if self.report is not None:
                self.report(key, "failed", self.errors[key])
        return lost

    def _unenroll(self, key: str) -> None:
        try:
            self.datapath.unenroll(key)
        except (OSError, DatapathError) as e:
            self.errors[key] = f"unenroll failed: {e}"
            log.error("pod %s: unenroll failed: %s", key, e)
        proxy = self.proxies.pop(key, None)
        if proxy is not None:
            proxy.close()

    def _enroll(self, view: StateView, w: Workload, inherited: dict[str, Any] | None) -> None:
        if not w.netns or not w.cgroup:
            raise PodError(
                w.key,
                "no netns/cgroup for this pod: "
                + (
                    "its cgroup v2 directory or sandbox process was not found on this node "
                    "(agent/sources/podfs.py lists the layouts understood)"
                    if self.kube
                    else "the local file gives none"
                ),
            )
        spec = PodSpec(
            key=w.key,
            netns=w.netns,
            cgroup=w.cgroup,
            ips=w.addresses,
            exclude_out_ports=w.exclude_outbound_ports,
            exclude_in_ports=w.exclude_inbound_ports,
            exclude_out_cidrs=w.exclude_outbound_cidrs,
        )
        check_pod(spec)
        identity = view.identity_of(w)
        if self.certs is not None:
            self.certs.prefetch(identity)
        proxy = PodProxy(PodRef(w.key, w.netns, w.addresses, w, identity), Ports(), self.tunnel)
        if inherited:
            proxy.adopt(inherited["listeners"])
        else:
            proxy.open()
        try:
            self.datapath.enroll(
                spec,
                {LISTEN_KINDS[k]: s for k, s in proxy.listeners.items() if k in LISTEN_KINDS},
            )
        except Exception:
            proxy.close()
            raise
        proxy.serve()
        if inherited:
            for c in inherited["connections"]:
                proxy.resume(c)
        self.proxies[w.key] = proxy

    def close(self) -> None:
        for p in self.proxies.values():
            p.close()
