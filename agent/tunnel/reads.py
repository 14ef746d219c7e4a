"""Where the agent's relay reads land: one set of arenas per event loop.

As ordinary asyncio.Protocols, HBONE's H2Conn and the app-socket side of a
bridge got each read as a new `bytes`.  Under uvloop that is a copy of every
byte read from an app socket (from the loop's own read buffer), and on the
TLS side a fresh 256 KiB object per record (malloc, then a realloc down to
the record: an mmap, an mremap and a munmap each time for small messages)
plus, when one socket read held several records, one more object joining
them (a copy of every received byte: 13 % of the receiving agent's CPU in
`tether bench profile` at 4 Gbit/s).  As BufferedProtocols they are asked
for a buffer (`get_buffer`), the kernel or OpenSSL writes into it, and the
bytes are handed on as read-only views of it, without a copy.

The buffers are arenas, anonymous mappings shared by every protocol on the
loop's thread (reads are sequential there) and reused for the life of the
process.  A view handed on may outlive the read (queued for a socket or the
HBONE peer, held for a stream not yet attached), so a byte is never handed
out twice while anything still refers to its arena: each `get_buffer` hands
out the current arena's unused tail, and an arena starts again from its
beginning only when no view of it is left (its reference count is back to
what the pool alone holds).  A pinned arena is left alone and another one
taken or made (up to POOL_MAX tracked: what waits for a slow reader), and
TRIM_DELAY after the pool grew past POOL_KEEP the free ones beyond it are
unmapped, so at rest the agent holds at most POOL_KEEP * ARENA_MAX whatever
its connection count.  What a
kept view may pin is bounded where views are kept: `h2conn.unpinned` copies
one smaller than a quarter of its arena (the bound of the old reads, each
its own object), for received payloads, a frame waiting for its end and
app bytes queued for the peer alike.
"""

from __future__ import annotations

import asyncio
import mmap
import sys
import threading
from typing import cast

PIN_RATIO = 4  # a kept view may hold alive at most this many times its size
ARENA_MIN = 16 * 1024  # small reads (messages) get an arena this large
ARENA_MAX = 256 * 1024  # the most the loop's TLS hands over per read
TAIL_MIN = 16 * 1024  # a pinned arena's tail shorter than this is not handed out
POOL_KEEP = 4  # arenas kept at rest (a bulk transfer to a fast reader has ~3 in use)
POOL_MAX = 64  # arenas tracked for reuse at once (16 MiB: what waits for a slow reader)
TRIM_DELAY = 2.0  # after the pool grew past POOL_KEEP, free arenas beyond it go


def _refs(pool: list[mmap.mmap], i: int) -> int:
    """sys.getrefcount of pool[i], always read through this one function so
    that the references the reading itself adds are the same every time."""
    return sys.getrefcount(pool[i])


# what _refs says of an arena that only its pool refers to
_FREE = _refs([mmap.mmap(-1, mmap.PAGESIZE)], 0)


