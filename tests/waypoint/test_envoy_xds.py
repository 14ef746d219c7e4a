"""A real Envoy configured by the agent's ADS server: ACK, serve, NACK keeps the last good
config, delta the same, SDS rotation without dropping connections, process supervision."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.waypoint.gate import require_waypoint_extra

require_waypoint_extra()

from cryptography import x509  # noqa: E402

from agent.identity.ca import CertificateAuthority  # noqa: E402
from agent.identity.spiffe import SpiffeId  # noqa: E402
from agent.identity.svid import Svid, generate_key  # noqa: E402
from tests.waypoint.resources import get_until, snapshot  # noqa: E402
from waypoint.envoy import EnvoyProcess, bootstrap, free_port  # noqa: E402
from waypoint.peer import PeerCheck, PeerCred  # noqa: E402
from waypoint.sds import svid_secrets  # noqa: E402
from waypoint.xds import (  # noqa: E402
    TYPE_CLUSTER,
    TYPE_ENDPOINT,
    TYPE_LISTENER,
    TYPE_SECRET,
    SnapshotCache,
    XdsServer,
    node_id,
    socket_path,
)

NODE = node_id("shop", "waypoint")
MODES = [pytest.param(False, id="sotw"), pytest.param(True, id="delta")]
WAYPOINT_ID = SpiffeId("cluster.local", "shop", "waypoint")


@contextlib.contextmanager
def running(
    xds_dir: Path,
    envoy_bin: Path,
    cache: SnapshotCache,
    *,
    delta: bool,
    peer_check: PeerCheck | None = None,
    **kw: Any,
) -> Iterator[EnvoyProcess]:
    srv = XdsServer(cache, socket_path(xds_dir, "shop", "waypoint"), [NODE], peer_check=peer_check)
    srv.start()
    envoy = EnvoyProcess(
        bootstrap(NODE, "waypoint.shop", srv.path, free_port(), delta=delta),
        xds_dir / "envoy",
        binary=envoy_bin,
        **kw,
    )
    try:
        envoy.start(timeout=10)
        yield envoy
    finally:
        envoy.stop(timeout=3)
        srv.stop()


@pytest.mark.parametrize("delta", MODES)
def test_envoy_acks_serves_and_keeps_last_good_on_nack(
    xds_dir: Path, envoy_bin: Path, delta: bool
) -> None:
    nacks: list[tuple[str, str, str, str]] = []
    cache = SnapshotCache(on_nack=lambda *a: nacks.append(a))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    v1 = cache.set_snapshot(NODE, snapshot(port, "v1"))
    with running(xds_dir, envoy_bin, cache, delta=delta) as envoy:
        for t in (TYPE_CLUSTER, TYPE_ENDPOINT, TYPE_LISTENER):
            assert cache.wait_acked(NODE, t, v1[t], 5), cache.status()
        assert get_until(url + "/", "v1") == "v1"
        assert get_until(url + "/via", "v1") == "v1"  # listener -> cluster (CDS+EDS) -> listener

        started = time.monotonic()
        v2 = cache.set_snapshot(NODE, snapshot(port, "v2"))
        assert cache.wait_acked(NODE, TYPE_LISTENER, v2[TYPE_LISTENER], 5)
        latency = time.monotonic() - started
        assert v2[TYPE_CLUSTER] == v1[TYPE_CLUSTER]  # only the listener changed...
        assert cache.type_status(NODE, TYPE_CLUSTER).sent == v1[TYPE_CLUSTER]  # ...and went out
        assert get_until(url + "/", "v2") == "v2"
        print(
            f"\n[{'delta' if delta else 'sotw'}] set_snapshot->ACK {latency * 1000:.1f} ms, "
            f"(send->ACK {cache.type_status(NODE, TYPE_LISTENER).ack_latency_ms} ms), "
            f"Envoy RSS {(envoy.rss_bytes() or 0) / 2**20:.0f} MiB"
        )

        # an HCM without stat_prefix fails Envoy's proto validation: NACK
        bad = cache.set_snapshot(NODE, snapshot(port, "v3", stat_prefix=""))
        message = cache.wait_nacked(NODE, TYPE_LISTENER, bad[TYPE_LISTENER], 5)
        assert message is not None, cache.status()
        assert "stat_prefix" in message.lower() or "statprefix" in message.lower(), message
        assert eventually(lambda: nacks) == [(NODE, TYPE_LISTENER, bad[TYPE_LISTENER], message)]
        st = cache.status()[NODE]["types"][TYPE_LISTENER]
        assert st["acked"] == v2[TYPE_LISTENER]
        assert st["nack_version"] == bad[TYPE_LISTENER] and st["nack_message"] == message
        for _ in range(5):
            assert get_until(url + "/", "v2", timeout=1) == "v2"  # the old listener serves on

        fixed = cache.set_snapshot(NODE, snapshot(port, "v4"))
        assert cache.wait_acked(NODE, TYPE_LISTENER, fixed[TYPE_LISTENER], 5)
        assert get_until(url + "/", "v4") == "v4"
        assert envoy.running()


def eventually(read: Callable[[], list[Any]], timeout: float = 5.0) -> list[Any]:
    """The hook runs on the stream's thread just after the NACK is recorded: wait for it."""
    deadline = time.monotonic() + timeout
    while not read() and time.monotonic() < deadline:
        time.sleep(0.01)
    return read()


