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

import contextlib
import errno
import os
import socket
import sys
from pathlib import Path
from typing import Any

from agent import netns, workerproc

DELIVERY_MARK = 0x539
DELIVERY_TABLE = 133
RULE_PRIORITY = 32000  # before main (32766)
# In a container /proc/sys is read-only; the DaemonSet mounts the host's
# /proc writable at TETHER_HOST_PROC.  Net sysctls follow the writing
# thread's netns whichever procfs mount is used.
_PROC = os.environ.get("TETHER_HOST_PROC", "/proc")
SYSCTLS = (
    f"{_PROC}/sys/net/ipv4/tcp_fwmark_accept",
    f"{_PROC}/sys/net/ipv4/fwmark_reflect",
    f"{_PROC}/sys/net/ipv6/fwmark_reflect",
)
OPS = ("prepare", "unprepare", "installed")
MODULE = "agent.datapath.podnet"

# The netlink work runs in a worker process (agent/workerproc.py), never in
# the agent's: pyroute2 costs ~11 MiB resident once imported (its package
# pulls in ndb, sqlite3 and more), for four messages per pod.  The pod
# reconcile awaits it (`Worker`), so the worker's start never stalls a
# relay; `run_once` serves callers off the event loop (`tether cleanup`).


class RoutingError(OSError):
    """The delivery routing could not be installed or removed in a pod's netns."""


def _request(op: str, path: str) -> dict[str, Any]:
    if op not in OPS:
        raise ValueError(f"unknown podnet op {op!r}")
    return {"op": op, "netns": path}


def _result(op: str, path: str, reply: dict[str, Any]) -> bool:
    if not reply.get("ok"):
        raise RoutingError(errno.EIO, f"{op} in {path}: {reply.get('error', 'failed')}")
    return bool(reply.get("installed", True))


def run_once(op: str, path: str, timeout: float = workerproc.TIMEOUT_S) -> bool:
    """`op` on the netns at `path` in a one-shot worker process, blocking;
    True/False for "installed".  Raises RoutingError naming the netns."""
    req = _request(op, path)
    try:
        reply = workerproc.run_once(MODULE, req, timeout)
    except workerproc.WorkerError as e:
        raise RoutingError(e.errno, f"{op} in {path}: {e.strerror}") from e
    return _result(op, path, reply)


class Worker(workerproc.Worker):
    """The netlink worker as the agent's event loop drives it: requests go
    one at a time, in the order they were made (unprepare before a later
    prepare of the same netns)."""

    def __init__(
        self,
        idle: float = workerproc.IDLE_S,
        timeout: float = workerproc.TIMEOUT_S,
        command: list[str] | None = None,
    ) -> None:
        super().__init__(MODULE, idle, timeout, command)

    async def call(self, op: str, path: str) -> bool:  # type: ignore[override]
        """`op` on the netns at `path`; raises RoutingError."""
        req = _request(op, path)
        try:
            reply = await super().call(req)
        except workerproc.WorkerError as e:
            raise RoutingError(e.errno, f"{op} in {path}: {e.strerror}") from e
        return _result(op, path, reply)


# -- the worker process ------------------------------------------------------


def _prepare(path: str) -> None:
    from pyroute2 import IPRoute  # the worker process only

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
    from pyroute2 import IPRoute  # the worker process only

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
    from pyroute2 import IPRoute  # the worker process only

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


def _handle(req: dict[str, Any]) -> dict[str, Any]:
    op, path = req.get("op"), req.get("netns")
    if op not in OPS:
        return {"ok": False, "error": f"unknown op {op!r}"}
    if not isinstance(path, str):
        return {"ok": False, "error": "bad request: no netns"}
    if op == "installed":
        return {"ok": True, "installed": _installed(path)}
    (_prepare if op == "prepare" else _unprepare)(path)
    return {"ok": True}


if __name__ == "__main__":
    if sys.argv[1:] != ["serve"]:
        sys.exit(f"usage: python -m {MODULE} serve (requests on stdin, see agent/workerproc.py)")
    sys.exit(workerproc.serve(_handle))
