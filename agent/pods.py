"""The enrolled pods: make the datapath and the in-pod listeners match the
state.  Reads a StateView, never writes state; the datapath changes only
through here (enroll/unenroll), plus the tunnel's per-connection
DeliveryBypass.

The delivery routing inside a pod's netns (agent/datapath/podnet.py) is
installed by a worker process before the pod is enrolled (`prepare`,
awaited ahead of `reconcile`) and removed after it is unenrolled (`settle`):
the agent never imports pyroute2, and the worker's start never stalls the
event loop.

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

from agent.datapath import podnet
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
        routing: podnet.Worker | None = None,
    ) -> None:
        self.datapath = datapath
        self.tunnel = tunnel
        self.certs = certs
        self.kube = kube
        self.report = report
        self.proxies: dict[str, PodProxy] = tunnel.local
        self.errors: dict[str, str] = {}
        self.routing = routing if routing is not None else podnet.Worker()
        # pod key -> the netns its delivery routing is installed in
        self.routed: dict[str, str] = {}
        self._route_errors: dict[str, str] = {}
        self._unroute: list[str] = []  # netns to remove the routing from, in order
        # identities other parts of the agent hold certificates for (the local
        # waypoints'): kept when the pods' set is retained
        self.keep_identities: Callable[[StateView], Iterable[SpiffeId]] | None = None

    async def prepare(self, view: StateView) -> None:
        """Before `reconcile(view)`: install the delivery routing in the netns
        of every pod it will enroll.  A pod a previous agent enrolled in the
        same netns has it already (a handoff does not wait for the worker).
        A failure is the pod's: `reconcile` reports it and skips the pod."""
        await self.settle()
        for w in view.local_enrolled():
            if w.key in self.proxies or not w.netns or self.routed.get(w.key) == w.netns:
                continue
            if w.netns == self.datapath.adopted_netns(w.key):
                self.routed[w.key] = w.netns
                continue
            try:
                await self.routing.call("prepare", w.netns)
            except OSError as e:
                self._route_errors[w.key] = (
                    f"delivery routing not installed in {w.netns}: {e}; fix the pod's "
                    "netns (or the agent's privileges) and the next update retries"
                )
                continue
            self.routed[w.key] = w.netns
            self._route_errors.pop(w.key, None)

    async def settle(self) -> None:
        """Remove the delivery routing from the netns of pods unenrolled
        since (those still there: a deleted pod's goes with its netns)."""
        while self._unroute:
            ns = self._unroute.pop(0)
            if not os.path.exists(ns):
                continue
            try:
                await self.routing.call("unprepare", ns)
            except OSError as e:  # the rules only steer the agent's own marked packets
                log.warning("delivery routing left in %s: %s", ns, e)

    def reconcile(
        self, view: StateView, inherited: dict[str, dict[str, Any]] | None = None
    ) -> None:
        want = {w.key: w for w in view.local_enrolled()}
        gone = [k for k in self.proxies if k not in want]
        gone += [k for k in self.datapath.leftover_pods() if k not in want and k not in gone]
        gone += [k for k in self.routed if k not in want and k not in gone]
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
        ns = self.routed.pop(key, None) or self.datapath.adopted_netns(key)
        self._route_errors.pop(key, None)
        if ns is not None:
            self._unroute.append(ns)
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
        if self.routed.get(w.key) != w.netns:
            raise PodError(
                w.key,
                self._route_errors.get(w.key)
                or f"delivery routing not installed in {w.netns} (Pods.prepare did not run)",
            )
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
        self.routing.close()
