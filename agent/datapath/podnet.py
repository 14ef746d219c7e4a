"""Routing inside an enrolled pod's netns so the agent can hand an inbound
connection to the app with the original client's source address.

The agent opens its delivery socket with IP_TRANSPARENT, binds it to the
client's IP and marks it with SO_MARK DELIVERY_MARK.  The app's replies go to
that client IP, which would route out of eth0; instead:

- net.ipv4.tcp_fwmark_accept=1 makes the app's accepted socket take the mark
  of the incoming SYN (covers IPv6 too), so every packet the app sends on
  that connection carries DELIVERY_MARK;
- net.ipv4.fwmark_reflect=1 and net.ipv6.fwmark_reflect=1 give the packets
  the kernel answers on the app's behalf (the RST to a closed port) the
  same mark, so a refused delivery fails at once instead of timing out;
- `ip rule fwmark DELIVERY_MARK lookup DELIVERY_TABLE` with
  `local default dev lo` in that table delivers those packets back to the
  agent's socket on loopback.

This is what ztunnel's in-pod mode does with iptables connmark; here it takes
one sysctl and two rules per family, and no netfilter at all.  Only marked
packets are affected; the pod's other traffic routes as before.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import os
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from agent import netns

DELIVERY_MARK = 0x539
DELIVERY_TABLE = 133
RULE_PRIORITY = 32000  # before main (32766)
T = TypeVar("T")
# In a container /proc/sys is read-only; the DaemonSet mounts the host's
# /proc writable at TETHER_HOST_PROC.  Net sysctls follow the writing
# thread's netns whichever procfs mount is used.
_PROC = os.environ.get("TETHER_HOST_PROC", "/proc")
SYSCTLS = (
    f"{_PROC}/sys/net/ipv4/tcp_fwmark_accept",
    f"{_PROC}/sys/net/ipv4/fwmark_reflect",
    f"{_PROC}/sys/net/ipv6/fwmark_reflect",
)


def _off_loop(fn: Callable[[], T]) -> T:
    """Run fn on a short-lived thread: pyroute2's sync IPRoute drives an event
    loop of its own and refuses to start inside the agent's running one."""
    with concurrent.futures.ThreadPoolExecutor(1) as ex:
        return ex.submit(fn).result()


def prepare(path: str) -> None:
    """Idempotently install the delivery routing in the netns at path."""
    _off_loop(lambda: _prepare(path))


def unprepare(path: str) -> None:
    """Remove what prepare() installed; absent pieces are fine."""
    _off_loop(lambda: _unprepare(path))


def installed(path: str) -> bool:
    """Whether the delivery rule is present (tests check the kernel, not us)."""
    return _off_loop(lambda: _installed(path))


# rtnetlink, the four messages this module needs (linux/netlink.h,
# linux/rtnetlink.h, linux/fib_rules.h).  Not pyroute2: importing it costs the
# agent ~11 MiB resident (its package imports ndb, ipdb, sqlite3, ...) for
# two rules and two routes per pod.
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE, NLM_F_DUMP = 0x1, 0x4, 0x200, 0x400, 0x300
RTM_NEWROUTE, RTM_DELROUTE, RTM_NEWRULE, RTM_DELRULE, RTM_GETRULE = 24, 25, 32, 33, 34
FRA_PRIORITY, FRA_FWMARK, FRA_TABLE = 6, 10, 15
RTA_OIF, RTA_TABLE = 4, 15
FR_ACT_TO_TBL = 1
RTPROT_BOOT, RT_SCOPE_HOST, RT_SCOPE_NOWHERE, RTN_LOCAL = 3, 254, 255, 2
_NLMSGHDR = struct.Struct("=IHHII")
_RTMSG = struct.Struct("=BBBBBBBBI")  # rtmsg and fib_rule_hdr share this layout


def _attr_u32(kind: int, value: int) -> bytes:
    return struct.pack("=HHI", 8, kind, value)


