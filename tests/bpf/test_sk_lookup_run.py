"""tether_lookup under BPF_PROG_TEST_RUN: inbound steering decisions, one SYN at a time.

SK_LOOKUP test runs take a struct bpf_sk_lookup as ctx_in (no packet data) and
report the cookie of the socket the program assigned (0 if none) in ctx_out.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from agent.datapath import bpfsys
from agent.datapath.loader import Programs, kernel_version
from agent.datapath.structs import (
    DIR_IN,
    DIR_OUT,
    LISTEN_PER_POD,
    POD_INBOUND,
    POD_OUTBOUND,
    Listen,
    Stat,
    TetherIpKey,
    TetherPod,
    TetherPortKey,
    TetherTuple,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="bpf tier needs root (bpf(2), bpffs, cgroup v2)"),
    # The same words KernelTooOld uses; the kernel matrix shows them as skips.
    pytest.mark.skipif(
        kernel_version() < (5, 14),
        reason="BPF_PROG_TEST_RUN for sk_lookup needs Linux 5.14 or newer; "
        f"this kernel is {kernel_version()[0]}.{kernel_version()[1]}",
    ),
]

SK_DROP, SK_PASS = 0, 1
SLOT = 3  # not 0, so the slot * LISTEN_PER_POD arithmetic is exercised
POD4, POD6 = "10.77.0.1", "fd77::1"
PEER4, PEER6 = "10.88.0.9", "fd88::9"
PEER_PORT = 40123
APP_PORT = 8080

# struct bpf_sk_lookup (uapi, 6.x): cookie is out-only in test runs
_CTX = struct.Struct("=QIII16s2sH4s16sII4x")
assert _CTX.size == 72


def sk_lookup_ctx(family: int, src: str, sport: int, dst: str, dport: int, proto: int) -> bytes:
    s, d = ipaddress.ip_address(src).packed, ipaddress.ip_address(dst).packed
    v4 = family == socket.AF_INET
    return _CTX.pack(
        0,
        family,
        proto,
        int.from_bytes(s, sys.byteorder) if v4 else 0,
        b"" if v4 else s,
        sport.to_bytes(2, "big"),  # remote_port: network order
        0,
        d if v4 else b"",
        b"" if v4 else d,
        dport,  # local_port: host order
        0,
    )


@dataclass
class Run:
    retval: int
    cookie: int
    delta: dict[Stat, int]


@pytest.fixture
def lookup(programs: Programs, maps):
    prog_fd = programs.prog_fds["tether_lookup"]

    def run(
        dst: str,
        dport: int,
        src: str | None = None,
        sport: int = PEER_PORT,
        proto: int = socket.IPPROTO_TCP,
    ) -> Run:
        family = socket.AF_INET6 if ":" in dst else socket.AF_INET
        if src is None:
            src = PEER6 if family == socket.AF_INET6 else PEER4
        before = maps.stats()
        res = bpfsys.prog_test_run(
            prog_fd,
            b"",
            ctx_in=sk_lookup_ctx(family, src, sport, dst, dport, proto),
            ctx_size_out=_CTX.size,
        )
        after = maps.stats()
        cookie = _CTX.unpack(res.ctx_out)[0]
        delta = {s: after[s] - before[s] for s in Stat if after[s] != before[s]}
        return Run(res.retval, cookie, delta)

    return run


def listener(family: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(("::1", 0))
    else:
        s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s


@pytest.fixture
def listeners(maps) -> Iterator[dict[Listen, socket.socket]]:
    """Four distinct agent listeners in tether_listen at SLOT."""
    socks = {
        Listen.PLAIN4: listener(socket.AF_INET),
        Listen.PLAIN6: listener(socket.AF_INET6),
        Listen.HBONE4: listener(socket.AF_INET),
        Listen.HBONE6: listener(socket.AF_INET6),
    }
    try:
        for idx, s in socks.items():
            key = (SLOT * LISTEN_PER_POD + idx).to_bytes(4, sys.byteorder)
            maps.put_sock("tether_listen", key, s)
        yield socks
    finally:
        for s in socks.values():
            s.close()


def enroll(maps, flags: int = POD_INBOUND | POD_OUTBOUND) -> None:
    for ip in (POD4, POD6):
        maps.put("tether_podips", TetherIpKey.of(ip), TetherPod(slot=SLOT, flags=flags))


FAMILIES = pytest.mark.parametrize(
    ("pod", "plain", "hbone"),
    [(POD4, Listen.PLAIN4, Listen.HBONE4), (POD6, Listen.PLAIN6, Listen.HBONE6)],
    ids=["ipv4", "ipv6"],
)


@FAMILIES
def test_not_enrolled_passes_untouched(lookup, listeners, pod, plain, hbone) -> None:
    r = lookup(pod, APP_PORT)
    assert (r.retval, r.cookie, r.delta) == (SK_PASS, 0, {})


@FAMILIES
def test_enrolled_outbound_only_passes_untouched(
    lookup, maps, listeners, pod, plain, hbone
) -> None:
    enroll(maps, flags=POD_OUTBOUND)
    r = lookup(pod, APP_PORT)
    assert (r.retval, r.cookie, r.delta) == (SK_PASS, 0, {})


@FAMILIES
def test_enrolled_is_steered_to_plaintext_listener(
    lookup, maps, listeners, pod, plain, hbone
) -> None:
    enroll(maps)
    r = lookup(pod, APP_PORT)
    assert r.retval == SK_PASS
    assert r.cookie == bpfsys.socket_cookie(listeners[plain])
    assert r.delta == {Stat.IN_CAPTURED: 1}


@FAMILIES
def test_hbone_port_goes_to_hbone_listener(lookup, maps, listeners, pod, plain, hbone) -> None:
    enroll(maps)
    r = lookup(pod, 15008)
    assert r.retval == SK_PASS
    assert r.cookie == bpfsys.socket_cookie(listeners[hbone])
    assert r.cookie != bpfsys.socket_cookie(listeners[plain])
    assert r.delta == {Stat.IN_CAPTURED: 1}


@FAMILIES
def test_excluded_inbound_port_passes(lookup, maps, listeners, pod, plain, hbone) -> None:
    enroll(maps)
    maps.put("tether_ports", TetherPortKey(slot=SLOT, port=APP_PORT, dir=DIR_IN), b"\x01")
    r = lookup(pod, APP_PORT)
    assert (r.retval, r.cookie, r.delta) == (SK_PASS, 0, {Stat.IN_SKIPPED: 1})
    # only that port: the next one is still steered
    r = lookup(pod, APP_PORT + 1)
    assert r.cookie == bpfsys.socket_cookie(listeners[plain])


@FAMILIES
def test_excluded_port_of_another_slot_or_direction_is_steered(
    lookup, maps, listeners, pod, plain, hbone
) -> None:
    enroll(maps)
    maps.put("tether_ports", TetherPortKey(slot=SLOT + 1, port=APP_PORT, dir=DIR_IN), b"\x01")
    maps.put("tether_ports", TetherPortKey(slot=SLOT, port=APP_PORT, dir=DIR_OUT), b"\x01")
    r = lookup(pod, APP_PORT)
    assert r.cookie == bpfsys.socket_cookie(listeners[plain])
    assert r.delta == {Stat.IN_CAPTURED: 1}


@FAMILIES
def test_bypass_tuple_passes(lookup, maps, listeners, pod, plain, hbone) -> None:
    enroll(maps)
    peer = PEER6 if ":" in pod else PEER4
    maps.put("tether_bypass", TetherTuple.of((peer, PEER_PORT), (pod, APP_PORT)), b"\x01")
    r = lookup(pod, APP_PORT)
    assert (r.retval, r.cookie, r.delta) == (SK_PASS, 0, {Stat.IN_BYPASS: 1})
    # a different source port of the same peer is not bypassed
    r = lookup(pod, APP_PORT, sport=PEER_PORT + 1)
    assert r.cookie == bpfsys.socket_cookie(listeners[plain])


@FAMILIES
def test_enrolled_without_listener_drops(lookup, maps, pod, plain, hbone) -> None:
    enroll(maps)
    r = lookup(pod, APP_PORT)
    assert (r.retval, r.cookie, r.delta) == (SK_DROP, 0, {Stat.IN_NO_LISTENER: 1})


def test_wrong_family_listener_drops(lookup, maps) -> None:
    """An IPv6 SYN whose PLAIN6 slot holds an IPv4 socket cannot be assigned: refused."""
    enroll(maps)
    s = listener(socket.AF_INET)
    try:
        maps.put_sock(
            "tether_listen", (SLOT * LISTEN_PER_POD + Listen.PLAIN6).to_bytes(4, sys.byteorder), s
        )
        r = lookup(POD6, APP_PORT)
        assert (r.retval, r.cookie, r.delta) == (SK_DROP, 0, {Stat.IN_NO_LISTENER: 1})
    finally:
        s.close()


def test_udp_is_never_steered(lookup, maps, listeners) -> None:
    enroll(maps)
    r = lookup(POD4, APP_PORT, proto=socket.IPPROTO_UDP)
    assert (r.retval, r.cookie, r.delta) == (SK_PASS, 0, {})


def test_other_address_of_node_is_not_steered(lookup, maps, listeners) -> None:
    enroll(maps)
    r = lookup("10.77.0.2", APP_PORT)
    assert (r.retval, r.cookie, r.delta) == (SK_PASS, 0, {})
