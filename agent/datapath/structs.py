"""Python mirrors of bpf/lib/types.h, so the agent builds map keys and values
byte-identical to the programs'.  tests/bpf/test_structs.py compiles the real
header and checks every size and offset here against it."""

from __future__ import annotations

import ctypes
import enum
import functools
import ipaddress
import socket
import sys
from typing import ClassVar

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=4096)
def _words(ip: str | IPAddress) -> tuple[int, tuple[int, int, int, int]]:
    """(family, ip words) of TetherAddr for an address (v4-mapped IPv6 as
    IPv4).  Cached as agent.model.addr.norm_ip is: the same few addresses
    make every connection's datapath keys, and ipaddress parses in Python;
    text that is no address raises ValueError and is not cached."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    raw = addr.packed
    if isinstance(addr, ipaddress.IPv4Address):
        return socket.AF_INET, (int.from_bytes(raw, sys.byteorder), 0, 0, 0)
    w = [int.from_bytes(raw[4 * i : 4 * i + 4], sys.byteorder) for i in range(4)]
    return socket.AF_INET6, (w[0], w[1], w[2], w[3])


class TetherAddr(ctypes.Structure):
    """One TCP endpoint; network byte order; IPv4 (and v4-mapped v6) in ip[0]."""

    _fields_: ClassVar = [
        ("ip", ctypes.c_uint32 * 4),
        ("port", ctypes.c_uint16),
        ("family", ctypes.c_uint16),
    ]

    @classmethod
    def of(cls, ip: str | IPAddress, port: int) -> TetherAddr:
        a = cls()
        a.family, words = _words(ip)
        a.ip[:] = words
        a.port = socket.htons(port)
        return a

    @property
    def address(self) -> IPAddress:
        if self.family == socket.AF_INET:
            return ipaddress.IPv4Address(int(self.ip[0]).to_bytes(4, sys.byteorder))
        raw = b"".join(int(w).to_bytes(4, sys.byteorder) for w in self.ip)
        return ipaddress.IPv6Address(raw)

    @property
    def host_port(self) -> int:
        return socket.ntohs(self.port)

    def __str__(self) -> str:
        a = self.address
        return f"[{a}]:{self.host_port}" if a.version == 6 else f"{a}:{self.host_port}"


class TetherTuple(ctypes.Structure):
    """A connection as its initiator sees it (src = connecting socket's local end)."""

    _fields_: ClassVar = [("src", TetherAddr), ("dst", TetherAddr)]

    @classmethod
    def of(cls, src: tuple[str, int], dst: tuple[str, int]) -> TetherTuple:
        return cls(TetherAddr.of(*src), TetherAddr.of(*dst))


class TetherPod(ctypes.Structure):
    _fields_: ClassVar = [("slot", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class TetherIpKey(ctypes.Structure):
    _fields_: ClassVar = [("family", ctypes.c_uint32), ("ip", ctypes.c_uint32 * 4)]

    @classmethod
    def of(cls, ip: str | IPAddress) -> TetherIpKey:
        a = TetherAddr.of(ip, 0)
        k = cls()
        k.family = a.family
        k.ip[:] = list(a.ip)
        return k


class TetherNetKey(ctypes.Structure):
    _fields_: ClassVar = [
        ("prefixlen", ctypes.c_uint32),
        ("slot", ctypes.c_uint32),
        ("family", ctypes.c_uint32),
        ("ip", ctypes.c_uint32 * 4),
    ]

    @classmethod
    def of(cls, slot: int, cidr: str) -> TetherNetKey:
        net = ipaddress.ip_network(cidr, strict=False)
        a = TetherAddr.of(net.network_address, 0)
        k = cls()
        k.prefixlen = 64 + net.prefixlen
        k.slot = slot
        k.family = a.family
        k.ip[:] = list(a.ip)
        return k


class TetherPortKey(ctypes.Structure):
    _fields_: ClassVar = [
        ("slot", ctypes.c_uint32),
        ("port", ctypes.c_uint16),
        ("dir", ctypes.c_uint16),
    ]


class TetherCfg(ctypes.Structure):
    _fields_: ClassVar = [("flags", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


POD_OUTBOUND = 1 << 0
POD_INBOUND = 1 << 1
DIR_OUT = 1
DIR_IN = 2
LISTEN_PER_POD = 4
CFG_SKMSG = 1 << 0


class Listen(enum.IntEnum):
    """Per-pod index of a listener socket in tether_listen."""

    PLAIN4 = 0
    PLAIN6 = 1
    HBONE4 = 2
    HBONE6 = 3


class Stat(enum.IntEnum):
    """enum tether_stat: counters in tether_stats."""

    OUT_CAPTURED = 0
    OUT_SKIPPED = 1
    IN_CAPTURED = 2
    IN_SKIPPED = 3
    IN_BYPASS = 4
    IN_NO_LISTENER = 5
    ORIG_DST_HIT = 6
    ORIG_DST_MISS = 7
    SOCKHASH_ADD = 8
    SOCKHASH_FAIL = 9
    PROBE_MARKED = 10


STAT_MAX = len(Stat)

# name in C -> mirror, for the layout test
MIRRORS: dict[str, type[ctypes.Structure]] = {
    "tether_addr": TetherAddr,
    "tether_tuple": TetherTuple,
    "tether_pod": TetherPod,
    "tether_ipkey": TetherIpKey,
    "tether_netkey": TetherNetKey,
    "tether_portkey": TetherPortKey,
    "tether_cfg": TetherCfg,
}