class _Rtnl:
    """A NETLINK_ROUTE socket in the calling thread's netns."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.seq = 0

    def __enter__(self) -> _Rtnl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _send(self, kind: int, flags: int, body: bytes) -> int:
        self.seq += 1
        self.sock.send(_NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, flags, self.seq, 0) + body)
        return self.seq

    def _messages(self, seq: int) -> Iterator[tuple[int, bytes]]:
        while True:
            buf = self.sock.recv(65536)
            off = 0
            while off + _NLMSGHDR.size <= len(buf):
                length, kind, _, mseq, _ = _NLMSGHDR.unpack_from(buf, off)
                if length < _NLMSGHDR.size:
                    return
                payload = buf[off + _NLMSGHDR.size : off + length]
                off += (length + 3) & ~3
                if mseq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", payload)[0]
                    if code:
                        raise OSError(code, f"rtnetlink: {os.strerror(code)}")
                    return
                yield kind, payload

    def request(self, kind: int, flags: int, body: bytes) -> None:
        """One request, answered with an ack; OSError(errno) when refused."""
        for _ in self._messages(self._send(kind, NLM_F_REQUEST | NLM_F_ACK | flags, body)):
            pass

    def dump(self, kind: int, body: bytes) -> Iterator[bytes]:
        for _, payload in self._messages(self._send(kind, NLM_F_REQUEST | NLM_F_DUMP, body)):
            yield payload


def _attrs(payload: bytes, offset: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    while offset + 4 <= len(payload):
        alen, akind = struct.unpack_from("=HH", payload, offset)
        if alen < 4:
            break
        out[akind & 0x3FFF] = payload[offset + 4 : offset + alen]
        offset += (alen + 3) & ~3
    return out


def _rule(family: int) -> bytes:
    return _RTMSG.pack(family, 0, 0, 0, DELIVERY_TABLE, 0, 0, FR_ACT_TO_TBL, 0) + b"".join(
        (
            _attr_u32(FRA_FWMARK, DELIVERY_MARK),
            _attr_u32(FRA_TABLE, DELIVERY_TABLE),
            _attr_u32(FRA_PRIORITY, RULE_PRIORITY),
        )
    )


def _local_route(family: int, scope: int, oif: int | None) -> bytes:
    body = _RTMSG.pack(family, 0, 0, 0, DELIVERY_TABLE, RTPROT_BOOT, scope, RTN_LOCAL, 0)
    body += _attr_u32(RTA_TABLE, DELIVERY_TABLE)
    if oif is not None:
        body += _attr_u32(RTA_OIF, oif)
    return body


def _prepare(path: str) -> None:
    with netns.entered(path):
        for knob in SYSCTLS:
            Path(knob).write_text("1\n")
        lo = socket.if_nametoindex("lo")
        with _Rtnl() as nl:
            for family in (socket.AF_INET, socket.AF_INET6):
                _ignore_exists(nl, RTM_NEWRULE, _rule(family))
                # `ip route add local default dev lo table 133`: scope host, as
                # ip sets it (IPv4 refuses a local route of universe scope).
                _ignore_exists(nl, RTM_NEWROUTE, _local_route(family, RT_SCOPE_HOST, lo))


def _unprepare(path: str) -> None:
    with netns.entered(path), _Rtnl() as nl:
        for family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                nl.request(RTM_DELRULE, 0, _rule(family))
            with contextlib.suppress(OSError):
                nl.request(RTM_DELROUTE, 0, _local_route(family, RT_SCOPE_NOWHERE, None))
        for knob in SYSCTLS:
            with contextlib.suppress(OSError):
                Path(knob).write_text("0\n")


def _installed(path: str) -> bool:
    with netns.entered(path), _Rtnl() as nl:
        hdr = _RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
        for payload in nl.dump(RTM_GETRULE, hdr):
            mark = _attrs(payload, _RTMSG.size).get(FRA_FWMARK)
            if mark is not None and struct.unpack("=I", mark[:4])[0] == DELIVERY_MARK:
                return True
    return False


def _ignore_exists(nl: _Rtnl, kind: int, body: bytes) -> None:
    try:
        nl.request(kind, NLM_F_CREATE | NLM_F_EXCL, body)
    except OSError as e:
        if e.errno != errno.EEXIST:
            raise