@pytest.mark.parametrize("delta", MODES)
def test_envoy_through_the_peer_gate(xds_dir: Path, envoy_bin: Path, delta: bool) -> None:
    """The SO_PEERCRED gate relays a whole ADS session (here: the peer must be Envoy)."""

    def is_envoy(p: PeerCred) -> bool:
        return os.path.realpath(f"/proc/{p.pid}/exe") == os.path.realpath(envoy_bin)

    cache = SnapshotCache()
    port = free_port()
    v1 = cache.set_snapshot(NODE, snapshot(port, "gated"))
    with running(xds_dir, envoy_bin, cache, delta=delta, peer_check=is_envoy) as envoy:
        assert cache.wait_acked(NODE, TYPE_LISTENER, v1[TYPE_LISTENER], 5)
        assert get_until(f"http://127.0.0.1:{port}/via", "gated") == "gated"
        v2 = cache.set_snapshot(NODE, snapshot(port, "gated-2"))
        assert cache.wait_acked(NODE, TYPE_LISTENER, v2[TYPE_LISTENER], 5)
        assert get_until(f"http://127.0.0.1:{port}/", "gated-2") == "gated-2"
        assert envoy.running()


def make_svid(ca: CertificateAuthority) -> Svid:
    key = generate_key()
    leaf = ca.issue(key.public_key(), WAYPOINT_ID)
    return Svid(WAYPOINT_ID, key, (leaf,), ca.roots, datetime.now(UTC))


def tls_connection(port: int) -> http.client.HTTPSConnection:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the test reads the certificate, it does not trust it
    return http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=2)


def served_serial(conn: http.client.HTTPSConnection) -> int:
    assert conn.sock is not None
    der = conn.sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def get(conn: http.client.HTTPSConnection) -> str:
    conn.request("GET", "/")
    return conn.getresponse().read().decode()


