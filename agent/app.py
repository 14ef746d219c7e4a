"""The node agent process: reconcile the desired pods (from the local file)
with the datapath and the in-pod listeners, serve admin and metrics, and hand
everything it can to a successor on restart.

One writer: only Agent.reconcile() changes the state store and what is
enrolled; the tunnel, the datapath and the admin endpoint read.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import ssl
from datetime import timedelta
from pathlib import Path
from typing import Any

from agent import cgroupfs, handoff, rbac
from agent import config as localconfig
from agent.datapath.datapath import Datapath, DatapathConfig, PodSpec, check_pod
from agent.datapath.errors import DatapathError, PodError
from agent.datapath.loader import BuildOptions
from agent.datapath.structs import Listen
from agent.identity.ca import CertificateAuthority
from agent.identity.manager import CertificateManager, CertificateSource, EmbeddedCA
from agent.identity.spiffe import SpiffeId
from agent.metrics import Metrics
from agent.state.store import Store
from agent.tunnel.conns import ConnTable
from agent.tunnel.h2conn import drain_all
from agent.tunnel.hbone import HboneClient
from agent.tunnel.proxy import AuthzRequest, AuthzResult, PodProxy, PodRef, Ports, Tunnel

log = logging.getLogger(__name__)

LISTEN_KINDS = {
    "in4": Listen.PLAIN4,
    "in6": Listen.PLAIN6,
    "hbone4": Listen.HBONE4,
    "hbone6": Listen.HBONE6,
}
BIND_RETRY = 30.0  # a predecessor frees the node's ports when it hands over
DEFAULT_CERT_TTL = timedelta(hours=24)
DRAIN_TIMEOUT = float(os.environ.get("TETHER_DRAIN_TIMEOUT", "300"))
STOP_DRAIN_TIMEOUT = 5.0  # plain shutdown: HBONE streams get this long after GOAWAY


class Policies:
    """Istio security policy for the tunnel, enforced at the destination."""

    def __init__(self) -> None:
        self.store = rbac.PolicyStore()
        self.report: Any = None
        self._docs: tuple[dict[str, Any], ...] = ()

    def load(self, docs: tuple[dict[str, Any], ...]) -> bool:
        """Load the full set; True if it differs from the last one."""
        if self.report is not None and docs == self._docs:
            return False
        self._docs = docs
        self.report = self.store.load(docs, replace=True)
        for err in getattr(self.report, "errors", ()):
            log.error("policy not applied: %s", err)
        return True

    def authorize(self, req: AuthzRequest) -> AuthzResult:
        d = self.store.evaluate(
            rbac.Conn.make(req.src_ip, req.src_identity, req.dst_ip, req.dst_port, req.workload)
        )
        return AuthzResult(d.allowed, d.reason, d.policy)

    def plaintext_allowed(self, workload: localconfig.Workload, port: int) -> bool:
        return self.store.plaintext_allowed(workload, port)

    def describe(self) -> Any:
        return self.store.describe()


def _agent_cgroup() -> str:
    """The agent's own cgroup v2 directory.  In a pod, /proc/self/cgroup is
    relative to the container's cgroup namespace ("0::/"), which would name
    the host's root: find the pod's directory by POD_UID instead."""
    uid = os.environ.get("POD_UID")
    if uid:
        from agent.sources.podfs import find_cgroup

        return str(find_cgroup(uid))
    return str(cgroupfs.own_cgroup())


class Agent:
    def __init__(
        self, config_path: str, skmsg: bool | None = None, kube: dict[str, Any] | None = None
    ) -> None:
        """kube: None for local-file mode; else {"node": ..., "kubeconfig": ...}:
        agent and identity settings still come from the file, the mesh from
        the Kubernetes API."""
        self.config_path = config_path
        self.kube = kube
        self.cfg = localconfig.load(config_path)
        if kube is not None:
            self.cfg = dataclasses.replace(
                self.cfg, node=kube["node"], namespaces={}, workloads=(), services=(), policies=()
            )
        self.source: Any = None
        s = self.cfg.agent
        self.datapath = Datapath(
            DatapathConfig(
                build=BuildOptions(pin_dir=s.pin_dir),
                state_dir=s.state_dir,
                agent_cgroup=s.cgroup or _agent_cgroup(),
                kubelet_cgroups=s.kubelet_cgroups,
                skmsg=s.sk_msg if skmsg is None else skmsg,
            )
        )
        self.store = Store(self.cfg.identity.trust_domain)
        self.policies = Policies()
        self.conns = ConnTable()
        self.metrics = Metrics(self.datapath.stats)
        self.conns.on_open.append(self.metrics.on_open)
        self.conns.on_close.append(self.metrics.on_close)
        self.certs: CertificateManager | None = None
        self.tunnel: Tunnel | None = None
        self.proxies: dict[str, PodProxy] = {}
        self.errors: dict[str, str] = {}
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._waypoints_reported: set[tuple[str, str, str]] = set()
        self.handed_off = False  # a successor took (or we released) our listeners: drain, then stop
        self._mtime = 0.0

    # -- identity ------------------------------------------------------------

    def _make_certs(self) -> CertificateManager | None:
        """Embedded CA (local mode, caDir shared by the nodes) or a remote
        IstioCertificateService (`tether ca` or istiod) asked with this node's
        token and ImpersonatedIdentity."""
        ident = self.cfg.identity
        ttl = timedelta(seconds=ident.cert_ttl) if ident.cert_ttl else None
        tmp = Path(self.cfg.agent.state_dir) / "tls"
        tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
        source: CertificateSource
        if ident.ca_address:
            # grpc only when a remote CA is used: it costs ~18 MiB resident
            import grpc

            from agent.identity.client import CaClient, token_file

            roots = Path(ident.ca_root_file).read_text() if ident.ca_root_file else ""
            creds = (
                None
                if ident.ca_plaintext
                else grpc.ssl_channel_credentials(roots.encode() if roots else None)
            )
            source = CaClient(
                ident.ca_address,
                token=token_file(ident.token_file) if ident.token_file else None,
                trust_roots=[roots] if roots else (),
                channel_credentials=creds,
                ttl=ttl or DEFAULT_CERT_TTL,
            )
        elif ident.ca_dir:
            ca = CertificateAuthority.load_or_generate(ident.ca_dir, ident.trust_domain)
            source = EmbeddedCA(ca, ttl)
        else:
            log.warning(
                "no identity.caDir or caAddress: mesh traffic is passed through in plaintext"
            )
            return None
        return CertificateManager(source, tls_tmp_dir=str(tmp))

    # -- reconcile ----------------------------------------------------------

    def reconcile(self, inherited: dict[str, dict[str, Any]] | None = None) -> None:
        """Make the store and the enrolled pods match the config.  One bad pod
        is reported and skipped; it never stops the others."""
        self.store.replace(self.cfg)
        changed = self.policies.load(self.cfg.policies)
        waypoints = self.cfg.waypoint_uses()
        for u in waypoints:
            if (u["scope"], u["name"], u["waypoint"]) not in self._waypoints_reported:
                log.warning(
                    "%s %s uses waypoint %s: %s", u["scope"], u["name"], u["waypoint"], u["status"]
                )
        self._waypoints_reported = {(u["scope"], u["name"], u["waypoint"]) for u in waypoints}
        want = {w.key: w for w in self.cfg.local_enrolled()}
        gone = [k for k in self.proxies if k not in want]
        gone += [k for k in self.datapath.leftover_pods() if k not in want]
        for key in gone:
            try:
                self.datapath.unenroll(key)
            except (OSError, DatapathError) as e:
                self.errors[key] = f"unenroll failed: {e}"
                log.error("pod %s: unenroll failed: %s", key, e)
            proxy = self.proxies.pop(key, None)
            if proxy is not None:
                proxy.close()
        if self.certs is not None:
            self.certs.retain(self.store.identity_of(w) for w in want.values())
        if changed:
            for p in self.proxies.values():
                n = p.revalidate()
                if n:
                    log.info("policy change closed %d connections of %s", n, p.pod.key)
        for key, w in want.items():
            if key in self.proxies:
                continue
            try:
                self._enroll(w, (inherited or {}).get(key))
                self.errors.pop(key, None)
            except (PodError, OSError, DatapathError) as e:
                self.errors[key] = str(e)
                log.error("%s", e)
        if self.source is not None:
            for key in want:
                self.source.report(
                    key, "enabled" if key in self.proxies else "failed", self.errors.get(key, "")
                )
            for key in gone:
                self.source.report(key, "disabled")

    def _enroll(self, w: localconfig.Workload, inherited: dict[str, Any] | None) -> None:
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
        assert self.tunnel is not None
        identity = self.store.identity_of(w)
        if self.certs is not None:
            self.certs.prefetch(identity)
        proxy = PodProxy(PodRef(w.key, w.netns, w.addresses, w, identity), Ports(), self.tunnel)
        if inherited:
            proxy.adopt(inherited["listeners"])
        else:
            proxy.open()
        try:
            self.datapath.enroll(
                spec, {LISTEN_KINDS[k]: s for k, s in proxy.listeners.items() if k in LISTEN_KINDS}
            )
        except Exception:
            proxy.close()
            raise
        proxy.serve()
        if inherited:
            for c in inherited["connections"]:
                proxy.resume(c)
        self.proxies[w.key] = proxy

    # -- run ----------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        inherited = await handoff.receive(self.cfg.agent.state_dir)
        await loop.run_in_executor(None, self.datapath.start)
        self.certs = self._make_certs()
        hbone = None
        server_ctx = None
        if self.certs is not None:
            certs = self.certs

            async def client_ctx(i: SpiffeId) -> ssl.SSLContext:
                return await certs.ssl_context_client(i)

            async def server_ctx_(i: SpiffeId) -> ssl.SSLContext:
                return await certs.ssl_context_server(i)

            hbone = HboneClient(client_ctx)
            server_ctx = server_ctx_
        if self.kube is not None:
            await self._start_kube(loop)
        self.tunnel = Tunnel(
            self.datapath,
            self.store,
            self.conns,
            self.policies,
            hbone,
            server_ctx,
            splicing=self.datapath.config.skmsg,
            local=self.proxies,
        )
        self.reconcile(inherited)
        servers = [
            await _bind(self._admin, "127.0.0.1", self.cfg.agent.admin_port, "admin"),
            await _bind(self._ready_only, "127.0.0.1", self.cfg.agent.ready_port, "readiness"),
            await _bind(self._metrics, "0.0.0.0", self.cfg.agent.metrics_port, "metrics"),
        ]
        giver = await handoff.serve(self.cfg.agent.state_dir, self._give, self._release, self._stop)
        self._mtime = os.stat(self.config_path).st_mtime
        self.ready.set()
        log.info(
            "agent ready: %d pods enrolled, admin on 127.0.0.1:%d, readiness on "
            "127.0.0.1:%d, metrics on :%d",
            len(self.proxies),
            self.cfg.agent.admin_port,
            self.cfg.agent.ready_port,
            self.cfg.agent.metrics_port,
        )
        watcher = loop.create_task(self._watch() if self.kube is None else self._idle())
        await self._stop.wait()
        watcher.cancel()
        if self.source is not None:
            self.source.stop()
        for srv in servers:
            srv.close()  # free the node's ports at once for the successor
        giver.close()
        if self.handed_off:
            # GOAWAY moves the peers' new streams to the successor at once
            await asyncio.gather(drain_all(DRAIN_TIMEOUT), self._drain())
            if self.kube is not None:
                # A DaemonSet restarts an exited container, and a restarted old
                # agent would take everything back: stay idle until the pod is
                # deleted (SIGTERM).
                self._stop.clear()
                log.info("handed over and drained; idle until terminated")
                await self._stop.wait()
        await drain_all(STOP_DRAIN_TIMEOUT)  # GOAWAYs, then close_notify on every connection
        for p in self.proxies.values():
            p.close()
        if hbone is not None:
            hbone.close()
        if self.certs is not None:
            await self.certs.close()
        self.datapath.close()
        log.info("agent stopped")

    async def _start_kube(self, loop: asyncio.AbstractEventLoop) -> None:
        from agent.sources.k8s import KubeSource

        assert self.kube is not None
        first = asyncio.Event()

        def on_snapshot(cfg: localconfig.LocalConfig) -> None:
            self.cfg = cfg
            first.set()
            if self.tunnel is not None:
                try:
                    self.reconcile()
                except Exception:
                    log.exception("reconcile failed; retrying on the next change")

        root = self.cfg.agent.pod_cgroup_root
        self.source = KubeSource(
            self.kube["node"],
            self.cfg.agent,
            self.cfg.identity,
            kubeconfig=self.kube.get("kubeconfig"),
            cgroup_root=Path(root) if root else None,
        )
        self.source.start(loop, on_snapshot)
        try:
            await asyncio.wait_for(first.wait(), 60)
        except TimeoutError:
            log.error(
                "no complete snapshot from the API server in 60 s (%s); starting with "
                "nothing enrolled",
                self.source.errors,
            )

    async def _idle(self) -> None:
        await asyncio.Event().wait()

    async def _drain(self) -> None:
        """After a handoff: HBONE connections (TLS state lives here) run to
        their end, bounded by DRAIN_TIMEOUT, while the successor serves new ones."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_TIMEOUT
        while self.conns.open and loop.time() < deadline:
            await asyncio.sleep(0.2)
        if self.conns.open:
            log.warning("drain timeout: closing %d connections", len(self.conns.open))

    async def _watch(self) -> None:
        """Reload the local file when it changes (bounded poll, 1 s)."""
        while True:
            await asyncio.sleep(1.0)
            try:
                m = os.stat(self.config_path).st_mtime
                if m == self._mtime:
                    continue
                self._mtime = m
                self.cfg = localconfig.load(self.config_path)
            except (OSError, localconfig.ConfigError) as e:
                log.error("config reload failed, keeping the last good one: %s", e)
                continue
            try:
                self.reconcile()
            except Exception:
                log.exception("reconcile failed; retrying on the next change")

    async def _give(self) -> handoff.Bundle:
        """Freeze every pod's listeners and plain relays for a successor."""
        bundle: handoff.Bundle = {}
        for key, p in self.proxies.items():
            bundle[key] = await p.freeze()
        self.handed_off = True
        return bundle

    async def _release(self) -> None:
        """A successor we cannot hand sockets to (another handoff version):
        free the pods' listeners for it and keep every open connection here."""
        for p in self.proxies.values():
            p.release()
        self.handed_off = True

    # -- admin --------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "node": self.cfg.node,
            "ready": self.ready.is_set(),
            "datapath": self.datapath.status(),
            "pod_errors": self.errors,
            "source": self.source.describe()
            if self.source is not None
            else {"file": self.config_path},
            "state": self.store.describe(),
            "policies": self.policies.describe(),
            "waypoints": self.cfg.waypoint_uses(),
            "certificates": self.certs.describe() if self.certs else [],
            "hbone_pool": self.tunnel.hbone.describe() if self.tunnel and self.tunnel.hbone else [],
            "connections": {
                "open": [c.record() for c in self.conns.open.values()],
                "closed": [c.record() for c in self.conns.closed[-200:]],
            },
        }

    async def _ready_only(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        """:15021, Istio's readiness port: /healthz/ready only (no config on it)."""
        await self._admin(r, w, allowed=("/healthz/ready", "/healthz", "/ready"))

    async def _metrics(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await self._admin(r, w, allowed=("/metrics",))

    async def _admin(
        self,
        r: asyncio.StreamReader,
        w: asyncio.StreamWriter,
        allowed: tuple[str, ...] | None = None,
    ) -> None:
        """Minimal HTTP/1.0: /healthz, /ready, /config_dump, /connections, /metrics."""
        try:
            line = (await asyncio.wait_for(r.readline(), 5)).decode(errors="replace")
            with contextlib.suppress(asyncio.TimeoutError):
                while (await asyncio.wait_for(r.readline(), 5)) not in (b"\r\n", b"\n", b""):
                    pass
            path = line.split(" ")[1] if line.count(" ") >= 2 else "/"
            code, body = 200, b""
            if allowed is not None and path not in allowed:
                code, body = 404, f"not found: {' '.join(allowed)}\n".encode()
            elif path == "/metrics":
                body = self.metrics.exposition()
            elif path == "/healthz":
                body = b"ok\n"
            elif path in ("/ready", "/healthz/ready"):
                code, body = (200, b"ready\n") if self.ready.is_set() else (503, b"starting\n")
            elif path in ("/config_dump", "/status"):
                body = json.dumps(self.status(), indent=1, default=str).encode()
            elif path == "/connections":
                body = json.dumps(self.status()["connections"], indent=1).encode()
            else:
                code, body = 404, b"not found: /healthz /ready /config_dump /connections\n"
            w.write(f"HTTP/1.0 {code} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            await w.drain()
        finally:
            w.close()


async def _bind(handler: Any, host: str, port: int, what: str) -> asyncio.AbstractServer:
    """Listen, retrying for a bounded time: during a rolling update the old
    agent holds the port until it has handed over."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BIND_RETRY
    while True:
        try:
            return await asyncio.start_server(handler, host, port)
        except OSError as e:
            if loop.time() > deadline:
                raise DatapathError(f"cannot listen on {host}:{port} for {what}: {e}") from e
            await asyncio.sleep(0.2)


def main_run(config_path: str, skmsg: bool | None, kube: dict[str, Any] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("TETHER_LOG", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        agent = Agent(config_path, skmsg, kube)
    except localconfig.ConfigError as e:
        log.error("%s", e)
        return 2
    try:
        asyncio.run(agent.run())
    except DatapathError as e:
        log.error("%s", e)
        return 1
    return 0
