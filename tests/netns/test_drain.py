"""netns tier: tether's own graceful drain of its HBONE connections.

On shutdown the destination agent sends GOAWAY(NO_ERROR, 2^31-1), a PING,
then GOAWAY(NO_ERROR, last stream id) (RFC 9113 §6.8, as Envoy and Go
clients expect); the stream already open keeps carrying data to its end,
and the connection is then closed with a TLS close_notify (the client's
read ends cleanly: no SSLEOFError, "EOF occurred in violation of protocol").
The client is this process, with an SVID from the cluster CA and h2 with
tether's GOAWAY handling (plain h2 would itself die on the PING).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from unittest import mock

import h2.connection
import h2.events
import pytest

from agent.identity.ca import CertificateAuthority
from agent.identity.spiffe import SpiffeId
from agent.sim.harness import AgentNode, cluster_nodes
from agent.sim.topology import Pod
from agent.tunnel.h2conn import _H2Connection
from tests.netns.test_hbone import H2Client, connect_headers, svid_from, tls_from

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="netns tier needs root")

SA_A = SpiffeId("cluster.local", "shop", "sa-a")


class DrainClient(H2Client):
    """Keeps every GOAWAY and PING it gets."""

    goaways: list[tuple[int, int]]
    pings: int = 0

    def _event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.ConnectionTerminated):
            self.goaways.append((int(ev.error_code or 0), int(ev.last_stream_id or 0)))
        if isinstance(ev, h2.events.PingReceived):
            self.pings += 1
        super()._event(ev)

    @property
    def gone(self) -> bool:
        return self.eof or self.error is not None  # a GOAWAY is not the end here


@pytest.fixture
def bed() -> Iterator[tuple[AgentNode, AgentNode, Pod, Pod, CertificateAuthority]]:
    with cluster_nodes("node1", "node2") as (cluster, (n1, n2)):
        a = n1.add_pod("a", "shop", "sa-a")
        b = n2.add_pod("b", "shop", "sa-b")
        n1.enroll_namespace("shop")
        ca = CertificateAuthority.load_or_generate(cluster.ca_dir)
        n2.serve(b, 8080)
        t0 = time.monotonic()
        n2.start_agent()
        STARTED["n2"] = time.monotonic() - t0
        yield n1, n2, a, b, ca


# How long node 2's agent took to start (BCC's compile is most of it: seconds
# here, 35 s and more under TCG).  A successor's start_agent() returns as soon
# as the admin port answers ready, which the old agent still does: the handoff,
# and with it the old agent's GOAWAYs, comes only once the successor has
# compiled, so the handoff test's bounds scale with this.
STARTED: dict[str, float] = {}


def test_shutdown_drains_with_two_goaways_finishes_the_stream_and_sends_close_notify(
    bed: tuple[AgentNode, AgentNode, Pod, Pod, CertificateAuthority],
) -> None:
    _n1, n2, a, b, ca = bed
    tls = tls_from(a, b.ip4, svid_from(ca, SA_A))
    with mock.patch.object(h2.connection, "H2Connection", _H2Connection):
        c = DrainClient(tls)
    c.goaways = []
    try:
        c.ready()
        sid = c.request(connect_headers(f"{b.ip4}:8080"))
        assert c.answer(sid) == "200"
        assert c.read_line(sid).startswith(b"{"), "the echo server's greeting"
        assert n2.agent is not None
        n2.agent.terminate()  # SIGTERM: the agent drains before it stops
        assert c.pump(lambda: len(c.goaways) >= 2, timeout=5), (c.goaways, c.why())
        assert c.goaways[0] == (0, 2**31 - 1), c.goaways
        assert c.goaways[1] == (0, sid), c.goaways
        assert c.pings >= 1
        c.send(sid, b"after the drain began\n")  # the open stream still works
        assert c.read_line(sid) == b"after the drain began", (
            c.why(),
            c.resets,
            c.ended,
            n2.log_tail(30),
        )
        c.finish(sid)
        c.pump(lambda: c.eof or c.error is not None, timeout=5)
        assert c.eof and c.error is None, f"no close_notify: {c.why()}"
    finally:
        c.close()
    n2.agent.wait(20)
    n2.agent = None


def test_handoff_drains_hbone_with_goaway_and_close_notify_then_the_successor_serves(
    bed: tuple[AgentNode, AgentNode, Pod, Pod, CertificateAuthority],
) -> None:
    """A successor takes over node 2: the old agent keeps its HBONE
    connections (their TLS state is in that process) but drains them at once,
    so the peer's new streams go to the successor; the open stream finishes,
    and the old agent ends the connection with close_notify (it did not at
    the end of a handoff drain before)."""
    _n1, n2, a, b, ca = bed
    svid = svid_from(ca, SA_A)
    tls = tls_from(a, b.ip4, svid)
    with mock.patch.object(h2.connection, "H2Connection", _H2Connection):
        c = DrainClient(tls)
    c.goaways = []
    old = n2.agent
    assert old is not None
    try:
        c.ready()
        sid = c.request(connect_headers(f"{b.ip4}:8080"))
        assert c.answer(sid) == "200"
        assert c.read_line(sid).startswith(b"{")
        bound = max(10.0, 3 * STARTED["n2"])
        n2.agent = None
        n2.start_agent()  # the successor: handoff while the old agent runs
        assert c.pump(lambda: len(c.goaways) >= 2, timeout=bound), (c.goaways, c.why())
        assert [g[0] for g in c.goaways] == [0, 0] and c.goaways[1][1] == sid, c.goaways
        c.send(sid, b"still served by the old agent\n")
        assert c.read_line(sid) == b"still served by the old agent"
        c.finish(sid)
        c.pump(lambda: c.eof or c.error is not None, timeout=bound)
        assert c.eof and c.error is None, f"no close_notify: {c.why()}"
    finally:
        c.close()
    assert old.wait(max(20.0, bound)) == 0, n2.log_tail(30)
    # new connections are the successor's
    with mock.patch.object(h2.connection, "H2Connection", _H2Connection):
        c2 = DrainClient(tls_from(a, b.ip4, svid))
    c2.goaways = []
    try:
        c2.ready()
        sid = c2.request(connect_headers(f"{b.ip4}:8080"))
        assert c2.answer(sid) == "200", c2.why()
    finally:
        c2.close()