def new_tls_serial(port: int, want: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        conn = tls_connection(port)
        try:
            assert get(conn) == "tls"
            serial = served_serial(conn)
        except OSError:
            serial = -1
        finally:
            conn.close()
        if serial == want or time.monotonic() > deadline:
            return serial
        time.sleep(0.05)


@pytest.mark.parametrize("delta", MODES)
def test_sds_rotation_reaches_new_connections_and_keeps_open_ones(
    xds_dir: Path, envoy_bin: Path, delta: bool
) -> None:
    ca = CertificateAuthority.generate("cluster.local")
    first, second = make_svid(ca), make_svid(ca)
    cache = SnapshotCache()
    port = free_port()
    res: dict[str, Any] = {**snapshot(port, "tls", tls=True), TYPE_SECRET: svid_secrets(first)}
    v1 = cache.set_snapshot(NODE, res)
    with running(xds_dir, envoy_bin, cache, delta=delta) as envoy:
        assert cache.wait_acked(NODE, TYPE_SECRET, v1[TYPE_SECRET], 5), cache.status()
        assert new_tls_serial(port, first.serial) == first.serial
        held = tls_connection(port)
        try:
            assert get(held) == "tls"
            pid = envoy.pid

            v2 = cache.set_snapshot(NODE, {**res, TYPE_SECRET: svid_secrets(second)})
            assert v2[TYPE_LISTENER] == v1[TYPE_LISTENER]  # only the secret changed
            assert cache.wait_acked(NODE, TYPE_SECRET, v2[TYPE_SECRET], 5), cache.status()
            assert new_tls_serial(port, second.serial) == second.serial
            # the connection opened before the rotation still works, on the old certificate
            assert get(held) == "tls"
            assert served_serial(held) == first.serial
            assert envoy.pid == pid and envoy.running()  # no restart
        finally:
            held.close()


def test_process_reports_exit_and_restarts(xds_dir: Path, envoy_bin: Path) -> None:
    cache = SnapshotCache()
    port = free_port()
    cache.set_snapshot(NODE, snapshot(port, "up"))
    with running(xds_dir, envoy_bin, cache, delta=False) as envoy:
        assert get_until(f"http://127.0.0.1:{port}/", "up") == "up"
        assert envoy.pid is not None
        os.kill(envoy.pid, signal.SIGKILL)
        assert envoy.stop(timeout=3) == -signal.SIGKILL
        assert not envoy.running() and envoy.status()["returncode"] == -signal.SIGKILL
        assert any("starting main dispatch loop" in line for line in envoy.log_tail(50))

        envoy.restart(timeout=10)  # reconnects to ADS and gets the snapshot again
        assert envoy.restarts == 1 and envoy.running()
        assert get_until(f"http://127.0.0.1:{port}/", "up") == "up"
        assert cache.status()[NODE]["streams"] == 1
        assert "config_dump" not in envoy.admin("/ready")  # admin answers on 127.0.0.1
    assert envoy.stop() == 0  # stopped by SIGTERM on exit: clean


@pytest.mark.parametrize("xds", ["uds", "tcp"])
def test_bootstrap_passes_envoy_validation(tmp_path: Path, envoy_bin: Path, xds: str) -> None:
    target: Any = tmp_path / "x.sock" if xds == "uds" else ("127.0.0.1", 15010)
    # the waypoint pod's bootstrap (uds) carries the status listener too
    ready: dict[str, Any] = (
        {"ready_port": 15021, "initial_fetch_timeout_s": 0} if xds == "uds" else {}
    )
    cfg = bootstrap(NODE, "waypoint.shop", target, 15000, delta=xds == "tcp", **ready)
    proc = EnvoyProcess(cfg, tmp_path, binary=envoy_bin)
    proc.config_path.write_text(json.dumps(cfg))
    out = subprocess.run(
        [str(envoy_bin), "--mode", "validate", "-c", str(proc.config_path)],
        capture_output=True,
        text=True,
        timeout=25,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"


def _status(url: str) -> int | str:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError as e:
        return type(e).__name__


def test_status_port_is_ready_only_once_configured(xds_dir: Path, envoy_bin: Path) -> None:
    """The waypoint pod's readiness (`tether waypoint-proxy`): GET
    /healthz/ready on the status port is 200 only after the node agent's first
    config; before it (no initial-fetch timeout) it is not, however long."""
    cache = SnapshotCache()
    srv = XdsServer(cache, socket_path(xds_dir, "shop", "waypoint"), [NODE])
    srv.start()
    ready_port, port = free_port(), free_port()
    cfg = bootstrap(
        NODE,
        "waypoint.shop",
        srv.path,
        free_port(),
        initial_fetch_timeout_s=0,
        ready_port=ready_port,
    )
    envoy = EnvoyProcess(cfg, xds_dir / "envoy", binary=envoy_bin)
    envoy.workdir.mkdir(parents=True, exist_ok=True)
    envoy.config_path.write_text(json.dumps(cfg))
    proc = subprocess.Popen(envoy.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{ready_port}"
    try:
        # Envoy is up (its admin answers) and stays unready without config
        deadline, admin = time.monotonic() + 10, 0
        while admin == 0 and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                admin = envoy._admin_get("/ready", 0.5)[0]
            time.sleep(0.1)
        assert admin == 503, admin  # up, and not LIVE: it waits for its config
        seen = set()
        for _ in range(20):  # 2 s
            seen.add(_status(url + "/healthz/ready"))
            time.sleep(0.1)
        assert 200 not in seen, seen
        cache.set_snapshot(NODE, snapshot(port, "v1"))
        deadline = time.monotonic() + 10
        while _status(url + "/healthz/ready") != 200:
            assert time.monotonic() < deadline, "not ready 10 s after its first config"
            time.sleep(0.1)
        assert get_until(f"http://127.0.0.1:{port}/", "v1") == "v1"
        # only the readiness path: the rest of the admin stays on 127.0.0.1
        assert _status(url + "/stats") == 404
        assert _status(url + "/ready") == 404
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        srv.stop()
