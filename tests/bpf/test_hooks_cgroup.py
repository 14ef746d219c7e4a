"""connect4/6, getpeername4/6, sockops, getsockopt and the kubelet probe, for real.

These program types cannot be test-run, so each test builds a scratch netns
(lo up, plus 10.77.0.1/32 and fd77::1/128 on lo as "remote" destinations) and
scratch cgroups for the pod, the agent and the kubelet, attaches the programs
with bpf links, and drives real sockets.  Sockets that must belong to a
cgroup are created by a factory process living in that cgroup and netns (see
conftest.py); the hooks act on the socket's own cgroup and netns, so the test
can then connect/accept/getsockopt on them directly.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent import netns
from agent.datapath import bpfsys
from agent.datapath.loader import PROGRAMS, Programs, kernel_version
from agent.datapath.structs import (
    CFG_SKMSG,
    DIR_OUT,
    POD_INBOUND,
    POD_OUTBOUND,
    Stat,
    TetherAddr,
    TetherCfg,
    TetherNetKey,
    TetherPod,
    TetherPortKey,
    TetherTuple,
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="bpf tier needs root (bpf(2), bpffs, cgroup v2)"
)

SO_ORIGINAL_DST = 80  # == IP6T_SO_ORIGINAL_DST
OUTBOUND = 15001
DST4, DST6 = "10.77.0.1", "fd77::1"
ADDRS = (f"{DST4}/32", f"{DST6}/128")
APP_PORT = 8080
TIMEOUT = 5.0
TCP_SYN_SENT = 2


# -- helpers ---------------------------------------------------------------------


def u64(n: int) -> bytes:
    return n.to_bytes(8, sys.byteorder)


def listen_on(sock: socket.socket, addr: str, port: int, backlog: int = 16) -> socket.socket:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind((addr, port))
    sock.listen(backlog)
    sock.settimeout(TIMEOUT)
    return sock


def accept_from(listener: socket.socket, client: socket.socket) -> socket.socket:
    """The accepted end of `client`'s connection on `listener` (others are closed)."""
    want = endpoint(client.getsockname())
    while True:
        conn, peer = listener.accept()
        if endpoint(peer) == want:
            conn.settimeout(TIMEOUT)
            return conn
        conn.close()


