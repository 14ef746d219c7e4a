"""The node agent process: the wiring.

    source (local file | Kubernetes) --Snapshot--> ProxyState.apply (one writer,
    on a worker thread) --StateView--> Pods.reconcile (datapath + listeners)
                                   --> tunnel (outbound decision, L4 policy)
                                   --> revalidate open connections on a policy change

plus the admin, readiness and metrics servers, and the restart handoff.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import resource
import signal
import ssl
from pathlib import Path
from typing import Any

from agent import cgroupfs, eventloop, handoff
from agent.admin import HttpServer, Response
from agent.datapath.datapath import Datapath, DatapathConfig
from agent.datapath.errors import DatapathError
from agent.datapath.loader import BuildOptions
from agent.identity.embedded import IssueError
from agent.identity.manager import CertificateManager
from agent.identity.setup import certificate_manager
from agent.identity.spiffe import SpiffeId
from agent.metrics import Metrics
from agent.model import NodeSettings, Snapshot
from agent.pods import Pods
from agent.sources import localfile
from agent.state.state import Change, ProxyState
from agent.tunnel import h2conn, limits, tlssock
from agent.tunnel.conns import ConnTable
from agent.tunnel.context import Tunnel
from agent.tunnel.h2conn import drain_all
from agent.tunnel.hbone import HboneClient
from agent.tunnel.loops import Loops, call_on, configured
from agent.tunnel.watcher import revalidate
from agent.waypoints import Waypoints

log = logging.getLogger(__name__)

DRAIN_TIMEOUT = float(os.environ.get("TETHER_DRAIN_TIMEOUT", "300"))
NETNS_CHECK_INTERVAL = 2.0
STOP_DRAIN_TIMEOUT = 5.0  # plain shutdown: HBONE streams get this long after GOAWAY


def raise_fd_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit, as Envoy and Go
    servers do: every relayed connection holds two or three descriptors, and
    the usual soft limit (1024) would cap a node at a few hundred
    connections.  Returns the (soft, hard) now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-files limit from %d to %d: %s", soft, hard, e)
    return soft, hard


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
        first = localfile.load(config_path)
        self.settings: NodeSettings = first.settings
        self.first_snapshot = first.snapshot
        if kube is not None:
            self.settings = dataclasses.replace(self.settings, node=kube["node"])
            self.first_snapshot = Snapshot(kube["node"])
        self.file = localfile.LocalFileSource(config_path, first) if kube is None else None
        self.kube_source: Any = None
        self.deployer: Any = None  # Kubernetes mode: agent/sources/waypoint_deploy.py
        s = self.settings.agent
        self.datapath = Datapath(
            DatapathConfig(
                build=BuildOptions(pin_dir=s.pin_dir),
                state_dir=s.state_dir,
                agent_cgroup=s.cgroup or _agent_cgroup(),
                kubelet_cgroups=s.kubelet_cgroups,
                skmsg=s.sk_msg if skmsg is None else skmsg,
            )
        )
        self.state = ProxyState(self.settings.node, self.settings.identity.trust_domain)
        self.conns = ConnTable()
        self.metrics = Metrics(self.datapath.stats)
        self.conns.on_open.append(self.metrics.on_open)
        self.conns.on_close.append(self.metrics.on_close)
        self.certs: CertificateManager | None = None
        self.pods: Pods | None = None
        self.tunnel: Tunnel | None = None
        self.waypoints: Waypoints | None = None
        self.loops = Loops(configured(s.tunnel_loops))
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._applying = asyncio.Lock()
        self._latest: Snapshot | None = None
        self._inherited: dict[str, dict[str, Any]] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._waypoints_reported: set[tuple[str, str, str]] = set()
        self.handed_off = False  # a successor took (or we released) our listeners

    # -- state --------------------------------------------------------------

    async def apply(self, snapshot: Snapshot) -> None:
        """Install a snapshot (built off the loop) and act on it.  Snapshots
        that arrive while one is applied collapse into the newest."""
        self._latest = snapshot
        async with self._applying:
            if self._latest is not snapshot:
                return  # a newer one is queued behind us
            loop = asyncio.get_running_loop()
            change = await loop.run_in_executor(None, self.state.apply, snapshot)
            await self._act(change)

    async def _act(self, change: Change) -> None:
        view = change.view
        if change.policies_changed:
            for err in view.policy_report.errors:
                log.error("policy not applied: %s", err)
        uses = view.snapshot.waypoint_uses()
        seen = {(str(u["scope"]), str(u["name"]), str(u["status"])) for u in uses}
        for u in uses:
            if (str(u["scope"]), str(u["name"]), str(u["status"])) not in self._waypoints_reported:
                (log.info if u["resolved"] else log.warning)(
                    "%s %s uses waypoint %s: %s", u["scope"], u["name"], u["waypoint"], u["status"]
                )
        self._waypoints_reported = seen
        assert self.pods is not None and self.tunnel is not None
        if change.policies_changed or change.guards_changed:
            tunnel = self.tunnel

            async def here() -> dict[str, int]:
                return revalidate(tunnel)

            closed: dict[str, int] = {}
            for per_loop in await self.loops.each(here):
                for pod, n in per_loop.items():
                    closed[pod] = closed.get(pod, 0) + n
            for pod, n in closed.items():
                log.info("policy change closed %d connections of %s", n, pod)
        # what a predecessor handed over is adopted by the first reconcile
        inherited, self._inherited = self._inherited, None
        await self.pods.prepare(view)  # the netlink worker, awaited
        self.pods.reconcile(view, inherited)
        await self.pods.settle()
        if self.waypoints is not None:
            self.waypoints.reconcile(view)

    # -- run ----------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        # compile first: a predecessor keeps relaying while we do (see
        # Datapath.prepare); it freezes its relays only once we ask for them
        await loop.run_in_executor(None, self.datapath.prepare)
        self._inherited = await handoff.receive(self.settings.agent.state_dir)
        await loop.run_in_executor(None, self.datapath.start)
        self.certs = certificate_manager(self.settings.identity)
        client_ctx, server_ctx = self._tls()
        hbone = HboneClient(client_ctx) if client_ctx is not None else None
        self.tunnel = Tunnel(
            self.state,
            self.datapath.delivery_bypass(),
            self.conns,
            hbone,
            server_ctx,
            splicing=self.datapath.config.skmsg,
            require_waypoint=self.settings.agent.require_waypoint,
        )
        self.loops.start()
        for lt in self.loops.extra:  # each extra loop: its own pool, the main loop's certificates
            self.tunnel.loop_tunnels.append(
                (
                    lt.loop,
                    dataclasses.replace(
                        self.tunnel,
                        hbone=HboneClient(self.loops.on_main(client_ctx)) if client_ctx else None,
                        server_context=self.loops.on_main(server_ctx) if server_ctx else None,
                        loop_tunnels=[],
                    ),
                )
            )
        self.pods = Pods(self.datapath, self.tunnel, self.certs, kube=self.kube is not None)
        self.waypoints = Waypoints(
            self.settings.agent.state_dir,
            self.settings.identity.trust_domain,
            self.certs,
            access_log=self.settings.agent.waypoint_access_log,
        )
        self.waypoints.on_request.append(self.metrics.on_request)
        self.pods.keep_identities = self.waypoints.identities
        first = self.first_snapshot
        if self.kube is not None:
            first = await self._start_kube(loop) or first
        await self.apply(first)
        servers = await self._serve_http()
        giver = await handoff.serve(
            self.settings.agent.state_dir, self._give, self._release, self._stop
        )
        self.ready.set()
        a = self.settings.agent
        log.info(
            "agent ready: %d pods enrolled, admin on 127.0.0.1:%d, readiness on "
            "127.0.0.1:%d, metrics on :%d, HBONE TLS: %s",
            len(self.pods.proxies),
            a.admin_port,
            a.ready_port,
            a.metrics_port,
            tlssock.path(),
        )
        loop.call_later(limits.STARTUP_TRIM_S, self._trim_after_start)
        tasks = [loop.create_task(self._check_netns())]
        if self.file is not None:
            tasks.append(loop.create_task(self.file.watch(self.apply)))
        await self._stop.wait()
        for t in tasks:
            t.cancel()
        if self.kube_source is not None:
            self.kube_source.stop()
        if self.deployer is not None:
            # before any drain: the Lease is released so another agent deploys
            await loop.run_in_executor(None, self.deployer.stop)
        for srv in servers:
            srv.close()  # free the node's ports at once for the successor
        giver.close()
        if self.handed_off:
            # GOAWAY moves the peers' new streams to the successor at once
            await asyncio.gather(self.loops.each(lambda: drain_all(DRAIN_TIMEOUT)), self._drain())
            if self.kube is not None:
                # A DaemonSet restarts an exited container, and a restarted old
                # agent would take everything back: stay idle until the pod is
                # deleted (SIGTERM).
                self._stop.clear()
                log.info("handed over and drained; idle until terminated")
                await self._stop.wait()
        # GOAWAYs, then close_notify on every connection, on every loop
        await self.loops.each(lambda: drain_all(STOP_DRAIN_TIMEOUT))
        await self.waypoints.close()
        self.pods.close()
        await self.pods.routing.aclose()
        if hbone is not None:
            hbone.close()
        for loop, extra in self.tunnel.loop_tunnels:
            if extra.hbone is not None:
                call_on(loop, extra.hbone.close)
        self.loops.stop()  # what is left on them is cancelled there
        if self.certs is not None:
            await self.certs.close()
        self.datapath.close()
        log.info("agent stopped")

    def _tls(self) -> tuple[Any, Any]:
        """The certificate manager's client and server TLS contexts (None,
        None without an identity source: plaintext only)."""
        if self.certs is None:
            return None, None
        certs = self.certs

        async def client_ctx(i: SpiffeId) -> ssl.SSLContext:
            return await certs.ssl_context_client(i)

        async def server_ctx(i: SpiffeId) -> ssl.SSLContext:
            return await certs.ssl_context_server(i)

        return client_ctx, server_ctx

    async def _start_kube(self, loop: asyncio.AbstractEventLoop) -> Snapshot | None:
        """Start the watchers and wait (bounded) for their first full snapshot."""
        from agent.sources.k8s import KubeSource

        assert self.kube is not None and self.pods is not None
        first: asyncio.Future[Snapshot] = loop.create_future()

        def on_snapshot(snap: Snapshot) -> None:
            if self.deployer is not None:
                self.deployer.wake()  # a Gateway or its Service may have changed
            if not first.done():
                first.set_result(snap)
            else:  # apply() queues it behind the first and keeps only the newest
                self._tasks.add(task := loop.create_task(self._apply_logged(snap)))
                task.add_done_callback(self._tasks.discard)

        root = self.settings.agent.pod_cgroup_root
        self.kube_source = KubeSource(
            self.kube["node"],
            kubeconfig=self.kube.get("kubeconfig"),
            cgroup_root=Path(root) if root else None,
        )
        self.pods.report = self.kube_source.report
        if self.waypoints is not None:
            source = self.kube_source

            def nacked(wp: Any, message: str) -> None:
                source.gateway_event(wp.namespace, wp.name, "WaypointConfigRejected", message)

            self.waypoints.on_nack = nacked
        if self.settings.agent.waypoint_deployer:
            self._start_deployer()
        self.kube_source.start(loop, on_snapshot)
        try:
            return await asyncio.wait_for(asyncio.shield(first), 60)
        except TimeoutError:
            log.error(
                "no complete snapshot from the API server in 60 s (%s); starting with "
                "nothing enrolled",
                self.kube_source.errors,
            )
            return None

    def _start_deployer(self) -> None:
        """Every agent runs the waypoint deployer; the Lease picks the one that
        writes.  A failure here costs the waypoints, never the agent."""
        from agent.sources.waypoint_deploy import WaypointDeployer

        assert self.kube is not None and self.kube_source is not None
        pod = os.environ.get("POD_NAME")
        try:
            self.deployer = WaypointDeployer(
                self.kube_source.api,
                namespace=os.environ.get("POD_NAMESPACE", "tether-system"),
                identity=f"{self.kube['node']}/{pod or os.getpid()}",
                image=self.settings.agent.waypoint_image,
                pod_name=pod,
                xds_dir=str(Path(self.settings.agent.state_dir) / "xds"),
            )
            self.deployer.start()
        except Exception:
            log.exception("waypoint deployer not started; waypoints will not be deployed")
            self.deployer = None

    async def _apply_logged(self, snap: Snapshot) -> None:
        try:
            await self.apply(snap)
        except Exception:
            log.exception("applying a snapshot failed; retrying on the next change")

    def _trim_after_start(self) -> None:
        """The start (initial list of the API server's objects, certificates,
        compiling the datapath's config) leaves freed heap that glibc keeps
        mapped; give it back once, and log how much that was."""
        before = limits.anon_mib()
        limits.trim()
        log.info(
            "memory after start: anonymous %.1f MiB, %.1f MiB after returning free heap pages",
            before,
            limits.anon_mib(),
        )

    async def _check_netns(self) -> None:
        while True:
            await asyncio.sleep(NETNS_CHECK_INTERVAL)
            assert self.pods is not None
            try:
                self.pods.check_netns(self.state.view)
            except Exception:
                log.exception("netns check failed")

    async def _drain(self) -> None:
        """After a handoff: HBONE connections (TLS state lives here) run to
        their end, bounded by DRAIN_TIMEOUT, while the successor serves new ones."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_TIMEOUT
        while self.conns.open and loop.time() < deadline:
            await asyncio.sleep(0.2)
        if self.conns.open:
            log.warning("drain timeout: closing %d connections", len(self.conns.open))

    async def _give(self) -> handoff.Bundle:
        """Freeze every pod's listeners and plain relays for a successor."""
        assert self.pods is not None
        bundle: handoff.Bundle = {}
        for key, p in self.pods.proxies.items():
            bundle[key] = await p.freeze()
        self.handed_off = True
        return bundle

    async def _release(self) -> None:
        """A successor we cannot hand sockets to (another handoff version):
        free the pods' listeners for it and keep every open connection here."""
        assert self.pods is not None
        for p in self.pods.proxies.values():
            p.release()
        self.handed_off = True

    # -- admin --------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        view = self.state.view
        source: Any = (
            self.kube_source.describe()
            if self.kube_source is not None
            else self.file.describe()
            if self.file is not None
            else {}
        )
        return {
            "node": self.settings.node,
            "pid": os.getpid(),  # which agent answers (two run during a handoff)
            "ready": self.ready.is_set(),
            "datapath": self.datapath.status(),
            "pod_errors": self.pods.errors if self.pods else {},
            "source": source,
            "state": view.describe(),
            "policies": view.policies.describe(),
            "waypoints": view.describe()["waypoints"],
            "waypoint_uses": view.snapshot.waypoint_uses(),
            "waypoint_proxies": self.waypoints.describe() if self.waypoints else [],
            "waypoint_deployer": self.deployer.describe() if self.deployer else None,
            "certificates": self.certs.describe() if self.certs else [],
            "hbone_tls": tlssock.path(),
            "malloc": limits.malloc_state,
            "hbone_pool": self._pools(),
            "tunnel_loops": self._loops_status(),
            "connections": {
                "open": [c.record() for c in list(self.conns.open.values())],
                "closed": [c.record() for c in self.conns.closed[-200:]],
            },
        }

    def _pools(self) -> list[dict[str, Any]]:
        """Every loop's HBONE pool (each entry says its loop)."""
        if self.tunnel is None:
            return []
        out: list[dict[str, Any]] = []
        for i, t in enumerate([self.tunnel, *(t for _, t in self.tunnel.loop_tunnels)]):
            if t.hbone is not None:
                out += [{**p, "loop": i} for p in t.hbone.describe()]
        return out

    def _loops_status(self) -> dict[str, Any]:
        """How many loops serve the tunnel and the open connections on each."""
        opened = [0] * self.loops.count
        recent = [0] * self.loops.count
        if self.loops.main is not None:
            for c in list(self.conns.open.values()):
                i = self.loops.index_of(c.loop) or 0
                opened[i] += 1
                recent[i] += 1
            for c in list(self.conns.closed):
                recent[self.loops.index_of(c.loop) or 0] += 1
        # recent: the open ones and the last closed ones the table keeps
        return {"count": self.loops.count, "open_connections": opened, "recent_connections": recent}

    async def _serve_http(self) -> list[HttpServer]:
        def ready() -> Response:
            return (
                Response(200, b"ready\n") if self.ready.is_set() else Response(503, b"starting\n")
            )

        def dump(obj: Any) -> Response:
            return Response(
                200, json.dumps(obj, indent=1, default=str).encode(), "application/json"
            )

        def metrics() -> Response:
            return Response(200, self.metrics.exposition(), "text/plain; version=0.0.4")

        health = {
            "/healthz": lambda: Response(200, b"ok\n"),
            "/ready": ready,
            "/healthz/ready": ready,
        }
        admin = HttpServer(
            {
                **health,
                "/config_dump": lambda: dump(self.status()),
                "/status": lambda: dump(self.status()),
                "/connections": lambda: dump(self.status()["connections"]),
                "/metrics": metrics,
            },
            "admin",
        )
        readiness = HttpServer(health, "readiness")  # 15021: no config on it
        prom = HttpServer({"/metrics": metrics}, "metrics")
        a = self.settings.agent
        try:
            await admin.start("127.0.0.1", a.admin_port)
            await readiness.start("127.0.0.1", a.ready_port)
            await prom.start("0.0.0.0", a.metrics_port)
        except OSError as e:
            raise DatapathError(str(e)) from e
        return [admin, readiness, prom]


def main_run(config_path: str, skmsg: bool | None, kube: dict[str, Any] | None = None) -> int:
    logging.basicConfig(
        level=os.environ.get("TETHER_LOG", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    soft, hard = raise_fd_limit()
    log.info("open files limit %d (hard %d)", soft, hard)
    log.info("malloc: %s", limits.tune_malloc())
    # which code runs (an A/B benchmark checks it ran the tree it asked for)
    log.info(
        "agent code at %s; h2 DATA fast path %s",
        Path(__file__).resolve().parent,
        "on" if h2conn.FAST_DATA else "off (TETHER_H2_FAST_DATA=0)",
    )
    try:
        agent = Agent(config_path, skmsg, kube)
    except localfile.ConfigError as e:
        log.error("%s", e)
        return 2
    try:
        eventloop.run(agent.run())
    except (DatapathError, IssueError) as e:
        log.error("%s", e)
        return 1
    return 0
