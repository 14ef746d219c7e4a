"""netns tier: the node tunnel between two simulated nodes, one agent each.

Cross-node and same-node traffic over IPv4 and IPv6 with the identities each
side records, the inter-node wire holding no mesh plaintext, certificate
rotation under a live connection, and policy reload under live connections.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import netns
from agent.sim.harness import AgentNode, Cluster, cluster_nodes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="netns tier needs root")

SA = "spiffe://cluster.local/ns/shop/sa/"


@pytest.fixture(scope="module")
def mesh() -> Iterator[tuple[Cluster, AgentNode, AgentNode]]:
    with cluster_nodes("n1", "n2") as (cluster, (n1, n2)):
        n1.add_pod("a", "shop", "sa-a")
        n1.add_pod("c", "shop", "sa-c")
        n2.add_pod("b", "shop", "sa-b")
        n1.add_pod("plain1", "legacy", "legacy")
        n2.add_pod("plain2", "legacy", "legacy")
        n1.enroll_namespace("shop")
        for n in (n1, n2):
            for p in n.pods:
                n.serve(p)
        n1.start_agent()
        n2.start_agent()
        yield cluster, n1, n2


def _record(node: AgentNode, direction: str, path: str | None = None) -> dict[str, Any]:
    time.sleep(0.2)
    recs = [
        c
        for c in node.connections()
        if c["direction"] == direction and (path is None or c["path"] == path)
    ]
    assert recs, node.connections()
    return max(recs, key=lambda c: c["id"])


@pytest.mark.parametrize("family", [4, 6])
def test_cross_node_is_hbone_with_both_identities(mesh: Any, family: int) -> None:
    _, n1, n2 = mesh
    a, b = n1.tb.pod("a"), n2.tb.pod("b")
    r = n1.connect(a, b, family=family, nbytes=2 << 20)
    assert r["ok"], r
    assert r["server_saw_peer"][0] == (a.ip4 if family == 4 else a.ip6)
    out = _record(n1, "outbound", "hbone")
    inn = _record(n2, "inbound", "hbone")
    assert (out["src_identity"], out["dst_identity"]) == (SA + "sa-a", SA + "sa-b")
    assert (inn["src_identity"], inn["dst_identity"]) == (SA + "sa-a", SA + "sa-b")
    assert inn["security"] == "mutual_tls" and inn["response_flag"] == "-"
    assert inn["bytes_sent"] == 2 << 20 and out["bytes_sent"] == 2 << 20
    pool = n1.status()["hbone_pool"]
    assert any(p["src"] == SA + "sa-a" and p["dst"] == SA + "sa-b" for p in pool)


@pytest.mark.parametrize("family", [4, 6])
def test_same_node_is_authorized_locally(mesh: Any, family: int) -> None:
    _, n1, _ = mesh
    a, c = n1.tb.pod("a"), n1.tb.pod("c")
    r = n1.connect(a, c, family=family)
    assert r["ok"], r
    assert r["server_saw_peer"][0] == (a.ip4 if family == 4 else a.ip6)
    inn = _record(n1, "inbound", "local")
    assert (inn["src_identity"], inn["dst_identity"]) == (SA + "sa-a", SA + "sa-c")


def test_wire_between_nodes_carries_no_mesh_plaintext(mesh: Any) -> None:
    """tshark on the inter-node bridge: the mesh payload never appears, the
    same payload sent between two pods outside the mesh does (the capture
    works)."""
    _, n1, n2 = mesh
    fabric = n1.tb.describe()["fabric"]["netns_path"]
    with tempfile.TemporaryDirectory() as tmp:
        pcap = Path(tmp) / "wire.pcap"
        with netns.entered(fabric):
            cap = subprocess.Popen(
                ["tshark", "-i", "br0", "-f", "tcp", "-w", str(pcap), "-q"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
        try:
            assert cap.stderr is not None
            deadline = time.monotonic() + 20
            for line in cap.stderr:
                if b"Capturing on" in line or time.monotonic() > deadline:
                    break
            r = n1.connect(
                n1.tb.pod("a"), n2.tb.pod("b"), nbytes=200_000, extra=("--marker", "MESH-SECRET-")
            )
            assert r["ok"], r
            r = n1.connect(
                n1.tb.pod("plain1"),
                n2.tb.pod("plain2"),
                nbytes=50_000,
                extra=("--marker", "PLAIN-CONTROL-"),
            )
            assert r["ok"], r
            time.sleep(0.5)
        finally:
            cap.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                cap.wait(10)
            if cap.poll() is None:
                cap.kill()
        wire = pcap.read_bytes()
        assert b"PLAIN-CONTROL-" in wire, "the capture must see plaintext flows"
        assert b"MESH-SECRET-" not in wire
        # the mesh bytes crossed as TLS records to port 15008.  Summed per TLS
        # record (its length field), not per TCP segment: a record spans
        # segments, and only the one completing it carries the record's
        # fields, so segment sums depend on offloads (181,660 in a Vagrant
        # VM).  All record types: on a connection whose handshake was
        # captured, TLS 1.3 application data is shown as opaque_type, not
        # content_type (the sum was 0 when this test ran alone).
        lengths = (
            subprocess.run(
                [
                    "tshark",
                    "-r",
                    str(pcap),
                    "-d",
                    "tcp.port==15008,tls",
                    "-Y",
                    "tcp.dstport == 15008 && tls.record",
                    "-T",
                    "fields",
                    "-E",
                    "occurrence=a",
                    "-E",
                    "aggregator=,",
                    "-e",
                    "tls.record.length",
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
            .stdout.replace(",", " ")
            .split()
        )
        assert sum(int(x) for x in lengths) > 200_000, lengths[:20]


def test_certificate_rotation_under_a_live_connection() -> None:
    # certificates renewed at half-life: every ~2 s
    with cluster_nodes("n1", "n2", cert_ttl=4.0) as (_, (n1, n2)):
        a = n1.add_pod("a", "shop", "sa-a")
        b = n2.add_pod("b", "shop", "sa-b")
        n1.enroll_namespace("shop")
        n2.serve(b)
        n1.start_agent()
        n2.start_agent()

        def serial() -> str:
            certs = n1.status()["certificates"]
            return next(str(c["serial"]) for c in certs if c["identity"] == SA + "sa-a")

        held = n1.spawn_peer(a, ["connect", b.ip4, "8080", "--hold", "7", "--timeout", "10"])
        first = serial()
        seen = {first}
        deadline = time.monotonic() + 10
        while len(seen) < 3 and time.monotonic() < deadline:
            time.sleep(0.5)
            seen.add(serial())
        assert len(seen) >= 3, f"certificate not renewed: {seen}"
        out, _ = held.communicate(timeout=30)
        assert held.returncode == 0 and b'"ok": true' in out, out
        r = n1.connect(a, b)  # a new connection after rotation works too
        assert r["ok"], r


def test_policy_reload_closes_only_connections_it_denies(tmp_path: Path) -> None:
    """Both clients hold until released (--until), not for a fixed time: in a
    TCG VM the reload and revalidation took longer than a 5 s hold, and y
    ended on its own before the policy could close it."""
    with cluster_nodes("n1", "n2") as (cluster, (n1, n2)):
        x = n1.add_pod("x", "shop", "sa-x")
        y = n1.add_pod("y", "shop", "sa-y")
        db = n2.add_pod("db", "shop", "sa-db")
        n1.enroll_namespace("shop")
        n2.serve(db)
        n1.start_agent()
        n2.start_agent()
        release = tmp_path / "release"
        hold = ["--hold", "300", "--until", str(release), "--timeout", "20"]
        held = {p.name: n1.spawn_peer(p, ["connect", db.ip4, "8080", *hold]) for p in (x, y)}
        # both connections open at the destination before the policy changes
        # (bounded, generously: only a failure waits that long)
        want = {SA + "sa-x", SA + "sa-y"}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            opened = {c["src_identity"] for c in n2.status()["connections"]["open"]}
            if want <= opened:
                break
            time.sleep(0.2)
        assert want <= opened, opened
        cluster.policies = [
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": "db-from-x", "namespace": "shop"},
                "spec": {
                    "selector": {"matchLabels": {}},
                    "rules": [
                        {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/sa-x"]}}]}
                    ],
                },
            }
        ]
        cluster.write_configs()
        try:
            # y ends without a release: the reload closed it; x holds on
            out_y = held["y"].communicate(timeout=60)[0]
            assert held["y"].returncode != 0, out_y
            assert held["x"].poll() is None, "the reload closed an allowed connection"
        finally:
            release.touch()
        out_x = held["x"].communicate(timeout=30)[0]
        assert held["x"].returncode == 0, out_x
        recs = [c for c in n2.connections() if c["src_identity"] == SA + "sa-y"]
        assert any(
            "policy change" in (c["error"] or "") and c["response_flag"] == "DENY" for c in recs
        ), recs
        assert not n1.connect(y, db)["ok"]
        assert n1.connect(x, db)["ok"]


def _tcp_sockets_of(pid: int) -> list[socket.socket]:
    """Duplicates of every connected TCP socket a process holds (pidfd_getfd,
    Linux 5.6; root).  The caller closes them."""
    libc = ctypes.CDLL(None, use_errno=True)
    sys_pidfd_open, sys_pidfd_getfd = 434, 438  # x86_64 and most others share these
    pidfd = libc.syscall(sys_pidfd_open, pid, 0)
    assert pidfd >= 0, os.strerror(ctypes.get_errno())
    out = []
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    continue
            except OSError:
                continue  # closed meanwhile
            dup = libc.syscall(sys_pidfd_getfd, pidfd, int(fd), 0)
            if dup < 0:
                continue
            s = socket.socket(fileno=dup)
            if (
                s.family not in (socket.AF_INET, socket.AF_INET6)
                or s.type != socket.SOCK_STREAM
                or s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
            ):
                s.close()
                continue
            try:
                s.getpeername()
            except OSError:
                s.close()
                continue
            out.append(s)
    finally:
        os.close(pidfd)
    return out


def test_every_relayed_socket_has_nodelay(mesh: Any) -> None:
    """A relay must pass each byte on at once.  Python sockets made with
    socket(family, SOCK_STREAM) report proto 0, and asyncio only sets
    TCP_NODELAY when proto is IPPROTO_TCP: the HBONE server's Nagle then held
    small replies behind the client's 40 ms delayed ACK (one new connection
    in ten stalled).  Every connected TCP socket of both agents, on every
    path held open at once, must have TCP_NODELAY."""
    _, n1, n2 = mesh
    a, c, b = n1.tb.pod("a"), n1.tb.pod("c"), n2.tb.pod("b")
    plain1, plain2 = n1.tb.pod("plain1"), n2.tb.pod("plain2")
    want = {
        ("outbound", "hbone"),
        ("inbound", "local"),
        ("outbound", "passthrough"),
        ("inbound", "plaintext"),
    }
    # The clients hold their connections until the test has looked at them
    # (--until), not for a fixed time: under TCG starting four Python clients
    # takes longer than any hold short enough for a fast machine.
    tmp = tempfile.TemporaryDirectory()
    release = Path(tmp.name) / "release"
    hold = ["--hold", "300", "--until", str(release), "--timeout", "20"]
    held = [
        n1.spawn_peer(src, ["connect", dst.ip4, "8080", *hold])
        for src, dst in ((a, b), (a, c), (a, plain2), (plain1, c))
    ]
    try:
        # Wait until every path is open (bounded, generously: only a failure
        # waits that long)
        deadline = time.monotonic() + 60
        paths: set[tuple[str, str]] = set()
        while not want <= paths and time.monotonic() < deadline:
            time.sleep(0.2)
            paths = {(x["direction"], x["path"]) for x in n1.connections() if x["open"]}
        assert want <= paths, (paths, n1.connections()[-8:])
        checked, lacking = 0, []
        for node in (n1, n2):
            assert node.agent is not None
            pid = node.agent.pid
            assert b"agent.cli" in Path(f"/proc/{pid}/cmdline").read_bytes()
            with netns.entered(node.node.netns_path):
                socks = _tcp_sockets_of(pid)
            for s in socks:
                with contextlib.closing(s):
                    checked += 1
                    if not s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY):
                        lacking.append((node.node.name, s.getsockname(), s.getpeername()))
        # n1: 4 app-side sockets, HBONE to n2, a same-node delivery, a passthrough
        # upstream, a plaintext delivery; n2: HBONE server side and a delivery
        assert checked >= 10, checked
        assert lacking == [], lacking
    finally:
        release.touch()
        try:
            for h in held:
                out, _ = h.communicate(timeout=30)
                assert h.returncode == 0, out
        finally:
            tmp.cleanup()
