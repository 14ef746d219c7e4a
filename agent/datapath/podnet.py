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
import json
import os
import select
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

from agent import netns

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
# The worker exits after this long without a request (a burst of enrollments
# shares one worker; an agent at rest has none).
WORKER_IDLE_S = float(os.environ.get("TETHER_PODNET_IDLE", "5"))
WORKER_TIMEOUT_S = 60.0


def prepare(path: str) -> None:
    """Idempotently install the delivery routing in the netns at path."""
    _WORKER.call("prepare", path)


def unprepare(path: str) -> None:
    """Remove what prepare() installed; absent pieces are fine."""
    _WORKER.call("unprepare", path)


def installed(path: str) -> bool:
    """Whether the delivery rule is present (tests check the kernel, not us)."""
    return bool(_WORKER.call("installed", path))


class _Worker:
    """pyroute2 in a short-lived child process, not in the agent.

    pyroute2 is the project's netlink library, and importing it costs the
    agent about 11 MiB resident for good (it pulls in ndb, sqlite3, lzma and
    bz2), for a few rules per pod written at enrollment.  The child is
    started on the first request, answers requests one JSON line each over
    its stdin/stdout, and is closed (and reaped) after WORKER_IDLE_S without
    one; it exits by itself at EOF (the agent went) or after twice that.
    Every request is idempotent, so one that meets a worker just exiting is
    sent again to a new one.  A netlink error comes back as OSError with its
    errno, as the callers handle it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._idle: threading.Timer | None = None

    def call(self, op: str, path: str) -> Any:
        with self._lock:
            if self._idle is not None:
                self._idle.cancel()
            self._idle = threading.Timer(WORKER_IDLE_S, self.close)
            self._idle.daemon = True
            self._idle.start()
            for attempt in (1, 2):
                proc = self._running()
                assert proc.stdin is not None and proc.stdout is not None
                try:
                    proc.stdin.write(json.dumps({"op": op, "path": path}).encode() + b"\n")
                    proc.stdin.flush()
                    line = _read_line(proc.stdout, WORKER_TIMEOUT_S)
                except (BrokenPipeError, TimeoutError) as e:
                    self._stop(proc)
                    if attempt == 2 or isinstance(e, TimeoutError):
                        raise OSError(errno.EIO, f"podnet worker: {op} {path}: {e}") from e
                    continue
                if not line:  # it exited (idle) as the request went in
                    self._stop(proc)
                    if attempt == 2:
                        raise OSError(errno.EIO, f"podnet worker exited during {op} {path}")
                    continue
                reply = json.loads(line)
                if "error" in reply:
                    raise OSError(reply.get("errno") or errno.EIO, reply["error"])
                return reply.get("result")
        raise AssertionError("unreachable")

    def _running(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        if self._proc is not None:
            self._stop(self._proc)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "agent.datapath.podnet", str(2 * WORKER_IDLE_S)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        return self._proc

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        for f in (proc.stdin, proc.stdout):
            with contextlib.suppress(OSError):
                if f is not None:
                    f.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._proc is proc:
            self._proc = None

    def close(self) -> None:
        with self._lock:
            if self._proc is not None:
                self._stop(self._proc)


def _read_line(f: IO[bytes], timeout: float) -> bytes:
    r, _, _ = select.select([f], [], [], timeout)
    if not r:
        raise TimeoutError(f"no answer in {timeout:g} s")
    return f.readline()


_WORKER = _Worker()


def _serve(idle: float) -> int:
    """The worker's loop: one request per line on stdin, one answer per line."""
    ops = {"prepare": _prepare, "unprepare": _unprepare, "installed": _installed}
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        r, _, _ = select.select([stdin], [], [], idle)
        if not r:
            return 0  # idle: the agent starts another when it needs one
        line = stdin.readline()
        if not line:
            return 0  # the agent closed the pipe or exited
        reply: dict[str, Any]
        try:
            req = json.loads(line)
            reply = {"result": ops[req["op"]](req["path"])}
        except Exception as e:  # pyroute2 raises NetlinkError(code, ...)
            code = getattr(e, "code", None) or getattr(e, "errno", None)
            reply = {"error": f"{type(e).__name__}: {e}", "errno": code}
        stdout.write(json.dumps(reply).encode() + b"\n")
        stdout.flush()


def _prepare(path: str) -> None:
    from pyroute2 import IPRoute  # the worker's import only

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
    from pyroute2 import IPRoute

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
    from pyroute2 import IPRoute

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


if __name__ == "__main__":
    sys.exit(_serve(float(sys.argv[1]) if len(sys.argv) > 1 else WORKER_IDLE_S))
