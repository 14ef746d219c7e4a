"""Where the event loop's TLS decrypts an HBONE connection's bytes.

As an ordinary asyncio.Protocol, H2Conn got each batch of decrypted bytes as
a new `bytes`: uvloop's SSLProtocol asks OpenSSL for up to 256 KiB into a
fresh 256 KiB object per record (malloc, then a realloc down to the record:
an mmap, an mremap and a munmap each time for small messages) and, when one
socket read held several records, joined them into one more object (a copy
of every received byte: 13 % of the receiving agent's CPU in `tether bench
profile` at 4 Gbit/s).  As a BufferedProtocol it is asked for a buffer
(`get_buffer`) and OpenSSL decrypts into it directly; the bytes are then
handed to the frame parser as views of that buffer, without a copy.

The buffers are arenas, anonymous mappings reused for as long as the
connection lives.  A DATA payload handed on is a view of its arena and may
outlive the read (queued for the app socket, or held for a stream not yet
attached), so a region is never written twice while anything still refers to
its arena: each `get_buffer` hands out the arena's unused tail, and an arena
starts again from its beginning only when no view of it is left (its
reference count is back to what the pool alone holds).  A pinned arena is
left alone and another one taken or made, at most POOL_MAX kept per
connection.  What a kept view may pin is bounded where payloads are kept:
`h2conn._unpinned` copies one smaller than a quarter of its arena (the same
bound as when each read was its own object).
"""

from __future__ import annotations

import mmap
import sys

ARENA_MIN = 16 * 1024  # small reads (messages) get an arena this large
ARENA_MAX = 256 * 1024  # the most the loop's TLS hands over per read
TAIL_MIN = 16 * 1024  # a pinned arena's tail shorter than this is not handed out
POOL_MAX = 4  # arenas a connection keeps for reuse (bulk: ~3 in use at once)


def _refs(pool: list[mmap.mmap], i: int) -> int:
    """sys.getrefcount of pool[i], always read through this one function so
    that the references the reading itself adds are the same every time."""
    return sys.getrefcount(pool[i])


# what _refs says of an arena that only its pool refers to
_FREE = _refs([mmap.mmap(-1, mmap.PAGESIZE)], 0)


class ReadArenas:
    """One connection's receive buffers (see the module docstring)."""

    __slots__ = ("_i", "_off", "_pool", "_region", "allocated")

    def __init__(self) -> None:
        self._pool: list[mmap.mmap] = []
        self._i = -1  # the arena being filled, an index into _pool
        self._off = 0  # where its unused tail starts
        self._region: memoryview | None = None  # handed out, not yet filled
        self.allocated = 0  # arenas ever made (tests, stats)

    def get_buffer(self, hint: int) -> memoryview:
        """A writable region for the next read: never empty, never a byte
        that a live view can still see.  `hint` is what the loop expects to
        write (uvloop: the encrypted bytes pending; asyncio's plain
        sockets: -1)."""
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

    def filled(self, nbytes: int) -> memoryview:
        """The `nbytes` the loop wrote into the last region, as a read-only
        view (whoever gets a payload cannot write into the arena)."""
        region = self._region
        if region is None or not 0 < nbytes <= len(region):
            raise ValueError(f"buffer_updated({nbytes}) without a region that large")
        self._region = None
        self._off += nbytes
        return region[:nbytes].toreadonly()

    def trim(self) -> None:
        """Unmap every arena nothing refers to (an idle connection keeps
        none).  Called from a timer, never inside the loop's read, so a
        region handed out and not filled (the read found no whole record)
        is not in use."""
        self._region = None
        pool = self._pool
        self._pool = [pool[j] for j in range(len(pool)) if _refs(pool, j) > _FREE]
        self._i = -1  # the next read takes (or makes) one

    def _take(self, want: int) -> int:
        """The index of a free arena of at least `want` bytes, or of a new one."""
        self._off = 0
        pool = self._pool
        for j in range(len(pool)):
            if _refs(pool, j) == _FREE and len(pool[j]) >= want:
                return j
        arena = mmap.mmap(-1, want)  # pages are touched (and resident) only as used
        self.allocated += 1
        if len(pool) < POOL_MAX:
            pool.append(arena)
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

    @property
    def arenas(self) -> int:
        return len(self._pool)
