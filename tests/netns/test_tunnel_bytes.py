"""netns tier: bytes through the cross-node HBONE path arrive unchanged on
either event loop (TETHER_LOOP=asyncio and uvloop), and on uvloop with the
C TLS path (TETHER_TLS=c, agent/tunnel/_tlscore.c), with the copy-free DATA
path (header + payload pieces written with writelines, frames parsed from
views of h2's buffer): large transfers, several streams multiplexed on the
pooled connection at once, IPv4 and IPv6.  The peer sends random bytes and
compares the whole echo (length and content); both agents' records must
count every byte."""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Iterator
from typing import Any

import pytest

from agent import eventloop
from agent.bench import _env
from agent.sim.harness import AgentNode, Cluster, cluster_nodes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="netns tier needs root")

NO_UVLOOP = pytest.mark.skipif(
    eventloop.loop_factory("uvloop")[0] != "uvloop", reason="uvloop not installed"
)
# (event loop, TETHER_TLS): the loop's TLS on both loops, and the C path
# (agent/tunnel/_tlscore.c; `make setup` builds it) on uvloop
LOOPS = [
    pytest.param(("asyncio", "loop"), id="asyncio"),
    pytest.param(("uvloop", "loop"), id="uvloop", marks=NO_UVLOOP),
    pytest.param(("uvloop", "c"), id="uvloop-tls-c", marks=NO_UVLOOP),
]


@pytest.fixture(scope="module", params=LOOPS)
def mesh(request: Any) -> Iterator[tuple[str, Cluster, AgentNode, AgentNode]]:
    loop_name, tls_path = request.param
    if tls_path == "c":
        from agent.tunnel import tlssock

        assert tlssock.core_available(), "agent/tunnel/_tlscore.c is not built: make setup"
    with cluster_nodes("n1", "n2") as (cluster, (n1, n2)):
        n1.add_pod("a", "shop", "sa-a")
        n2.add_pod("b", "shop", "sa-b")
        n1.enroll_namespace("shop")
        for n in (n1, n2):
            for p in n.pods:
                n.serve(p)
        with _env({"TETHER_LOOP": loop_name, "TETHER_TLS": tls_path}):
            n1.start_agent()
            n2.start_agent()
        for n in (n1, n2):
            tail = n.log_tail(400)
            assert f"event loop: {loop_name}" in tail
            assert f"HBONE TLS: {tls_path}" in tail
            assert n.status()["malloc"].startswith("tuned"), n.status()["malloc"]
        yield tls_path, cluster, n1, n2


def _hbone_bytes(node: AgentNode, direction: str) -> list[int]:
    return [
        c["bytes_sent"]
        for c in node.connections()
        if c["direction"] == direction and c["path"] == "hbone"
    ]


@pytest.mark.parametrize("family", [4, 6])
def test_large_transfer_is_byte_exact(mesh: Any, family: int) -> None:
    tls_path, _, n1, n2 = mesh
    a, b = n1.tb.pod("a"), n2.tb.pod("b")
    size = 48 << 20
    r = n1.connect(a, b, family=family, nbytes=size)
    assert r["ok"], r
    assert size in _hbone_bytes(n1, "outbound")
    assert size in _hbone_bytes(n2, "inbound")
    pools = n1.status()["hbone_pool"]
    assert pools and all(p["tls"] == [tls_path] for p in pools), pools  # the path that carried it


def test_concurrent_streams_on_one_connection_are_byte_exact(mesh: Any) -> None:
    """Frames of several streams interleave on one TLS connection; each
    stream's bytes must come back whole and in order."""
    _, _, n1, n2 = mesh
    a, b = n1.tb.pod("a"), n2.tb.pod("b")
    sizes = [1, 9, 16383, 16384, 16385, 1 << 20, 5 << 20, 12 << 20]
    with concurrent.futures.ThreadPoolExecutor(len(sizes)) as ex:
        results = list(ex.map(lambda n: n1.connect(a, b, nbytes=n), sizes))
    assert all(r["ok"] for r in results), [r for r in results if not r["ok"]]
    for n in sizes:
        assert n in _hbone_bytes(n2, "inbound")
