"""netns tier: agents serving the tunnel on two event loops
(TETHER_TUNNEL_LOOPS=2, agent/tunnel/loops.py).  Connections land on both
loops and every byte arrives unchanged (cross-node HBONE, same node, IPv4
and IPv6); a policy change closes the connections it denies on whichever
loop they live; a restart hands plain relays of both loops to the successor.
Each test opens connections until the agents' status shows both loops
serving some (bounded), so a run never passes without the second loop."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.bench import _env
from agent.sim.harness import AgentNode, Cluster, cluster_nodes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="netns tier needs root")

SA = "spiffe://cluster.local/ns/shop/sa/"
HOLD_BOUND = 48  # connections opened at most to find both loops serving


@pytest.fixture
def mesh() -> Iterator[tuple[Cluster, AgentNode, AgentNode]]:
    with cluster_nodes("n1", "n2") as (cluster, (n1, n2)):
        n1.add_pod("a", "shop", "sa-a")
        n1.add_pod("c", "shop", "sa-c")
        n2.add_pod("b", "shop", "sa-b")
        n1.enroll_namespace("shop")
        for n in (n1, n2):
            for p in n.pods:
                n.serve(p)
        with _env({"TETHER_TUNNEL_LOOPS": "2"}):
            n1.start_agent()
            n2.start_agent()
        for n in (n1, n2):
            assert "tunnel: 2 event loops" in n.log_tail(400)
            assert n.status()["tunnel_loops"]["count"] == 2
        yield cluster, n1, n2


def _served(node: AgentNode, key: str = "recent_connections") -> list[int]:
    return list(node.status()["tunnel_loops"][key])


def _wait(cond: Any, bound: float = 30.0) -> bool:
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.1)
    return bool(cond())


def test_connections_on_both_loops_are_byte_exact(mesh: Any, tmp_path: Path) -> None:
    """Held connections first, until both of node2's loops serve some (so
    node1 has dialled from both of its loops' pools); then transfers of
    every size at once, cross-node v4/v6 and same-node, while they hold."""
    _, n1, n2 = mesh
    a, b, c = n1.tb.pod("a"), n2.tb.pod("b"), n1.tb.pod("c")
    release = tmp_path / "release"
    held = _hold_until_both_loops(n1, n2, a, b, release)
    try:
        jobs = [(b, 4, 3 << 20), (b, 6, 3 << 20), (c, 4, 1 << 20), (b, 4, 1), (b, 4, 16385)] * 6
        with concurrent.futures.ThreadPoolExecutor(12) as ex:
            results = list(ex.map(lambda j: n1.connect(a, j[0], family=j[1], nbytes=j[2]), jobs))
        assert all(r["ok"] for r in results), [r for r in results if not r["ok"]]
        sent = [x["bytes_sent"] for x in n2.connections() if x["direction"] == "inbound"]
        for size in (3 << 20, 1, 16385):
            assert sent.count(size) >= jobs.count((b, 4, size)), (size, sent)
        for n in (n1, n2):
            per_loop = _served(n)
            assert all(per_loop), f"{n.node.name}: a loop served nothing: {per_loop}"
        pools = {p["loop"] for p in n1.status()["hbone_pool"]}
        assert pools == {0, 1}, n1.status()["hbone_pool"]
    finally:
        release.touch()
    for h in held:
        out = h.communicate(timeout=60)[0]
        assert h.returncode == 0, out


def _hold_until_both_loops(
    src_node: AgentNode, dst_node: AgentNode, src: Any, dst: Any, release: Path
) -> list[subprocess.Popen[Any]]:
    """Open held connections from src to dst one at a time until the
    destination agent has some open on each loop."""
    hold = ["--hold", "300", "--until", str(release), "--timeout", "30"]
    held: list[subprocess.Popen[Any]] = []
    for _ in range(HOLD_BOUND):
        held.append(src_node.spawn_peer(src, ["connect", dst.ip4, "8080", *hold]))
        n = len(held)
        _wait(lambda n=n: sum(_served(dst_node, "open_connections")) >= n, 20)
        if all(_served(dst_node, "open_connections")):
            return held
    release.touch()
    raise AssertionError(
        f"{HOLD_BOUND} connections and one loop still serves none: "
        f"{_served(dst_node, 'open_connections')}"
    )


def test_a_policy_change_closes_denied_connections_on_every_loop(mesh: Any, tmp_path: Path) -> None:
    cluster, n1, n2 = mesh
    a, b = n1.tb.pod("a"), n2.tb.pod("b")
    release = tmp_path / "release"
    held = _hold_until_both_loops(n1, n2, a, b, release)
    try:
        cluster.policies = [
            {
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": "b-from-nobody-here", "namespace": "shop"},
                "spec": {
                    "selector": {"matchLabels": {}},
                    "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/x/sa/y"]}}]}],
                },
            }
        ]
        cluster.write_configs()
        for h in held:  # every one ends without a release: the reload closed it
            out = h.communicate(timeout=60)[0]
            assert h.returncode != 0, out
    finally:
        release.touch()
    recs = [x for x in n2.connections() if x["src_identity"] == SA + "sa-a"]
    closed = [x for x in recs if "policy change" in (x["error"] or "")]
    assert len(closed) == len(held), recs
    assert all(x["response_flag"] == "DENY" for x in closed)
    assert _served(n2, "open_connections") == [0, 0]
    assert not n1.connect(a, b)["ok"]


def test_a_restart_hands_over_plain_relays_of_both_loops(mesh: Any, tmp_path: Path) -> None:
    """Same-node connections are plain relays: the old agent freezes each on
    its own loop and hands its sockets over; every client sees every echo."""
    _, n1, _ = mesh
    a, c = n1.tb.pod("a"), n1.tb.pod("c")
    release = tmp_path / "release"
    held = _hold_until_both_loops(n1, n1, a, c, release)
    inbound_local = sum(1 for x in n1.status()["connections"]["open"] if x["path"] == "local")
    old = n1.agent
    assert old is not None
    n1.agent = None
    with _env({"TETHER_TUNNEL_LOOPS": "2"}):
        new = n1.start_agent()
    assert old.wait(60) == 0, n1.log_tail()
    inherited = [x for x in n1.connections() if x["inherited"] and x["open"]]
    # each same-node connection is two records (outbound, inbound); the
    # outbound side carries the relay and is handed over
    assert len(inherited) == len(held), (inherited, inbound_local)
    release.touch()
    for h in held:
        out = h.communicate(timeout=60)[0]
        assert h.returncode == 0, out
        assert b'"ok": true' in out
    assert n1.connect(a, c)["ok"]
    assert new.poll() is None
