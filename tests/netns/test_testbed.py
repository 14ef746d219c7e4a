"""Netns tier: the simulated cluster really routes, isolates and cleans up.

Every test uses its own random prefix, and all traffic stays inside the
namespaces the test creates.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import cgroupfs as cg
from agent.cgroupfs import CgroupError, cgroup2_root, own_cgroup
from agent.netns import entered, list_netns, netns_inode
from agent.sim import peer
from agent.sim import topology as topo
from agent.sim.topology import Pod, Testbed, cleanup_prefix, random_prefix

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="netns tier needs root")

REPO = Path(__file__).resolve().parents[2]
PEER = [sys.executable, "-m", "agent.sim.peer"]
PORT = 7070


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def _leftovers(prefix: str) -> dict[str, list[str]]:
    """What the kernel still has under this prefix, seen three independent ways."""
    ip_list = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return {
        "run_netns": [n for n in list_netns() if n.startswith(prefix)],
        "ip_netns_list": [ln for ln in ip_list.stdout.splitlines() if ln.startswith(prefix)],
        "cgroups": [str(p) for p in cgroup2_root().glob(f"{prefix}*")],
    }


NONE_LEFT: dict[str, list[str]] = {"run_netns": [], "ip_netns_list": [], "cgroups": []}


@pytest.fixture
def prefix() -> Iterator[str]:
    p = random_prefix()
    yield p
    cleanup_prefix(p)  # safety net only; tests assert cleanliness themselves


@pytest.fixture
def cluster(prefix: str) -> Iterator[Testbed]:
    """Two nodes, two pods each."""
    with Testbed(prefix) as tb:
        n1 = tb.add_node("node1")
        n2 = tb.add_node("node2")
        n1.add_pod("a1")
        n1.add_pod("a2")
        n2.add_pod("b1", namespace="shop", service_account="cart")
        n2.add_pod("b2")
        yield tb


def _start_server(tb: Testbed, pod: Pod, *extra: str) -> subprocess.Popen[str]:
    proc = tb.spawn(
        pod,
        [*PEER, "serve", "--port", str(PORT), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=REPO,
    )
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=10):
            pytest.fail(f"server in {pod.name} not ready within 10s")
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        _, err = proc.communicate(timeout=5)
        pytest.fail(f"server in {pod.name} said {line!r}, stderr: {err}")
    return proc


def _client(tb: Testbed, pod: Pod, cmd: str, *args: str) -> dict[str, Any]:
    proc = tb.spawn(
        pod,
        [*PEER, cmd, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=REPO,
    )
    out, err = proc.communicate(timeout=60)
    assert out.strip(), f"no output from peer {cmd}; stderr: {err}"
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    assert proc.returncode == (0 if result["ok"] else 1), (proc.returncode, result, err)
    return result


def _cgroup_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise AssertionError(f"no cgroup v2 line for pid {pid}")


def _dead(pid: int, timeout: float = 5.0) -> bool:
    """Gone or a zombie (an orphan's reaper may be slow, or absent in a container)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state == "Z":
            return True
        time.sleep(0.05)
    return False


def _rel(cgroup_dir: Path) -> str:
    return "/" + str(cgroup_dir.relative_to(cgroup2_root()))


# -- traffic ------------------------------------------------------------------


@pytest.mark.parametrize("family", ["v4", "v6"])
@pytest.mark.parametrize("where", ["same-node", "cross-node"])
def test_pod_to_pod_tcp(cluster: Testbed, family: str, where: str) -> None:
    client = cluster.pod("a1")
    server = cluster.pod("a2" if where == "same-node" else "b1")
    _start_server(cluster, server)
    ip = server.ip4 if family == "v4" else server.ip6
    mine = client.ip4 if family == "v4" else client.ip6

    r = _client(cluster, client, "connect", ip, str(PORT), "--bytes", "65536")

    assert r["ok"], r
    assert r["error"] is None
    assert r["server_saw_peer"][0] == mine
    assert r["server_saw_local"] == [ip, PORT]
    assert r["getpeername"] == [ip, PORT]
    assert r["getsockname"] == [mine, r["server_saw_peer"][1]]
    assert r["bytes"] == 65536


def test_large_transfer_and_hold_cross_node(cluster: Testbed) -> None:
    """Big payloads must not deadlock (concurrent echo read); held connections keep working."""
    server = cluster.pod("b2")
    _start_server(cluster, server)
    big = _client(
        cluster, cluster.pod("a2"), "connect", server.ip6, str(PORT), "--bytes", "8000000"
    )
    assert big["ok"], big
    held = _client(cluster, cluster.pod("a2"), "connect", server.ip4, str(PORT), "--hold", "0.7")
    assert held["ok"], held


def test_server_bound_to_v6_wildcard_reports_plain_v4(cluster: Testbed) -> None:
    """A dual-stack '::' listener sees v4 clients as ::ffff:a.b.c.d; peer reports a.b.c.d."""
    server = cluster.pod("b1")
    _start_server(cluster, server, "--bind", "::")
    r = _client(cluster, cluster.pod("a1"), "connect", server.ip4, str(PORT))
    assert r["ok"], r
    assert r["server_saw_peer"][0] == cluster.pod("a1").ip4
    assert r["server_saw_local"] == [server.ip4, PORT]


def test_full_mesh_in_process(cluster: Testbed) -> None:
    """Every pod reaches every other over v4 and v6, using entered() from threads."""
    stop = threading.Event()
    threads = []
    for pod in cluster.pods:
        ready = threading.Event()

        def run(pod: Pod = pod, ready: threading.Event = ready) -> None:
            with entered(pod.netns_path):
                peer.serve(PORT + 1, stop=stop, on_ready=ready.set)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        assert ready.wait(5), f"in-process server in {pod.name} not ready"
        threads.append(t)
    try:
        failures = []
        for src in cluster.pods:
            with entered(src.netns_path):
                for dst in cluster.pods:
                    if dst is src:
                        continue
                    for mine, ip in ((src.ip4, dst.ip4), (src.ip6, dst.ip6)):
                        r = peer.connect(ip, PORT + 1, nbytes=1024, timeout=5)
                        if not r["ok"] or r["server_saw_peer"][0] != mine:
                            failures.append((src.name, ip, r))
        assert not failures
    finally:
        stop.set()
        for t in threads:
            t.join(5)


def test_rr_and_stream_clients(cluster: Testbed) -> None:
    server = cluster.pod("b1")
    _start_server(cluster, server)
    rr = _client(cluster, cluster.pod("a1"), "rr", server.ip4, str(PORT), "--count", "200")
    assert rr["ok"], rr
    assert 0 < rr["p50_us"] <= rr["p99_us"] <= rr["max_us"]
    assert rr["mean_us"] > 0

    sink = cluster.pod("b2")
    _start_server(cluster, sink, "--sink")
    st = _client(cluster, cluster.pod("a2"), "stream", sink.ip6, str(PORT), "--seconds", "0.5")
    assert st["ok"], st
    assert st["bytes"] > 0 and st["bytes_per_s"] > 0
    assert st["server_saw_peer"][0] == cluster.pod("a2").ip6


def test_connect_failure_is_reported(cluster: Testbed) -> None:
    r = _client(cluster, cluster.pod("a1"), "connect", cluster.pod("b1").ip4, "1", "--timeout", "3")
    assert not r["ok"]
    assert "refused" in r["error"].lower()


# -- placement ----------------------------------------------------------------


def test_spawn_places_process_in_cgroup_and_netns(cluster: Testbed) -> None:
    pod = cluster.pod("b1")
    node = cluster.nodes["node2"]
    for target, want in (
        (pod, pod.cgroup_path),
        (node.agent, node.cgroup_path / "agent"),
        (node.kubelet, node.cgroup_path / "kubelet"),
    ):
        proc = cluster.spawn(target, ["sleep", "30"])
        assert target.cgroup_path == want
        assert _cgroup_of(proc.pid) == _rel(want)
        assert proc.pid in [int(x) for x in (want / "cgroup.procs").read_text().split()]
        assert netns_inode(f"/proc/{proc.pid}/ns/net") == netns_inode(target.netns_path)
    assert netns_inode(f"/proc/{os.getpid()}/ns/net") != netns_inode(pod.netns_path)
    with pytest.raises(TypeError, match="node role"):
        cluster.spawn(node, ["true"])


def test_layout_and_describe(cluster: Testbed, prefix: str) -> None:
    d = json.loads(json.dumps(cluster.describe()))
    assert d["prefix"] == prefix
    assert d["fabric"]["netns"] == f"{prefix}-fabric"
    assert [n["name"] for n in d["nodes"]] == ["node1", "node2"]
    n2 = d["nodes"][1]
    assert n2["fabric_ip4"] == "10.99.0.2" and n2["fabric_ip6"] == "fd00:99::2"
    assert n2["gateway4"] == "10.10.2.1" and n2["gateway6"] == "fd00:10:2::1"
    b1 = n2["pods"][0]
    assert b1 == {
        "name": "b1",
        "namespace": "shop",
        "service_account": "cart",
        "node": "node2",
        "ip4": "10.10.2.2",
        "ip6": "fd00:10:2::2",
        "netns": f"{prefix}-node2-b1",
        "netns_path": f"/run/netns/{prefix}-node2-b1",
        "cgroup": str(cgroup2_root() / prefix / "node2" / "pods" / "b1"),
        "host_ifname": "veth2",
        "ifname": "eth0",
    }
    assert cluster.pod("a2").ip6 == "fd00:10:1::3"
    for name in ("fabric", "node1", "node2", "node1-a1", "node1-a2", "node2-b1", "node2-b2"):
        assert f"{prefix}-{name}" in list_netns()
    with pytest.raises(ValueError, match="already exists"):
        cluster.nodes["node1"].add_pod("b1")


def test_entered_restores_netns_even_on_error(cluster: Testbed) -> None:
    home = netns_inode()
    pod = cluster.pod("a1")
    with entered(pod.netns_path):
        assert netns_inode() == netns_inode(pod.netns_path)
    assert netns_inode() == home
    with pytest.raises(RuntimeError, match="boom"), entered(pod.netns_path):
        raise RuntimeError("boom")
    assert netns_inode() == home
    with pytest.raises(FileNotFoundError), entered("/run/netns/does-not-exist-tether"):
        pass
    assert netns_inode() == home


# -- teardown -----------------------------------------------------------------


def test_close_removes_everything(prefix: str) -> None:
    tb = Testbed(prefix)
    with tb:
        node = tb.add_node("n1")
        pod = node.add_pod("p1")
        sleeper = tb.spawn(pod, ["sleep", "300"])
        # A grandchild that outlives its parent still dies with the pod cgroup.
        tb.spawn(node.agent, ["sh", "-c", "sleep 300 & exit 0"]).wait(5)
        stray = [int(x) for x in (node.agent.cgroup_path / "cgroup.procs").read_text().split()]
        assert len(stray) == 1
        assert _leftovers(prefix)["cgroups"]
    assert sleeper.returncode is not None
    assert _dead(stray[0])
    assert _leftovers(prefix) == NONE_LEFT
    tb.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        tb.spawn(pod, ["true"])


def test_close_after_failed_build(prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pod that fails half-way (netns, cgroup and veth made) is still cleaned up."""

    def broken(*_a: object, **_k: object) -> None:
        raise RuntimeError("injected failure")

    with Testbed(prefix) as tb:
        node = tb.add_node("n1")
        monkeypatch.setattr(topo, "_wait_usable", broken)
        with pytest.raises(RuntimeError, match="injected"):
            node.add_pod("p1")
        assert f"{prefix}-n1-p1" in list_netns()
    assert _leftovers(prefix) == NONE_LEFT


def test_cleanup_prefix_after_crash(prefix: str) -> None:
    """A run that dies without close() leaves netns, cgroups and processes; sweep them."""
    script = textwrap.dedent(
        f"""
        import os, subprocess
        from agent.sim.topology import Testbed
        tb = Testbed({prefix!r})
        pod = tb.add_node("n1").add_pod("p1")
        tb.add_node("n2")
        p = tb.spawn(pod, ["sleep", "300"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(p.pid, flush=True)
        os._exit(3)  # crash: no close()
        """
    )
    crashed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=60
    )
    assert crashed.returncode == 3, crashed.stderr
    orphan = int(crashed.stdout.split()[0])
    before = _leftovers(prefix)
    assert len(before["run_netns"]) == 4 and before["cgroups"]
    assert _cgroup_of(orphan) == _rel(cgroup2_root() / prefix / "n1" / "pods" / "p1")

    removed = cleanup_prefix(prefix)

    assert sorted(removed["netns"]) == sorted(before["run_netns"])
    assert removed["cgroups"] == [str(cgroup2_root() / prefix)]
    assert _leftovers(prefix) == NONE_LEFT
    assert _dead(orphan), "orphaned process survived cleanup"
    assert cleanup_prefix(prefix) == {"cgroups": [], "netns": []}


def test_cleanup_prefix_rejects_dangerous_prefixes() -> None:
    for bad in ("", "s", "system.slice", "../x", "TT"):
        with pytest.raises(ValueError):
            cleanup_prefix(bad)


# -- cgroup helpers -----------------------------------------------------------


def test_cgroup2_root_from_mountinfo(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
        "40 31 0:37 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd\n"
        "41 31 0:38 / /mnt/cg\\0402 rw,relatime shared:9 - cgroup2 cgroup2 rw\n"
    )
    assert cgroup2_root(str(info)) == Path("/mnt/cg 2")
    info.write_text("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n")
    with pytest.raises(CgroupError, match="mount -t cgroup2 none /sys/fs/cgroup"):
        cgroup2_root(str(info))
    real = cgroup2_root()
    assert (real / "cgroup.controllers").exists()
    assert own_cgroup().is_dir()


@pytest.mark.parametrize("use_kill_file", [True, False], ids=["cgroup.kill", "sigkill-each"])
def test_remove_cgroup_kills_and_removes_nested(
    prefix: str, use_kill_file: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cg, "USE_CGROUP_KILL", use_kill_file)
    base = cg.make_cgroup(cgroup2_root() / prefix)
    leaf = cg.make_cgroup(base / "a" / "b")
    procs = [subprocess.Popen(["sleep", "300"]) for _ in range(3)]
    try:
        for p in procs:
            cg.move_pid(leaf if p is not procs[0] else base / "a", p.pid)
        assert sorted(cg.cgroup_pids(base, recursive=True)) == sorted(p.pid for p in procs)
        assert cg.remove_cgroup(base) is True
        assert not base.exists()
        assert all(p.wait(5) == -9 for p in procs)
        assert cg.remove_cgroup(base) is False
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    with pytest.raises(CgroupError, match="refusing"):
        cg.remove_cgroup(cgroup2_root())
