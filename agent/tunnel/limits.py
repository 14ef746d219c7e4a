"""Admission limits for the inbound HBONE listeners (15008): what one source,
one pod and the whole agent may hold open, how long a handshake or an idle
connection may sit, and how fast a peer may reset streams.

Each listener faces the network, so each bound answers an attack seen on
three simulated nodes: 1,500 connections that never sent a byte held open
with no handshake deadline; 20,000 HEADERS+RST_STREAM pairs on one
connection (CVE-2023-44487, "rapid reset") with no GOAWAY.  The numbers are
Envoy's and nghttp2's orders of magnitude; each is configurable with an
environment variable (TETHER_HBONE_*), read once at import.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import ctypes.util
import gc
import logging
import os
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def _env(name: str, default: float) -> float:
    raw = os.environ.get(f"TETHER_HBONE_{name}")
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        log.warning("TETHER_HBONE_%s=%r is not a number; using %s", name, raw, default)
        return default


HANDSHAKE_TIMEOUT = _env("HANDSHAKE_TIMEOUT", 5.0)  # accept to TLS finished
SHUTDOWN_TIMEOUT = _env("TLS_SHUTDOWN_TIMEOUT", 5.0)  # close_notify sent to the peer's reply
# server side: no stream open for this long.  Longer than the client pools'
# 300 s, so the client normally closes first (a race is harmless anyway: the
# GOAWAY's last id tells the client a new stream was not processed).
IDLE_TIMEOUT = _env("IDLE_TIMEOUT", 360.0)
PREMATURE_RESET = 1.0  # a stream reset younger than this (s) spends the reset budget
MAX_PER_SOURCE = int(_env("MAX_CONNS_PER_SOURCE", 512))  # per source IP, per pod
MAX_PER_POD = int(_env("MAX_CONNS_PER_POD", 4096))  # per pod listener (4 and 6)
MAX_PER_AGENT = int(_env("MAX_CONNS", 16384))  # every pod of the agent
RESET_BURST = _env("RESET_BURST", 200.0)  # stream resets a connection may make at once,
RESET_RATE = _env("RESET_RATE", 50.0)  # and per second after that (nghttp2: 1000, 33)
STARTUP_TRIM_S = 15.0  # after ready: the start's transient allocations are freed by then
LOG_EVERY = 10.0  # seconds between two "limited" log lines of one reason

# Called with the reason each time a limit turns something away (metrics).
on_limited: list[Callable[[str], None]] = []
_last_log: dict[str, float] = {}
_suppressed: collections.Counter[str] = collections.Counter()


def limited(reason: str, message: str, *args: object) -> None:
    """Count a limit being hit; log it at most once per LOG_EVERY per reason
    (a flood must not become a log flood), saying how many were not logged."""
    for cb in on_limited:
        cb(reason)
    reclaim_soon()
    now = time.monotonic()
    if now - _last_log.get(reason, -LOG_EVERY) < LOG_EVERY:
        _suppressed[reason] += 1
        return
    _last_log[reason] = now
    more = _suppressed.pop(reason, 0)
    log.warning(
        "HBONE limit %s: "
        + message
        + (f" (and {more} more since the last report)" if more else ""),
        reason,
        *args,
    )


_libc: ctypes.CDLL | None = None
with contextlib.suppress(OSError):
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
RECLAIM_DELAY = 2.0
_reclaim: asyncio.TimerHandle | None = None


def reclaim_soon() -> None:
    """After an attack, give its memory back to the system: glibc keeps
    freed heap pages (an abusive connection's tens of thousands of stream
    objects) mapped until malloc_trim.  Once per RECLAIM_DELAY at most, and
    only when a limit fired: never on the data path."""
    global _reclaim
    if _reclaim is not None:
        return
    with contextlib.suppress(RuntimeError):
        _reclaim = asyncio.get_running_loop().call_later(RECLAIM_DELAY, _do_reclaim)


def _do_reclaim() -> None:
    global _reclaim
    _reclaim = None
    trim()


def trim() -> None:
    """Collect garbage, then have glibc return free heap pages to the system."""
    gc.collect()
    if _libc is not None and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)


# glibc's malloc, left to itself, returns the top of the heap to the system
# whenever more than 128 KiB of it is free (M_TRIM_THRESHOLD), and takes
# buffers above a threshold that drifts between 128 KiB and 32 MiB from
# mmap.  A relay's buffers are exactly that size (256 KiB reads, DATA frames
# up to 1 MiB, a bytes object per read): each one freed gave its pages back
# (brk), the next one faulted them in again, and the profile of a sending
# agent counted those faults in its memcpy (README, "The C TLS path").
# These two fixed thresholds keep such buffers on the heap and up to
# MALLOC_TRIM of free heap mapped; trim() still returns everything.
MALLOC_MMAP = 4 << 20
MALLOC_TRIM = 16 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # malloc.h
malloc_state = "default (not tuned)"  # what tune_malloc() put in force (/config_dump)


def tune_malloc() -> str:
    """Set glibc's mmap and trim thresholds for the relay's buffer sizes
    (unless TETHER_MALLOC=default).  Returns what is in force, for the log:
    "tuned (...)", "default (TETHER_MALLOC=default)" or "default (why)"."""
    global malloc_state
    mallopt = getattr(_libc, "mallopt", None)
    if os.environ.get("TETHER_MALLOC", "").strip().lower() == "default":
        malloc_state = "default (TETHER_MALLOC=default)"
    elif mallopt is None:
        malloc_state = "default (no glibc mallopt)"
    elif not (mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP) and mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM)):
        malloc_state = "default (mallopt refused)"
    else:
        malloc_state = (
            f"tuned (mmap above {MALLOC_MMAP >> 20} MiB, trim above {MALLOC_TRIM >> 20} MiB)"
        )
    return malloc_state


def anon_mib() -> float:
    """This process's resident anonymous memory (RssAnon), MiB; 0 if unknown."""
    try:
        with open("/proc/self/status") as f:
            for ln in f:
                if ln.startswith("RssAnon:"):
                    return int(ln.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Admission:
    """Counts open connections per source IP and in total; `admit` says
    whether one more may be taken (and takes it), `release` gives it back.
    A parent (the agent's) must admit too: a pod's limit cannot exceed it."""

    def __init__(
        self, per_source: int, total: int, name: str, parent: Admission | None = None
    ) -> None:
        self.per_source = per_source
        self.total = total
        self.name = name
        self.parent = parent
        self.by_source: collections.Counter[str] = collections.Counter()
        self.count = 0

    def admit(self, source: str) -> str | None:
        """None if admitted (then release it later), else the reason refused."""
        if self.by_source[source] >= self.per_source:  # Counter: reading adds no key
            return "per_source"
        if self.count >= self.total:
            return "per_pod" if self.parent is not None else "per_agent"
        if self.parent is not None:
            refused = self.parent.admit(source)
            if refused is not None:
                return refused
        self.by_source[source] += 1
        self.count += 1
        return None

    def release(self, source: str) -> None:
        if self.by_source[source] <= 1:
            self.by_source.pop(source, None)
        else:
            self.by_source[source] -= 1
        self.count = max(0, self.count - 1)
        if self.parent is not None:
            self.parent.release(source)


class HboneLimits:
    """The agent's admission state: one Admission per pod under one for the
    agent.  Every loop's listeners admit here (agent/tunnel/loops.py), so a
    lock keeps the counts exact: a lost update would let a source past its
    limit, or shut it out for good."""

    def __init__(
        self,
        per_source: int = MAX_PER_SOURCE,
        per_pod: int = MAX_PER_POD,
        per_agent: int = MAX_PER_AGENT,
    ) -> None:
        self.agent = Admission(per_agent, per_agent, "agent")
        self.per_source = per_source
        self.per_pod = per_pod
        self.pods: dict[str, Admission] = {}
        self._lock = threading.Lock()

    def pod(self, key: str) -> Admission:
        a = self.pods.get(key)
        if a is None:
            a = self.pods[key] = Admission(self.per_source, self.per_pod, key, self.agent)
        return a

    def admit(self, pod: str, source: str) -> bool:
        """Take a slot for a connection from `source` to `pod`'s 15008, or
        count, log (rate-limited) and refuse it."""
        with self._lock:
            refused = self.pod(pod).admit(source)
        if refused is None:
            return True
        limited(refused, "connection from %s to %s refused", source, pod)
        return False

    def release(self, pod: str, source: str) -> None:
        with self._lock:
            a = self.pods.get(pod)
            if a is not None:
                a.release(source)
                if not a.count:
                    del self.pods[pod]


class ResetBudget:
    """Token bucket of stream resets for one connection: `burst` at once,
    refilled at `rate` per second.  `spend` is False once it is empty: the
    peer resets faster than any honest client (a rapid-reset attack), and
    the connection gets GOAWAY(ENHANCE_YOUR_CALM), as Envoy, nghttp2 and Go
    do for CVE-2023-44487."""

    def __init__(self, burst: float = RESET_BURST, rate: float = RESET_RATE) -> None:
        self.burst = burst
        self.rate = rate
        self.tokens = burst
        self.stamp = time.monotonic()

    def spend(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= 1
        return self.tokens >= 0
