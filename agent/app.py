"""The node agent process: reconcile the desired pods (from the local file)
with the datapath and the in-pod listeners, serve the admin endpoint, and hand
everything to a successor on restart.

One writer: only Agent.reconcile() changes what is enrolled.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from typing import Any

from agent import cgroupfs, handoff
from agent import config as localconfig
from agent.datapath.datapath import Datapath, DatapathConfig, PodSpec, check_pod
from agent.datapath.errors import DatapathError, PodError
from agent.datapath.loader import BuildOptions
from agent.datapath.structs import Listen
from agent.tunnel.proxy import ConnTable, PodProxy, PodRef, Ports

log = logging.getLogger(__name__)

LISTEN_KINDS = {"in4": Listen.PLAIN4, "in6": Listen.PLAIN6}


class Agent:
    def __init__(self, config_path: str, skmsg: bool | None = None) -> None:
        self.config_path = config_path
        self.cfg = localconfig.load(config_path)
        s = self.cfg.agent
        self.datapath = Datapath(
            DatapathConfig(
                build=BuildOptions(pin_dir=s.pin_dir),
                state_dir=s.state_dir,
                agent_cgroup=s.cgroup or str(cgroupfs.own_cgroup()),
                kubelet_cgroups=s.kubelet_cgroups,
                skmsg=s.sk_msg if skmsg is None else skmsg,
            )
        )
        self.conns = ConnTable()
        self.proxies: dict[str, PodProxy] = {}
        self.errors: dict[str, str] = {}
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._mtime = 0.0

    # -- reconcile ----------------------------------------------------------

    def reconcile(self, inherited: dict[str, dict[str, Any]] | None = None) -> None:
        """Make enrolled pods match the config.  One bad pod is reported and
        skipped; it never stops the others."""
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
        for key, w in want.items():
            if key in self.proxies:
                continue
            try:
                self._enroll(w, (inherited or {}).get(key))
                self.errors.pop(key, None)
            except (PodError, OSError, DatapathError) as e:
                self.errors[key] = str(e)
                log.error("%s", e)

    def _enroll(self, w: localconfig.Workload, inherited: dict[str, Any] | None) -> None:
        if not w.netns or not w.cgroup:
            raise PodError(w.key, "the local file gives no netns/cgroup for this pod")
        spec = PodSpec(
            key=w.key, netns=w.netns, cgroup=w.cgroup, ips=w.addresses,
            exclude_out_ports=w.exclude_outbound_ports,
            exclude_in_ports=w.exclude_inbound_ports,
            exclude_out_cidrs=w.exclude_outbound_cidrs,
        )
        check_pod(spec)
        proxy = PodProxy(PodRef(w.key, w.netns, w.addresses), Ports(), self.datapath, self.conns)
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
        self.reconcile(inherited)
        admin = await asyncio.start_server(self._admin, "127.0.0.1", self.cfg.agent.admin_port)
        giver = await handoff.serve(self.cfg.agent.state_dir, self._give, self._stop)
        self._mtime = os.stat(self.config_path).st_mtime
        self.ready.set()
        log.info("agent ready: %d pods enrolled, admin on 127.0.0.1:%d", len(self.proxies),
                 self.cfg.agent.admin_port)
        watcher = loop.create_task(self._watch())
        await self._stop.wait()
        watcher.cancel()
        admin.close()
        giver.close()
        if not handoff.given(self):
            for p in self.proxies.values():
                p.close()
        self.datapath.close()
        log.info("agent stopped")

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
        """Freeze every pod's listeners and relays for a successor."""
        bundle: handoff.Bundle = {}
        for key, p in self.proxies.items():
            bundle[key] = await p.freeze()
        handoff.mark_given(self)
        return bundle

    # -- admin --------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "node": self.cfg.node,
            "ready": self.ready.is_set(),
            "datapath": self.datapath.status(),
            "pod_errors": self.errors,
            "connections": {
                "open": [c.record() for c in self.conns.open.values()],
                "closed": [c.record() for c in self.conns.closed[-200:]],
            },
        }

    async def _admin(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        """Minimal HTTP/1.0 admin: /healthz, /ready, /config_dump, /connections."""
        try:
            line = (await asyncio.wait_for(r.readline(), 5)).decode(errors="replace")
            with contextlib.suppress(asyncio.TimeoutError):
                while (await asyncio.wait_for(r.readline(), 5)) not in (b"\r\n", b"\n", b""):
                    pass
            path = line.split(" ")[1] if line.count(" ") >= 2 else "/"
            code, body = 200, b""
            if path == "/healthz":
                body = b"ok\n"
            elif path == "/ready":
                code, body = (200, b"ready\n") if self.ready.is_set() else (503, b"starting\n")
            elif path in ("/config_dump", "/status"):
                body = json.dumps(self.status(), indent=1).encode()
            elif path == "/connections":
                body = json.dumps(self.status()["connections"], indent=1).encode()
            else:
                code, body = 404, b"not found: /healthz /ready /config_dump /connections\n"
            w.write(f"HTTP/1.0 {code} X\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
            await w.drain()
        finally:
            w.close()


def main_run(config_path: str, skmsg: bool | None) -> int:
    logging.basicConfig(level=os.environ.get("TETHER_LOG", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        agent = Agent(config_path, skmsg)
    except localconfig.ConfigError as e:
        log.error("%s", e)
        return 2
    try:
        asyncio.run(agent.run())
    except DatapathError as e:
        log.error("%s", e)
        return 1
    return 0