def endpoint(addr: tuple) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """(ip, port) with v4-mapped IPv6 addresses as IPv4, for comparing both ends."""
    ip = ipaddress.ip_address(addr[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip, addr[1]


def nothing_pending(listener: socket.socket) -> bool:
    listener.setblocking(False)
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return True
    finally:
        listener.settimeout(TIMEOUT)
    conn.close()
    return False


def orig_dst4(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    family, port, addr = struct.unpack("=HH4s8x", raw)
    assert family == socket.AF_INET
    return socket.inet_ntop(socket.AF_INET, addr), socket.ntohs(port)


def orig_dst6(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
    family, port, flowinfo, addr, scope = struct.unpack("=HHI16sI", raw)
    assert (family, flowinfo, scope) == (socket.AF_INET6, 0, 0)
    return socket.inet_ntop(socket.AF_INET6, addr), socket.ntohs(port)


def same_ip(a: str, b: str) -> bool:
    return ipaddress.ip_address(a) == ipaddress.ip_address(b)


def tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


@dataclass
class Env:
    progs: Programs
    maps: Any  # conftest.Maps
    netns: Path
    pod_cg: Path
    agent_cg: Path
    pod: Any  # conftest.SocketFactory
    agent: Any
    l4: socket.socket  # agent outbound listeners (agent cgroup)
    l6: socket.socket
    app4: socket.socket  # plain listeners on the real destinations
    app6: socket.socket
    socks: list[socket.socket]
    attach: Callable[[str, Path], None]
    make_netns: Callable[..., Path]
    make_cgroup: Callable[[str], Path]
    sock_factory: Callable[[Path, Path], Any]

    def keep(self, s: socket.socket) -> socket.socket:
        self.socks.append(s)
        return s

    def client(self, family: int, dualstack: bool = False, factory: Any = None) -> socket.socket:
        s = self.keep((factory or self.pod).socket(family))
        if dualstack:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        s.settimeout(TIMEOUT)
        return s

    def plain_listener(
        self, family: int, addr: str, port: int, ns: Path | None = None, backlog: int = 16
    ) -> socket.socket:
        from agent import netns as _netns

        with _netns.entered(ns or self.netns):
            s = socket.socket(family, socket.SOCK_STREAM)
        return listen_on(self.keep(s), addr, port, backlog)


@pytest.fixture
def env(programs, maps, scratch_netns, scratch_cgroup, sock_factory, fds, socks, ns_cookie) -> Env:
    ns = scratch_netns(ADDRS)
    pod_cg, agent_cg = scratch_cgroup("pod"), scratch_cgroup("agent")

    def attach(prog: str, cgroup: Path) -> None:
        cg_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fds.append(cg_fd)
        link = bpfsys.link_create(programs.prog_fds[prog], cg_fd, PROGRAMS[prog].attach_type)
        fds.append(link)

    for prog in (
        "tether_connect4",
        "tether_connect6",
        "tether_peer4",
        "tether_peer6",
        "tether_sockops",
    ):
        attach(prog, pod_cg)
    attach("tether_sockopt", agent_cg)

    # enroll the scratch netns as pod slot 0, outbound capture
    maps.put("tether_pods", u64(ns_cookie(ns)), TetherPod(slot=0, flags=POD_OUTBOUND))

    pod = sock_factory(ns, pod_cg)
    agent = sock_factory(ns, agent_cg)
    e = Env(
        progs=programs,
        maps=maps,
        netns=ns,
        pod_cg=pod_cg,
        agent_cg=agent_cg,
        pod=pod,
        agent=agent,
        l4=None,
        l6=None,
        app4=None,
        app6=None,
        socks=socks,
        attach=attach,
        make_netns=scratch_netns,
        make_cgroup=scratch_cgroup,
        sock_factory=sock_factory,
    )
    e.l4 = listen_on(e.keep(agent.socket(socket.AF_INET)), "127.0.0.1", OUTBOUND)
    e.l6 = listen_on(e.keep(agent.socket(socket.AF_INET6)), "::1", OUTBOUND)
    e.app4 = e.plain_listener(socket.AF_INET, DST4, APP_PORT)
    e.app6 = e.plain_listener(socket.AF_INET6, DST6, APP_PORT)
    return e


def test_factories_live_where_they_should(env: Env, ns_cookie) -> None:
    s = env.client(socket.AF_INET)
    if kernel_version() >= (5, 14):  # SO_NETNS_COOKIE; before, compare the namespaces
        assert bpfsys.netns_cookie(s) == ns_cookie(env.netns)
    assert os.stat(f"/proc/{env.pod.proc.pid}/ns/net").st_ino == os.stat(env.netns).st_ino
    pid_cg = Path(f"/proc/{env.pod.proc.pid}/cgroup").read_text()
    assert pid_cg.strip().endswith("/" + env.pod_cg.name), pid_cg


# -- outbound capture --------------------------------------------------------------


def test_connect4_is_redirected_to_agent(env: Env) -> None:
    before = env.maps.stats()
    c = env.client(socket.AF_INET)
    c.connect((DST4, APP_PORT))
    a = env.keep(accept_from(env.l4, c))
    assert nothing_pending(env.app4), "the app listener got the connection too"
    assert a.getsockname() == ("127.0.0.1", OUTBOUND)
    assert c.getpeername() == (DST4, APP_PORT)  # getpeername4 hook
    assert orig_dst4(a) == (DST4, APP_PORT)  # getsockopt hook
    c.sendall(b"ping")
    assert a.recv(4) == b"ping"
    # the state behind it
    orig = env.maps.get("tether_orig", u64(bpfsys.socket_cookie(c)))
    assert orig == bytes(TetherAddr.of(DST4, APP_PORT))
    key = TetherTuple.of(c.getsockname(), ("127.0.0.1", OUTBOUND))
    assert env.maps.get("tether_tuple", key) == orig
    delta = stat_delta(before, env.maps.stats())
    assert delta == {Stat.OUT_CAPTURED: 1, Stat.ORIG_DST_HIT: 1}


def test_connect6_is_redirected_to_agent(env: Env) -> None:
    before = env.maps.stats()
    c = env.client(socket.AF_INET6)
    c.connect((DST6, APP_PORT))
    a = env.keep(accept_from(env.l6, c))
    assert nothing_pending(env.app6)
    assert a.getsockname()[:2] == ("::1", OUTBOUND)
    assert c.getpeername()[:2] == (DST6, APP_PORT)  # getpeername6 hook
    assert orig_dst6(a) == (DST6, APP_PORT)
    c.sendall(b"ping6")
    assert a.recv(5) == b"ping6"
    delta = stat_delta(before, env.maps.stats())
    assert delta == {Stat.OUT_CAPTURED: 1, Stat.ORIG_DST_HIT: 1}


def test_v4mapped_connect_lands_on_ipv4_listener(env: Env) -> None:
    c = env.client(socket.AF_INET6, dualstack=True)
    c.connect(("::ffff:" + DST4, APP_PORT))
    a = env.keep(accept_from(env.l4, c))
    assert nothing_pending(env.app4)
    assert nothing_pending(env.l6)
    assert a.family == socket.AF_INET
    assert orig_dst4(a) == (DST4, APP_PORT)
    peer = c.getpeername()
    assert same_ip(peer[0], "::ffff:" + DST4) and peer[1] == APP_PORT


def test_sol_ipv6_on_v4_original_gives_mapped_address(env: Env) -> None:
    """A dual-stack agent socket asking SOL_IPV6 for a v4 original gets it v4-mapped."""
    l46 = env.keep(env.agent.socket(socket.AF_INET6))
    l46.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    l46.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    env.l4.close()  # let the dual-stack listener own 15001 for IPv4 too
    env.l6.close()
    l46.bind(("::", OUTBOUND))
    l46.listen(4)
    l46.settimeout(TIMEOUT)
    c = env.client(socket.AF_INET)
    c.connect((DST4, APP_PORT))
    a = env.keep(l46.accept()[0])
    assert a.family == socket.AF_INET6
    assert orig_dst6(a) == ("::ffff:" + DST4, APP_PORT)
    assert orig_dst4(a) == (DST4, APP_PORT)


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_loopback_destination_is_not_redirected(env: Env, family: int) -> None:
    lo = "127.0.0.1" if family == socket.AF_INET else "::1"
    app = env.plain_listener(family, lo, 9999)
    before = env.maps.stats()
    c = env.client(family)
    c.connect((lo, 9999))
    env.keep(accept_from(app, c))
    assert nothing_pending(env.l4) and nothing_pending(env.l6)
    assert c.getpeername()[:2] == (lo, 9999)
    assert env.maps.get("tether_orig", u64(bpfsys.socket_cookie(c))) is None
    assert stat_delta(before, env.maps.stats()) == {Stat.OUT_SKIPPED: 1}


def _assert_direct(env: Env, family: int) -> dict[Stat, int]:
    dst, app = (DST4, env.app4) if family == socket.AF_INET else (DST6, env.app6)
    before = env.maps.stats()
    c = env.client(family)
    c.connect((dst, APP_PORT))
    a = env.keep(accept_from(app, c))
    assert a.getsockname()[:2] == (dst, APP_PORT)
    assert nothing_pending(env.l4) and nothing_pending(env.l6)
    assert env.maps.get("tether_orig", u64(bpfsys.socket_cookie(c))) is None
    return stat_delta(before, env.maps.stats())


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_excluded_port_is_not_redirected(env: Env, family: int) -> None:
    env.maps.put("tether_ports", TetherPortKey(slot=0, port=APP_PORT, dir=DIR_OUT), b"\x01")
    assert _assert_direct(env, family) == {Stat.OUT_SKIPPED: 1}


@pytest.mark.parametrize(
    ("family", "cidr"),
    [(socket.AF_INET, "10.77.0.0/16"), (socket.AF_INET6, "fd77::/64")],
    ids=["ipv4", "ipv6"],
)
def test_excluded_cidr_is_not_redirected(env: Env, family: int, cidr: str) -> None:
    env.maps.put("tether_nets", TetherNetKey.of(0, cidr), b"\x01")
    assert _assert_direct(env, family) == {Stat.OUT_SKIPPED: 1}


def test_exclusions_of_other_cidrs_ports_and_slots_do_not_apply(env: Env) -> None:
    m = env.maps
    m.put("tether_nets", TetherNetKey.of(0, "10.78.0.0/16"), b"\x01")
    m.put("tether_nets", TetherNetKey.of(1, "10.77.0.0/16"), b"\x01")
    m.put("tether_ports", TetherPortKey(slot=0, port=APP_PORT + 1, dir=DIR_OUT), b"\x01")
    m.put("tether_ports", TetherPortKey(slot=1, port=APP_PORT, dir=DIR_OUT), b"\x01")
    m.put("tether_ports", TetherPortKey(slot=0, port=APP_PORT, dir=2), b"\x01")
    c = env.client(socket.AF_INET)
    c.connect((DST4, APP_PORT))
    a = env.keep(accept_from(env.l4, c))
    assert orig_dst4(a) == (DST4, APP_PORT)


def test_pod_cgroup_in_another_netns_is_not_redirected(env: Env) -> None:
    other = env.make_netns(ADDRS)
    app = env.plain_listener(socket.AF_INET, DST4, APP_PORT, ns=other)
    stray = env.sock_factory(other, env.pod_cg)  # nsenter'd / debug-container process
    before = env.maps.stats()
    c = env.client(socket.AF_INET, factory=stray)
    c.connect((DST4, APP_PORT))
    a = env.keep(accept_from(app, c))
    assert a.getsockname() == (DST4, APP_PORT)
    assert c.getpeername() == (DST4, APP_PORT)
    assert nothing_pending(env.l4)
    assert stat_delta(before, env.maps.stats()) == {}


def test_enrolled_inbound_only_is_not_redirected(env: Env, ns_cookie) -> None:
    env.maps.put("tether_pods", u64(ns_cookie(env.netns)), TetherPod(slot=0, flags=POD_INBOUND))
    assert _assert_direct(env, socket.AF_INET) == {}


def test_udp_connect_is_not_redirected(env: Env) -> None:
    before = env.maps.stats()
    c = env.keep(env.pod.socket(socket.AF_INET, socket.SOCK_DGRAM))
    c.connect((DST4, APP_PORT))
    assert c.getpeername() == (DST4, APP_PORT)
    assert env.maps.get("tether_orig", u64(bpfsys.socket_cookie(c))) is None
    assert stat_delta(before, env.maps.stats()) == {}


def test_agent_cgroup_connect_is_not_redirected(env: Env) -> None:
    c = env.client(socket.AF_INET, factory=env.agent)
    c.connect((DST4, APP_PORT))
    env.keep(accept_from(env.app4, c))
    assert nothing_pending(env.l4)


def test_orig_dst_miss_for_unknown_connection(env: Env) -> None:
    """SO_ORIGINAL_DST on an agent socket nobody redirected: no answer, counted as a miss."""
    before = env.maps.stats()
    c = env.client(socket.AF_INET, factory=env.agent)
    c.connect(("127.0.0.1", OUTBOUND))  # agent cgroup: not captured
    a = env.keep(accept_from(env.l4, c))
    with pytest.raises(OSError) as exc:
        orig_dst4(a)
    assert exc.value.errno in (errno.ENOPROTOOPT, errno.ENOENT)
    assert stat_delta(before, env.maps.stats()) == {Stat.ORIG_DST_MISS: 1}


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_state_is_removed_when_the_connection_closes(env: Env, family: int, wait_for) -> None:
    dst, lis, lo = (
        (DST4, env.l4, "127.0.0.1") if family == socket.AF_INET else (DST6, env.l6, "::1")
    )
    c = env.client(family)
    c.connect((dst, APP_PORT))
    a = accept_from(lis, c)
    cookie = u64(bpfsys.socket_cookie(c))
    key = TetherTuple.of(c.getsockname()[:2], (lo, OUTBOUND))
    m = env.maps
    assert m.get("tether_orig", cookie) is not None
    assert m.get("tether_tuple", key) is not None
    c.close()
    a.close()
    wait_for(
        lambda: m.get("tether_orig", cookie) is None and m.get("tether_tuple", key) is None,
        what="tether_orig/tether_tuple cleanup",
    )


def test_sockops_puts_socket_in_sockhash_when_enabled(env: Env) -> None:
    m = env.maps
    c = env.client(socket.AF_INET)
    c.connect((DST4, APP_PORT))
    env.keep(accept_from(env.l4, c))
    key = bytes(TetherTuple.of(c.getsockname(), ("127.0.0.1", OUTBOUND)))
    assert key not in m.keys("tether_socks")

    m.put("tether_cfg", (0).to_bytes(4, sys.byteorder), TetherCfg(flags=CFG_SKMSG))
    before = m.stats()
    c = env.client(socket.AF_INET)
    c.connect((DST4, APP_PORT))
    a = env.keep(accept_from(env.l4, c))
    key = bytes(TetherTuple.of(c.getsockname(), ("127.0.0.1", OUTBOUND)))
    assert key in m.keys("tether_socks")
    assert stat_delta(before, m.stats()) == {Stat.OUT_CAPTURED: 1, Stat.SOCKHASH_ADD: 1}
    c.close()
    a.close()


# -- kubelet probes ----------------------------------------------------------------


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_probe_records_tuple_before_the_handshake(env: Env, family: int, wait_for) -> None:
    kubelet_cg = env.make_cgroup("kubelet")
    env.attach("tether_probe", kubelet_cg)
    kubelet = env.sock_factory(env.netns, kubelet_cg)
    dst = DST4 if family == socket.AF_INET else DST6
    # a listener whose accept queue is full drops further SYNs: the probe stays in SYN_SENT
    full = env.plain_listener(family, dst, 9090, backlog=0)
    filler = env.client(family, factory=env.agent)
    filler.connect((dst, 9090))
    before = env.maps.stats()
    probe = env.client(family, factory=kubelet)
    probe.setblocking(False)
    assert probe.connect_ex((dst, 9090)) == errno.EINPROGRESS
    assert tcp_state(probe) == TCP_SYN_SENT
    key = TetherTuple.of(probe.getsockname()[:2], (dst, 9090))
    assert env.maps.get("tether_bypass", key) == b"\x01"
    assert stat_delta(before, env.maps.stats()) == {Stat.PROBE_MARKED: 1}
    probe.close()
    wait_for(lambda: env.maps.get("tether_bypass", key) is None, what="bypass cleanup")
    assert full.fileno() >= 0


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_probe_entry_lives_as_long_as_the_connection(env: Env, family: int, wait_for) -> None:
    kubelet_cg = env.make_cgroup("kubelet")
    env.attach("tether_probe", kubelet_cg)
    kubelet = env.sock_factory(env.netns, kubelet_cg)
    dst, app = (DST4, env.app4) if family == socket.AF_INET else (DST6, env.app6)
    probe = env.client(family, factory=kubelet)
    probe.connect((dst, APP_PORT))
    a = accept_from(app, probe)
    key = TetherTuple.of(probe.getsockname()[:2], (dst, APP_PORT))
    assert env.maps.get("tether_bypass", key) == b"\x01"
    probe.close()
    a.close()
    wait_for(lambda: env.maps.get("tether_bypass", key) is None, what="bypass cleanup")


def test_pod_connections_are_not_recorded_as_probes(env: Env) -> None:
    kubelet_cg = env.make_cgroup("kubelet")
    env.attach("tether_probe", kubelet_cg)
    c = env.client(socket.AF_INET)
    c.connect((DST4, APP_PORT))
    env.keep(accept_from(env.l4, c))
    assert env.maps.keys("tether_bypass") == []


def stat_delta(before: dict[Stat, int], after: dict[Stat, int]) -> dict[Stat, int]:
    return {s: after[s] - before[s] for s in Stat if after[s] != before[s]}


def test_nsprobe_gives_the_kernels_netns_cookie(scratch_netns: Callable[..., Path]) -> None:
    """The pre-5.14 way (tether_nsprobe) agrees with SO_NETNS_COOKIE where both exist."""
    from tests.bpf.conftest import _probe_cookie

    path = scratch_netns()
    probed = _probe_cookie(path)
    with netns.entered(path):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        try:
            direct = bpfsys.netns_cookie(s)
        except OSError:
            pytest.skip("SO_NETNS_COOKIE needs Linux 5.14; the probe path was exercised")
    assert probed == direct
