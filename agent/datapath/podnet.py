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
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from pyroute2 import IPRoute

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


def _prepare(path: str) -> None:
    with netns.entered(path):
        for knob in SYSCTLS:
            Path(knob).write_text("1\n")
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")[0]
            for family, dst in ((socket.AF_INET, "0.0.0.0/0"), (socket.AF_INET6, "::/0")):
                _ignore_exists(
                    lambda f=family: ipr.rule(
                        "add",
                        family=f,
                        fwmark=DELIVERY_MARK,
                        table=DELIVERY_TABLE,
                        priority=RULE_PRIORITY,
                    )
                )
                # scope host, as `ip route add local` sets it: IPv4 refuses a
                # local route of universe scope with EINVAL.
                _ignore_exists(
                    lambda f=family, d=dst: ipr.route(
                        "add",
                        family=f,
                        dst=d,
                        type="local",
                        oif=lo,
                        table=DELIVERY_TABLE,
                        scope=254,
                    )
                )


def _unprepare(path: str) -> None:
    with netns.entered(path), IPRoute() as ipr:
        for family, dst in ((socket.AF_INET, "0.0.0.0/0"), (socket.AF_INET6, "::/0")):
            with contextlib.suppress(Exception):
                ipr.rule(
                    "del",
                    family=family,
                    fwmark=DELIVERY_MARK,
                    table=DELIVERY_TABLE,
                    priority=RULE_PRIORITY,
                )
            with contextlib.suppress(Exception):
                ipr.route("del", family=family, dst=dst, type="local", table=DELIVERY_TABLE)
        for knob in SYSCTLS:
            with contextlib.suppress(OSError):
                Path(knob).write_text("0\n")


def _installed(path: str) -> bool:
    with netns.entered(path), IPRoute() as ipr:
        for r in ipr.get_rules(family=socket.AF_INET):
            if r.get("fwmark") == DELIVERY_MARK or r.get_attr("FRA_FWMARK") == DELIVERY_MARK:
                return True
    return False


def _ignore_exists(fn: object) -> None:
    try:
        fn()  # type: ignore[operator]
    except Exception as e:  # pyroute2 raises NetlinkError(code, ...)
        if getattr(e, "code", None) != errno.EEXIST:
            raise
