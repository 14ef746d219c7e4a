"""netns tier: steering to a waypoint, and the guarded pod refusing traffic
that skipped it.

No Envoy here, and no stand-in that fakes the protocol: the waypoint is
tether's own HBONE code (`H2Conn` server over mesh mTLS as the waypoint's
SPIFFE identity, `HboneClient` for its upstream) running in a simulated
waypoint pod (not captured, as Istio labels waypoint pods), doing what the
waypoint's HBONE side does without L7: terminate the CONNECT, pick the
service's endpoint, originate HBONE to it with the endpoint's ip:port as
authority, and bridge the streams.

Checked: pod a's connection to the service VIP goes, from a's agent, as a
CONNECT with :authority = VIP:port to the waypoint, authenticated as a;
b's agent accepts the waypoint's CONNECT and delivers; a direct connection
from a to b is refused by b's agent with 401 naming the waypoint.  On b's
own node: pod c's connection to the VIP still goes to the waypoint (not
same-node delivery), c's direct connection is reset (DENY), and plaintext
from outside the mesh is reset too.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import pytest

from agent import netns
from agent.identity.ca import CertificateAuthority
from agent.identity.spiffe import SpiffeId
from agent.identity.svid import Svid, generate_key, utcnow
from agent.identity.tls import client_context, peer_identity, server_context
from agent.sim.harness import AgentNode, Cluster, cluster_nodes
from agent.sim.topology import Pod
from agent.tunnel.h2conn import H2Conn, H2Stream
from agent.tunnel.hbone import HboneClient, HboneError, PoolKey, request_headers

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="netns tier needs root")

TD = "cluster.local"
SA_A = SpiffeId(TD, "shop", "sa-a")
SA_B = SpiffeId(TD, "shop", "sa-b")
WP_ID = SpiffeId(TD, "shop", "wp")
VIP = "10.96.77.7"
RECORD_TIMEOUT = 8.0


def _svid(ca: CertificateAuthority, ident: SpiffeId) -> Svid:
    key = generate_key()
    return Svid(ident, key, (ca.issue(key.public_key(), ident, None),), ca.roots, utcnow())


@dataclass
class Seen:
    authority: str
    peer: str
    status: int


@dataclass
class HboneWaypoint:
    """The waypoint's HBONE side from tether's own code, in the waypoint pod."""

    pod: Pod
    svid: Svid
    backends: dict[str, tuple[tuple[str, int], SpiffeId]]  # authority -> endpoint, identity
    seen: list[Seen] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)

    def start(self) -> None:
        with netns.entered(self.pod.netns_path):
            lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((self.pod.ip4, 15008))
        lsock.listen(64)
        lsock.setblocking(False)
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        ready: Future[None] = asyncio.run_coroutine_threadsafe(self._serve(lsock), self.loop)
        ready.result(10)

    async def _serve(self, lsock: socket.socket) -> None:
        ctx = server_context(self.svid)
        mine = client_context(self.svid)

        async def ctx_for(ident: SpiffeId) -> Any:
            assert ident == self.svid.identity
            return mine

        self.client = HboneClient(ctx_for)
        self.server = await self.loop.create_server(
            lambda: H2Conn(client=False, on_request=self._on_connect), sock=lsock, ssl=ctx
        )

    async def _on_connect(self, conn: H2Conn, stream: H2Stream) -> None:
        assert conn.transport is not None
        peer = peer_identity(conn.transport.get_extra_info("ssl_object")).uri
        authority = dict(stream.request_headers).get(":authority", "")
        backend = self.backends.get(authority)
        if backend is None:
            self.seen.append(Seen(authority, peer, 404))
            conn.respond(stream, 404)
            return
        (ip, port), ident = backend
        src = conn.transport.get_extra_info("peername")
        key = PoolKey(self.svid.identity, ident, str(self.pod.netns_path), (ip, 15008))
        try:
            up = await self.client.open(key, request_headers(f"{ip}:{port}", (src[0], src[1])))
        except HboneError as e:
            self.seen.append(Seen(authority, peer, e.status or 503))
            conn.respond(stream, 503)
            return
        self.seen.append(Seen(authority, peer, 200))
        conn.respond(stream, 200)
        up.attach(stream.write, stream.write_eof, lambda e: stream.reset() if e else None)
        stream.attach(up.write, up.write_eof, lambda e: up.reset() if e else None)

    def stop(self) -> None:
        async def down() -> None:
            self.server.close()
            self.client.close()

        asyncio.run_coroutine_threadsafe(down(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)


@dataclass
class Mesh:
    cluster: Cluster
    n1: AgentNode
    n2: AgentNode
    a: Pod
    b: Pod
    c: Pod
    outsider: Pod
    wp: HboneWaypoint


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with cluster_nodes("node1", "node2") as (cluster, (n1, n2)):
        a = n1.add_pod("a", "shop", "sa-a", labels={"app": "a"})
        b = n2.add_pod("b", "shop", "sa-b", labels={"app": "b"})
        c = n2.add_pod("c", "shop", "sa-c", labels={"app": "c"})
        outsider = n1.add_pod("outsider", "legacy", "default")  # namespace not enrolled
        wp_pod = n2.add_pod(
            "wp-5d8",
            "shop",
            "wp",
            labels={
                "istio.io/dataplane-mode": "none",
                "gateway.networking.k8s.io/gateway-name": "wp",
            },
        )
        n1.enroll_namespace("shop")
        cluster.services.append(
            {
                "name": "bsvc",
                "namespace": "shop",
                "addresses": [VIP],
                "ports": [{"port": 80, "targetPort": 8080}],
                "selector": {"app": "b"},
                "labels": {"istio.io/use-waypoint": "wp"},
            }
        )
        cluster.waypoints.append(
            {
                "name": "wp",
                "namespace": "shop",
                "addresses": [wp_pod.ip4],
                "node": "node2",
                "serviceAccount": "wp",
            }
        )
        ca = CertificateAuthority.load_or_generate(cluster.ca_dir)
        wp = HboneWaypoint(wp_pod, _svid(ca, WP_ID), {f"{VIP}:80": ((b.ip4, 8080), SA_B)})
        wp.start()
        n2.serve(b, 8080)
        n1.start_agent()
        n2.start_agent()
        try:
            yield Mesh(cluster, n1, n2, a, b, c, outsider, wp)
        finally:
            wp.stop()


def _record(node: AgentNode, pred: Any) -> dict[str, Any]:
    deadline = time.monotonic() + RECORD_TIMEOUT
    while True:
        found = [c for c in node.connections() if pred(c)]
        if found or time.monotonic() > deadline:
            assert found, node.connections()
            return found[-1]
        time.sleep(0.1)


def test_service_traffic_goes_to_the_waypoint_with_the_vip_as_authority(mesh: Mesh) -> None:
    m = mesh
    before = len(m.wp.seen)
    r = m.n1.peer(m.a, ["connect", VIP, "80", "--bytes", "65536", "--timeout", "10"])
    assert r["ok"], (r, m.n1.log_tail(), m.n2.log_tail())
    assert m.wp.seen[before:] == [Seen(f"{VIP}:80", SA_A.uri, 200)]
    out = _record(m.n1, lambda c: c["direction"] == "outbound" and c["dst"] == f"{VIP}:80")
    assert out["path"] == "waypoint" and out["dst_identity"] == WP_ID.uri, out
    assert out["dst_service"] == "bsvc.shop.svc.cluster.local"
    # b's agent took the waypoint's CONNECT (authority b:8080) and delivered it
    inn = _record(
        m.n2,
        lambda c: (
            c["direction"] == "inbound" and c["src_identity"] == WP_ID.uri and c["error"] is None
        ),
    )
    assert inn["dst"] == f"{m.b.ip4}:8080" and inn["path"] == "hbone", inn
    assert r["server_saw_peer"][0] == m.wp.pod.ip4
    waypoints = m.n1.status()["waypoints"]
    assert waypoints[0]["guards"] == ["shop/b"] and waypoints[0]["identity"] == WP_ID.uri


def test_direct_connection_to_the_guarded_pod_is_refused_with_401(mesh: Mesh) -> None:
    m = mesh
    r = m.n1.connect(m.a, m.b)
    assert not r["ok"], r
    out = _record(
        m.n1,
        lambda c: c["direction"] == "outbound" and c["dst"] == f"{m.b.ip4}:8080",
    )
    assert out["path"] == "hbone" and out["response_flag"] == "DENY", out
    assert "CONNECT answered 401" in out["error"], out
    inn = _record(
        m.n2,
        lambda c: c["direction"] == "inbound" and c["src_identity"] == SA_A.uri,
    )
    assert inn["response_flag"] == "DENY", inn
    assert (
        "waypoint bypass: shop/b takes mesh traffic only through waypoint shop/wp" in (inn["error"])
    ), inn


def test_same_node_source_still_goes_through_the_waypoint(mesh: Mesh) -> None:
    m = mesh
    before = len(m.wp.seen)
    r = m.n2.peer(m.c, ["connect", VIP, "80", "--bytes", "4096", "--timeout", "10"])
    assert r["ok"], (r, m.n2.log_tail())
    assert m.wp.seen[before:] == [Seen(f"{VIP}:80", SpiffeId(TD, "shop", "sa-c").uri, 200)]
    out = _record(
        m.n2,
        lambda c: c["direction"] == "outbound" and c["pod"] == "shop/c" and c["dst"] == f"{VIP}:80",
    )
    assert out["path"] == "waypoint", out


def test_same_node_and_plaintext_bypasses_are_reset(mesh: Mesh) -> None:
    m = mesh
    r = m.n2.connect(m.c, m.b)
    assert not r["ok"], r
    local = _record(
        m.n2,
        lambda c: c["direction"] == "inbound" and c["path"] == "local" and c["pod"] == "shop/b",
    )
    assert local["response_flag"] == "DENY" and "waypoint bypass" in local["error"], local
    r = m.n1.connect(m.outsider, m.b)
    assert not r["ok"], r
    plain = _record(
        m.n2,
        lambda c: c["direction"] == "inbound" and c["path"] == "plaintext" and c["pod"] == "shop/b",
    )
    assert plain["response_flag"] == "DENY", plain
    assert "a peer without identity is not it" in plain["error"], plain