class ReadArenas:
    """Receive buffers for the protocols of one thread (see the module
    docstring); not thread-safe: take them with `shared()`."""

    __slots__ = ("_i", "_last", "_off", "_pool", "_region", "_timer", "_timer_loop", "allocated")

    def __init__(self) -> None:
        self._pool: list[mmap.mmap] = []
        self._i = -1  # the arena being filled, an index into _pool
        self._off = 0  # where its unused tail starts
        self._region: memoryview | None = None  # handed out, not yet filled
        self._last: memoryview | None = None  # filled by a small read (copied out): free again
        self.allocated = 0  # arenas ever made (tests, stats)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def get_buffer(self, hint: int) -> memoryview:
        """A writable region for the next read: never empty, never a byte
        that a live view can still see.  `hint` is what the loop expects to
        write (uvloop: the encrypted bytes pending; asyncio's plain
        sockets: -1)."""
        last = self._last
        if last is not None:
            if hint <= len(last):
                # the last read was copied out and nothing else came since:
                # the same region again (messages: no bookkeeping per read)
                self._region = last
                return last
            self._last = last = None  # it refers to its arena: not before the count below
        want = ARENA_MAX if hint <= 0 else min(max(hint, ARENA_MIN), ARENA_MAX)
        pool = self._pool
        i = self._i
        if i >= 0:
            if _refs(pool, i) == _FREE and len(pool[i]) >= want:
                self._off = 0  # nothing refers to it: start again (cache-warm)
            elif len(pool[i]) - self._off < min(want, TAIL_MIN):
                i = self._take(want)
        else:
            i = self._take(want)
        self._i = i
        region = memoryview(pool[i])[self._off :]
        self._region = region
        return region

    def filled(self, nbytes: int) -> bytes | memoryview:
        """The `nbytes` the loop wrote into the last region: as a read-only
        view (whoever gets it cannot write into the arena) when they are at
        least 1/PIN_RATIO of the arena, else as bytes (the copy a kept
        payload that small gets anyway, see `h2conn.unpinned`), and the
        region is free again for the next read."""
        region = self._region
        if region is None or not 0 < nbytes <= len(region):
            raise ValueError(f"buffer_updated({nbytes}) without a region that large")
        self._region = None
        if nbytes * PIN_RATIO < len(cast(mmap.mmap, region.obj)):
            self._last = region  # no view of it left: the next read may take it again
            return region[:nbytes].tobytes()
        self._last = None
        self._off += nbytes
        return region[:nbytes].toreadonly()

    def _take(self, want: int) -> int:
        """The index of a free arena of at least `want` bytes, or of a new one."""
        self._off = 0
        pool = self._pool
        n = len(pool)
        for k in range(1, n + 1):  # oldest first: the one after the current
            j = (self._i + k) % n
            if _refs(pool, j) == _FREE and len(pool[j]) >= want:
                return j
        arena = mmap.mmap(-1, want)  # pages are touched (and resident) only as used
        self.allocated += 1
        if len(pool) < POOL_MAX:
            pool.append(arena)
            if len(pool) > POOL_KEEP:
                self._trim_later()
            return len(pool) - 1
        # full: replace a free (too small) arena, else stop tracking a pinned
        # one (its views keep it alive; it is unmapped when the last goes)
        for j in range(len(pool)):
            if _refs(pool, j) == _FREE:
                break
        else:
            j = (self._i + 1) % len(pool)
        pool[j] = arena
        return j

    def _trim_later(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (a test driving the arenas itself): trim() is public
            return
        if self._timer is not None and self._timer_loop is loop:
            return  # scheduled (one of a loop that has ended never fires: ignored)
        self._timer = loop.call_later(TRIM_DELAY, self.trim)
        self._timer_loop = loop

    def trim(self) -> None:
        """Unmap free arenas beyond POOL_KEEP (the current one stays); again
        later while pinned ones keep the pool above it."""
        self._timer = None
        self._last = self._region = None  # a timer: never inside a read
        pool = self._pool
        free = [_refs(pool, j) == _FREE for j in range(len(pool))]  # before any local ref
        keep: list[mmap.mmap] = []
        spare = POOL_KEEP - sum(1 for j in range(len(pool)) if j == self._i or not free[j])
        for j in range(len(pool)):
            if j == self._i or not free[j]:
                keep.append(pool[j])
            elif spare > 0:
                keep.append(pool[j])
                spare -= 1
        if self._i >= 0:
            self._i = next(k for k in range(len(keep)) if keep[k] is pool[self._i])
        self._pool = keep
        if len(keep) > POOL_KEEP:
            self._trim_later()

    @property
    def arenas(self) -> int:
        return len(self._pool)


_local = threading.local()


def shared() -> ReadArenas:
    """This thread's arenas (an event loop's protocols run on its thread)."""
    arenas: ReadArenas | None = getattr(_local, "arenas", None)
    if arenas is None:
        arenas = _local.arenas = ReadArenas()
    return arenas
