"""Envoy started inside a pod's network namespace (local-file mode runs the waypoint so):
it reaches the agent's ADS socket through the filesystem, passes the SO_PEERCRED netns
check that refuses the host, and serves inside the netns only."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.waypoint.gate import require_waypoint_extra

require_waypoint_extra()

from agent import netns  # noqa: E402
from tests.waypoint.resources import snapshot  # noqa: E402
from waypoint.envoy import EnvoyProcess, bootstrap, free_port  # noqa: E402
from waypoint.peer import peer_in_netns  # noqa: E402
from waypoint.xds import TYPE_LISTENER, SnapshotCache, XdsServer, node_id, socket_path  # noqa: E402

pytestmark = pytest.mark.root
NODE = node_id("shop", "waypoint")


@pytest.mark.skipif(os.geteuid() != 0, reason="creating a netns needs root")
def test_envoy_in_netns_serves_there_only(xds_dir: Path, envoy_bin: Path) -> None:
    name = f"wpx-{secrets.token_hex(3)}"
    path = netns.create_netns(name)
    srv: XdsServer | None = None
    envoy: EnvoyProcess | None = None
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True, timeout=5)
        cache = SnapshotCache()
        port = free_port()
        v = cache.set_snapshot(NODE, snapshot(port, "in-pod"))
        srv = XdsServer(
            cache, socket_path(xds_dir, "shop", "waypoint"), [NODE], peer_check=peer_in_netns(path)
        )
        srv.start()
        envoy = EnvoyProcess(
            bootstrap(NODE, "waypoint.shop", srv.path, 15000),  # the pod's own admin port
            xds_dir / "envoy",
            binary=envoy_bin,
            netns=path,
        )
        envoy.start(timeout=10)  # /ready is polled from inside the netns
        assert cache.wait_acked(NODE, TYPE_LISTENER, v[TYPE_LISTENER], 5)
        with netns.entered(path):
            body = ""
            for _ in range(100):
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1) as r:
                        body = r.read().decode()
                    break
                except OSError:
                    time.sleep(0.05)
        assert body == "in-pod"
        with pytest.raises(OSError):  # not on the host's loopback
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
        assert Path(f"/proc/{envoy.pid}/ns/net").stat().st_ino == path.stat().st_ino
        # a process outside the pod's netns reaches the socket file but is cut off
        assert srv.gate is not None and srv.gate.refused == 0
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(srv.path))
            assert s.recv(1) == b""
        assert srv.gate.refused == 1
    finally:
        if envoy is not None:
            envoy.stop(timeout=3)
        if srv is not None:
            srv.stop()
        netns.delete_netns(name)
