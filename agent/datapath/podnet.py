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

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import agent
from agent import netns

log = logging.getLogger(__name__)

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

# The netlink work runs in a worker process, never in the agent's: pyroute2
# costs ~11 MiB resident once imported (its package pulls in ndb, sqlite3
# and more), for four messages per pod.  The agent starts the worker when a
# burst of enrollments begins (`Worker`, awaited by the pod reconcile, so
# the worker's start never stalls a relay) and lets it exit once idle; the
# one-shot form (`run_once`) serves callers off the event loop (`tether
# cleanup`).
WORKER_IDLE_S = 5.0  # the worker exits after this long without a request
WORKER_TIMEOUT_S = 30.0  # per request (a netns being torn down can hold netlink)


class RoutingError(OSError):
    """The delivery routing could not be installed or removed in a pod's netns."""


def _command(*args: str) -> list[str]:
    """This interpreter running this tree's podnet module: -P keeps the
    working directory off sys.path, PYTHONPATH (see _env) puts this tree
    first, so the worker runs the agent's own code, whatever the cwd."""
    return [sys.executable, "-P", "-m", "agent.datapath.podnet", *args]


def _env() -> dict[str, str]:
    root = str(Path(agent.__file__).resolve().parent.parent)
    old = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + old if old else "")}


def run_once(op: str, path: str, timeout: float = WORKER_TIMEOUT_S) -> bool:
    """`op` on the netns at `path` in a one-shot worker process, blocking;
    True/False for "installed".  Raises RoutingError naming the netns."""
    if op not in OPS:
        raise ValueError(f"unknown podnet op {op!r}")
    try:
        out = subprocess.run(
            _command(op, path),
            env=_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise RoutingError(errno.ETIMEDOUT, f"{op} in {path}: no answer in {timeout:g} s") from e
    try:
        reply = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = out.stderr.strip().splitlines()[-1:] or ["no answer"]
        raise RoutingError(errno.EIO, f"{op} in {path}: worker failed: {tail[0]}") from None
    return _reply(op, path, reply)


def _reply(op: str, path: str, reply: Any) -> bool:
    if not isinstance(reply, dict) or not reply.get("ok"):
        reply = reply if isinstance(reply, dict) else {"error": f"answer {reply!r}"}
        raise RoutingError(errno.EIO, f"{op} in {path}: {reply.get('error', 'failed')}")
    return bool(reply.get("installed", True))


class Worker:
    """The netlink worker as the agent's event loop drives it: requests go
    one at a time, in the order they were made (unprepare before a later
    prepare of the same netns), to one child process that is started on
    demand and exits WORKER_IDLE_S after its last request."""

    def __init__(
        self,
        idle: float = WORKER_IDLE_S,
        timeout: float = WORKER_TIMEOUT_S,
        command: list[str] | None = None,
    ) -> None:
        self.idle = idle
        self.timeout = timeout
        self.command = command or _command("serve")
        self.started = 0  # worker processes started (tests, `tether status`)
        self._proc: asyncio.subprocess.Process | None = None
        self._ending: list[asyncio.subprocess.Process] = []  # retired or killed, not yet reaped
        self._lock = asyncio.Lock()
        self._idle_timer: asyncio.TimerHandle | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def call(self, op: str, path: str) -> bool:
        """`op` on the netns at `path`; raises RoutingError (the worker is
        then stopped, the next call starts a fresh one)."""
        if op not in OPS:
            raise ValueError(f"unknown podnet op {op!r}")
        async with self._lock:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            try:
                proc = await self._process()
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(json.dumps({"op": op, "netns": path}).encode() + b"\n")
                await proc.stdin.drain()
                line = await asyncio.wait_for(proc.stdout.readline(), self.timeout)
                if not line:
                    raise EOFError("worker exited (see its log)")
                reply = json.loads(line)  # anything else: out of step, never reuse it
            except (OSError, TimeoutError, EOFError, ValueError) as e:
                self._kill()
                why = f"no answer in {self.timeout:g} s" if isinstance(e, TimeoutError) else str(e)
                raise RoutingError(errno.EIO, f"{op} in {path}: worker failed: {why}") from e
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(self.idle, self._retire)
            return _reply(op, path, reply)

    async def _process(self) -> asyncio.subprocess.Process:
        self._ending = [p for p in self._ending if p.returncode is None]
        if self._proc is None or self._proc.returncode is not None:
            self._proc = await asyncio.create_subprocess_exec(
                *self.command,
                env=_env(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            self.started += 1
            log.debug("podnet worker started (pid %d)", self._proc.pid)
        return self._proc

    def _retire(self) -> None:
        """Idle: close the worker's stdin, it exits on EOF (reaped by asyncio)."""
        self._idle_timer = None
        proc = self._proc
        if proc is not None and proc.stdin is not None and not self._lock.locked():
            proc.stdin.close()
            self._ending.append(proc)
            self._proc = None

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            self._ending.append(proc)
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()

    def close(self) -> None:
        """Let the worker go (it exits on EOF); `aclose` also waits for it."""
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None
        proc, self._proc = self._proc, None
        if proc is not None:
            self._ending.append(proc)
            if proc.stdin is not None:
                proc.stdin.close()

    async def aclose(self) -> None:
        self.close()
        ending, self._ending = self._ending, []
        for proc in ending:
            try:
                await asyncio.wait_for(proc.wait(), 5.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


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


def _serve_one(op: str, path: str) -> dict[str, Any]:
    try:
        if op == "prepare":
            _prepare(path)
        elif op == "unprepare":
            _unprepare(path)
        elif op == "installed":
            return {"ok": True, "installed": _installed(path)}
        else:
            return {"ok": False, "error": f"unknown op {op!r}"}
    except Exception as e:  # one pod's failure is its answer, never the worker's end
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return {"ok": True}


def main(argv: list[str]) -> int:
    """`serve`: a request per stdin line ({"op", "netns"}), an answer per
    stdout line, until EOF; `OP PATH`: one request, answered on stdout."""
    # Answers go to the original stdout; anything else that writes there (a
    # library's print) goes to stderr, so the answers stay one per request.
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    if argv[:1] == ["serve"]:
        for line in sys.stdin:
            try:
                req = json.loads(line)
                reply = _serve_one(str(req["op"]), str(req["netns"]))
            except (ValueError, KeyError, TypeError) as e:
                reply = {"ok": False, "error": f"bad request: {e}"}
            out.write(json.dumps(reply) + "\n")
            out.flush()
        return 0
    if len(argv) == 2 and argv[0] in OPS:
        reply = _serve_one(argv[0], argv[1])
        out.write(json.dumps(reply) + "\n")
        out.flush()
        return 0 if reply["ok"] else 1
    ops = "|".join(OPS)
    print(f"usage: python -m agent.datapath.podnet serve | {{{ops}}} NETNS", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
