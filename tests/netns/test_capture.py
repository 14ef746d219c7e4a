"""netns tier: a real agent process captures simulated pods' traffic.

Every check reads what happened on the wire or in the kernel: what the
server saw, what the client's getpeername() says, the agent's per-connection
records, BPF counters, and kernel object ids after cleanup.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from agent.datapath import bpfsys, inventory, podnet
from agent.netns import delete_netns
from agent.sim.harness import AgentNode, classify, cluster_nodes
from agent.sim.topology import Testbed

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="netns tier needs root")


@pytest.fixture(scope="module")
def node() -> Iterator[AgentNode]:
    with Testbed() as tb:
        an = AgentNode(tb)
        an.add_pod("a", "shop", "sa-a")
        an.add_pod("b", "shop", "sa-b")
        an.add_pod("c", "other", "sa-c")
        an.add_pod("d", "shop", "sa-d", labels={"istio.io/dataplane-mode": "none"})
        an.add_pod("e", "shop", "sa-e", excludeInboundPorts=[8081], excludeOutboundPorts=[8082])
        an.enroll_namespace("shop")
        for p in an.pods:
            an.serve(p, 8080)
        e = an.tb.pod("e")
        an.serve(e, 8081)
        an.serve(an.tb.pod("b"), 8082)
        an.start_agent()
        try:
            yield an
        finally:
            an.close()


def _path(an: AgentNode, r: dict[str, object]) -> tuple[str, str]:
    time.sleep(0.1)
    return classify(r, an.connections())


@pytest.mark.parametrize("family", [4, 6])
def test_enrolled_to_enrolled_is_captured_both_ways(node: AgentNode, family: int) -> None:
    a, b = node.tb.pod("a"), node.tb.pod("b")
    r = node.connect(a, b, family=family, nbytes=1 << 20)
    assert r["ok"], r
    b_ip, a_ip = (b.ip4, a.ip4) if family == 4 else (b.ip6, a.ip6)
    assert r["getpeername"] == [b_ip, 8080], "getpeername4/6 must show the dialled address"
    assert r["server_saw_peer"][0] == a_ip, "the app must see the client pod's own IP"
    assert r["server_saw_local"] == [b_ip, 8080]
    assert _path(node, r) == ("captured", "captured")


@pytest.mark.parametrize("family", [4, 6])
def test_not_enrolled_pod_goes_direct_but_is_captured_inbound_at_enrolled(
    node: AgentNode, family: int
) -> None:
    c, b = node.tb.pod("c"), node.tb.pod("b")
    r = node.connect(c, b, family=family)
    assert r["ok"], r
    assert r["server_saw_peer"][0] == (c.ip4 if family == 4 else c.ip6)
    assert _path(node, r) == ("direct", "captured")
    r = node.connect(b, c, family=family)
    assert r["ok"], r
    assert _path(node, r) == ("captured", "direct")


def test_pod_opted_out_with_label_none(node: AgentNode) -> None:
    d, c = node.tb.pod("d"), node.tb.pod("c")
    r = node.connect(d, c)
    assert r["ok"], r
    assert _path(node, r) == ("direct", "direct")
    assert "shop/d" not in node.status()["datapath"]["pods"]


def test_kubelet_probe_bypasses_inbound_capture(node: AgentNode) -> None:
    before = node.status()["datapath"]["stats"]
    r = node.connect(node.node.kubelet, node.tb.pod("b"))
    assert r["ok"], r
    after = node.status()["datapath"]["stats"]
    assert _path(node, r)[1] == "direct", "a probe must reach the app without the agent"
    assert after["probe_marked"] >= before["probe_marked"] + 1
    assert after["in_bypass"] >= before["in_bypass"] + 1
    # the same connection from a non-kubelet process on the node IS captured
    r = node.peer(node.node.agent, ["connect", node.tb.pod("b").ip4, "8080"])
    assert r["ok"], r
    assert _path(node, r)[1] == "captured"


def test_excluded_ports_are_not_captured(node: AgentNode) -> None:
    a, e, b = node.tb.pod("a"), node.tb.pod("e"), node.tb.pod("b")
    r = node.connect(a, e, port=8081)
    assert r["ok"], r
    assert _path(node, r) == ("captured", "direct")  # e excludes inbound 8081
    r = node.connect(e, b, port=8082)
    assert r["ok"], r
    assert _path(node, r) == ("direct", "captured")  # e excludes outbound 8082


def test_loopback_inside_pod_is_not_captured(node: AgentNode) -> None:
    a = node.tb.pod("a")
    before = node.status()["datapath"]["stats"]["out_skipped"]
    r = node.peer(a, ["connect", "127.0.0.1", "8080"])
    assert r["ok"], r
    assert r["server_saw_peer"][0] == "127.0.0.1"
    assert node.status()["datapath"]["stats"]["out_skipped"] > before


def test_bad_pod_is_reported_and_others_keep_working(node: AgentNode) -> None:
    try:
        node.add_pod("f", "shop", "sa-f")
        node.extra["f"]["netns"] = "/run/netns/missing-" + node.tb.prefix
        node.write_config()
        deadline = time.monotonic() + 10
        while "shop/f" not in node.status()["pod_errors"]:
            assert time.monotonic() < deadline, node.log_tail()
            time.sleep(0.2)
        err = node.status()["pod_errors"]["shop/f"]
        assert "does not exist" in err and "missing-" in err
        r = node.connect(node.tb.pod("a"), node.tb.pod("b"))
        assert r["ok"] and _path(node, r) == ("captured", "captured")
    finally:
        node.pods = [p for p in node.pods if p.name != "f"]
        node.write_config()


def test_pod_whose_netns_disappears_is_unenrolled_and_reported(node: AgentNode) -> None:
    """Before: a pod whose netns was deleted under a live agent stayed listed
    as enrolled, with a dead netns path and no error, until the config changed."""
    g = node.add_pod("g", "shop", "sa-g")
    try:
        node.write_config()
        deadline = time.monotonic() + 10
        while "shop/g" not in node.status()["datapath"]["pods"]:
            assert time.monotonic() < deadline, node.log_tail()
            time.sleep(0.2)
        delete_netns(g.netns_path)  # as a runtime does when the sandbox goes
        deadline = time.monotonic() + 10
        while "shop/g" not in node.status()["pod_errors"]:
            assert time.monotonic() < deadline, node.log_tail()
            time.sleep(0.2)
        st = node.status()
        assert "disappeared" in st["pod_errors"]["shop/g"]
        assert "shop/g" not in st["datapath"]["pods"]
        r = node.connect(node.tb.pod("a"), node.tb.pod("b"))
        assert r["ok"] and _path(node, r) == ("captured", "captured")
    finally:
        node.pods = [p for p in node.pods if p.name != "g"]
        node.write_config()


def _delivery_rule(netns_path: object) -> bool:
    """Whether the pod's netns routes the agent's delivery mark back to it
    (agent/datapath/podnet.py), as iproute2 sees it."""
    name = os.path.basename(str(netns_path))
    out = subprocess.run(["ip", "-n", name, "rule"], capture_output=True, text=True, check=True)
    return f"fwmark {podnet.DELIVERY_MARK:#x} lookup {podnet.DELIVERY_TABLE}" in out.stdout


def test_reload_unenrolls_and_reenrolls_a_namespace(node: AgentNode) -> None:
    a, b = node.tb.pod("a"), node.tb.pod("b")
    assert _delivery_rule(b.netns_path)
    node.enroll_namespace("shop", on=False)
    node.write_config()
    try:
        deadline = time.monotonic() + 10
        while node.status()["datapath"]["pods"] or _delivery_rule(b.netns_path):
            assert time.monotonic() < deadline, node.log_tail()
            time.sleep(0.2)
        r = node.connect(a, b)
        assert r["ok"] and _path(node, r) == ("direct", "direct")
        assert not any(p.exists() for p in (node.pin_dir_path / "pods").glob("*"))
    finally:
        node.enroll_namespace("shop", on=True)
        node.write_config()
    deadline = time.monotonic() + 10
    while len(node.status()["datapath"]["pods"]) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert _delivery_rule(b.netns_path)
    r = node.connect(a, b)
    assert r["ok"] and _path(node, r) == ("captured", "captured")


def test_pod_whose_routing_cannot_be_installed_is_reported_then_retried(node: AgentNode) -> None:
    """The delivery routing is installed by a worker process before the pod
    is enrolled: a netns where that fails (loopback down: no local route
    can go in) fails that pod alone, with the reason, until an update
    finds it fixed."""
    h = node.add_pod("h", "shop", "sa-h")
    name = os.path.basename(str(h.netns_path))
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "down"], check=True)
        node.write_config()
        deadline = time.monotonic() + 20
        while "shop/h" not in node.status()["pod_errors"]:
            assert time.monotonic() < deadline, node.log_tail()
            time.sleep(0.2)
        st = node.status()
        assert "delivery routing not installed" in st["pod_errors"]["shop/h"]
        assert "shop/h" not in st["datapath"]["pods"]
        r = node.connect(node.tb.pod("a"), node.tb.pod("b"))
        assert r["ok"] and _path(node, r) == ("captured", "captured")
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        node.pod_labels["h"] = {"retry": "1"}  # any update retries
        node.write_config()
        deadline = time.monotonic() + 20
        while "shop/h" not in node.status()["datapath"]["pods"]:
            assert time.monotonic() < deadline, node.log_tail()
            time.sleep(0.2)
        assert "shop/h" not in node.status()["pod_errors"]
        assert _delivery_rule(h.netns_path)
    finally:
        node.pods = [p for p in node.pods if p.name != "h"]
        node.write_config()


@pytest.mark.parametrize("sk_msg", [False, True])
@pytest.mark.parametrize("family", [4, 6])
def test_sk_msg_on_and_off_is_byte_exact(sk_msg: bool, family: int) -> None:
    with Testbed() as tb:
        an = AgentNode(tb, sk_msg=sk_msg)
        try:
            a, b = an.add_pod("a", "shop"), an.add_pod("b", "shop")
            an.enroll_namespace("shop")
            an.serve(b)
            an.start_agent()
            r = an.connect(a, b, family=family, nbytes=8 << 20)
            assert r["ok"], r  # the client checks the echo byte for byte
            out, inn = _path(an, r)
            assert out == ("captured (sk_msg)" if sk_msg else "captured")
            assert inn == "captured"
            stats = an.status()["datapath"]["stats"]
            assert (stats["sockhash_add"] > 0) == sk_msg
            assert stats["sockhash_fail"] == 0
        finally:
            an.close()


@contextlib.contextmanager
def _held_on_every_path() -> Iterator[
    tuple[AgentNode, subprocess.Popen[Any], list[subprocess.Popen[Any]], float, float]
]:
    """Node n1's agent running, pod a holding one echo connection on each
    relay path: HBONE to b on n2, passthrough to c (not enrolled), local to d.
    Yields (n1, its agent process, the held clients, a wait bound for the old
    agent's exit, a wait bound for the clients' end).

    The bounds scale with how long this agent took to start (t): the clients
    hold for max(6 s, 3t) - long enough for a successor to start, which the
    tests do while they hold - and fail on a stall of max(10 s, 2t): a
    successor freezes the relays from the handoff to its first reconcile,
    part of its own start, which a slow machine (TCG) stretches."""
    with cluster_nodes("n1", "n2") as (_, (an, other)):
        a, d = an.add_pod("a", "shop"), an.add_pod("d", "shop")
        c = an.add_pod("c", "other")
        b = other.add_pod("b", "shop")
        an.enroll_namespace("shop")
        for node, pod in ((an, d), (an, c), (other, b)):
            node.serve(pod)
        other.start_agent()
        t0 = time.monotonic()
        old = an.start_agent()
        started = time.monotonic() - t0
        hold, stall = max(6.0, 3 * started), max(10.0, 2 * started)
        args = ["--hold", f"{hold:.1f}", "--timeout", f"{stall:.1f}"]
        held = [an.spawn_peer(a, ["connect", dst.ip4, "8080", *args]) for dst in (b, c, d)]
        want = {"hbone", "passthrough", "local"}
        deadline = time.monotonic() + hold / 4
        paths: set[str] = set()
        while not want <= paths and time.monotonic() < deadline:
            time.sleep(0.2)
            paths = {x["path"] for x in an.connections() if x["open"]}
        assert want <= paths, paths
        # the clients end after their hold; a stall ends them sooner (failed)
        yield an, old, held, max(15.0, stall), hold + stall + 30.0


def _all_echoed(held: list[subprocess.Popen[Any]], bound: float) -> None:
    """Every held client ended with every echo checked.  The bound follows
    the hold (a fixed 30 s was shorter than a 237 s hold in a TCG VM)."""
    deadline = time.monotonic() + bound
    for h in held:
        out, _ = h.communicate(timeout=max(1.0, deadline - time.monotonic()))
        assert h.returncode == 0, out
        assert '"ok": true' in out.decode()


def test_restart_keeps_live_connections_and_adopts_pins() -> None:
    """A new agent takes over from a running one.  Plain relays (same-node
    mesh traffic, traffic to pods outside the mesh) are handed over socket and
    all; the cross-node HBONE connection (TLS state lives in the old process)
    is drained there to its end.  Every client sees every echo."""
    with _held_on_every_path() as (an, old, held, bound, echo_bound):
        inv = an.inventory()
        links_before, progs_before = inv.links, inv.progs
        # the successor takes over while the old agent still runs
        an.agent = None
        new = an.start_agent()
        _all_echoed(held, echo_bound)
        assert old.wait(bound) == 0, an.log_tail()
        inv = an.inventory()
        assert inv.links == links_before, "pinned links are adopted, not re-created"
        assert inv.progs.isdisjoint(progs_before), "links point at the new programs"
        inherited = [x for x in an.connections() if x["inherited"]]
        assert sorted(x["path"] for x in inherited) == ["local", "passthrough"]
        assert all(x["bytes_sent"] > 4096 for x in inherited)
        a = an.tb.pod("a")
        r = an.connect(a, an.tb.pod("b"))
        assert r["ok"] and _path(an, r)[0] == "captured"
        assert new.poll() is None


def test_successor_of_another_handoff_version_gets_the_listeners_released() -> None:
    """An upgrade across a change of the handoff layout: the successor asks
    for a version the running agent does not speak.  The running agent does
    not guess at the layout: it closes its listeners and keeps every open
    connection (plain relays and HBONE) to its end; the successor binds fresh
    listeners and serves new connections.  Every held client sees every echo."""
    with _held_on_every_path() as (an, old, held, bound, echo_bound):
        # a successor from the future asks for a layout this agent lacks
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(f"{an.state_dir}/handoff.sock")
            s.sendall(b"HANDOFF 99\n")
            answer = s.recv(4096)
        assert answer.startswith(b"RELEASED "), answer
        assert old.poll() is None, "the released agent drains, it does not exit yet"
        an.agent = None
        new = an.start_agent()
        r = an.connect(an.tb.pod("a"), an.tb.pod("d"))
        assert r["ok"] and _path(an, r) == ("captured", "captured")
        assert not [x for x in an.connections() if x["inherited"]]
        _all_echoed(held, echo_bound)
        assert old.wait(bound) == 0, an.log_tail()
        assert new.poll() is None


def test_crash_restart_adopts_kernel_state() -> None:
    with Testbed() as tb:
        an = AgentNode(tb)
        try:
            a, b = an.add_pod("a", "shop"), an.add_pod("b", "shop")
            an.enroll_namespace("shop")
            an.serve(b)
            an.start_agent()
            slots = {k: v["slot"] for k, v in an.status()["datapath"]["pods"].items()}
            links = an.inventory().links
            an.stop_agent(sig_kill=True)
            # capture stays in place with no agent: the pod's connections are refused,
            # never sent around the mesh
            r = an.connect(a, b)
            assert not r["ok"]
            an.start_agent()
            assert {k: v["slot"] for k, v in an.status()["datapath"]["pods"].items()} == slots
            assert an.inventory().links == links
            r = an.connect(a, b)
            assert r["ok"] and _path(an, r) == ("captured", "captured")
        finally:
            an.close()


def test_cleanup_leaves_nothing_in_the_kernel() -> None:
    with Testbed() as tb:
        an = AgentNode(tb)
        a, b = an.add_pod("a", "shop"), an.add_pod("b", "shop")
        an.enroll_namespace("shop")
        an.serve(b)
        an.start_agent()
        assert an.connect(a, b)["ok"]
        inv = an.inventory()
        cgroup_ids = {li.cgroup_id for li in _links(inv.links) if li.cgroup_id is not None}
        netns_inos = {li.netns_ino for li in _links(inv.links) if li.netns_ino is not None}
        # two pods (5 cgroup hooks + sk_lookup each), the agent (getsockopt,
        # sockops, netns-cookie probe) and the kubelet (probe sockops)
        assert len(inv.links) == 16 and len(cgroup_ids) == 4 and len(netns_inos) == 2
        an.stop_agent()
        report = an.cleanup()
        assert len(report["links"]) == 16
        left = inventory.remaining(inv, an.pin_dir)
        assert left == {"links": 0, "programs": 0, "maps": 0, "pins": 0}
        # no link in the whole kernel still targets our cgroups or netns
        for li in _links(bpfsys.link_ids()):
            assert li.cgroup_id not in cgroup_ids and li.netns_ino not in netns_inos
        assert not os.path.exists(an.state_dir)
        an.close()
        prefix = tb.prefix
    from agent.cgroupfs import cgroup2_root
    from agent.netns import list_netns

    assert not [n for n in list_netns() if n.startswith(prefix)]
    assert not (cgroup2_root() / prefix).exists()


def _links(ids: object) -> list[bpfsys.LinkInfo]:
    out = []
    for i in ids:  # type: ignore[attr-defined]
        try:
            fd = bpfsys.link_get_fd_by_id(i)
        except OSError:
            continue
        try:
            out.append(bpfsys.link_info(fd))
        finally:
            os.close(fd)
    return out
