"""More than one core for many connections: extra event loops on threads.

One event loop runs Python on one core at a time.  CPython's interpreter
lock is let go inside OpenSSL's record work (`SSL_read`/`SSL_write`:
AES-GCM and its copies) and around socket syscalls, which are most of a
relay's cost per byte (README, "Benchmarks": syscalls 29-36 %, copies 28 %,
AES-GCM 21-22 % of each agent's CPU per GB).  So `agent.tunnelLoops: N`
(or `TETHER_TUNNEL_LOOPS=N`) runs N-1 more loops, each on its own thread.
The main loop accepts on every pod's listeners and places each connection
on a loop (`PodProxy._place`: the fewest connections in hand, or for 15008
the fewest HBONE connections; a connection at a time never leaves the main
loop, so no other thread is woken for it).  A connection stays on its loop
for its whole life, with everything it owns (its relay, its HBONE
connection: each loop has its own pool).  One stream runs on one loop and
the others sleep in `epoll_wait` without the interpreter lock, so a single
stream is not slowed.

What the loops share, and how it stays correct across threads:

- the state view: immutable, swapped whole (`ProxyState`), read with one
  attribute load; authorization decisions are cached on the view they were
  made with (`context.authorize`), never across views;
- the connection table (`ConnTable`: single dict operations) and the
  inbound admission counts (`HboneLimits`, under a lock);
- certificates: the manager lives on the main loop; another loop asks it
  through `on_main` (a TLS context per new HBONE connection, not per stream);
- a connection's teardown (`Connection.kill` after a policy change), its
  freeze for a handoff and the drain at shutdown run on the connection's own
  loop (`call_on`, `run_on`): nothing touches a transport from another thread.

An extra loop never blocks on the main thread (it awaits it), so the main
thread may wait on an extra loop without a deadlock.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from agent.eventloop import loop_factory
from agent.model.settings import MAX_TUNNEL_LOOPS

log = logging.getLogger(__name__)

T = TypeVar("T")
START_TIMEOUT = 10.0  # a loop thread that is not running by then is a bug
STOP_TIMEOUT = 10.0


def configured(setting: int) -> int:
    """The number of loops: TETHER_TUNNEL_LOOPS if set (benchmarks, one-off
    runs), else the agent setting.  A bad value is reported and ignored."""
    raw = os.environ.get("TETHER_TUNNEL_LOOPS", "").strip()
    if not raw:
        return setting
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_TUNNEL_LOOPS:
        log.warning(
            "TETHER_TUNNEL_LOOPS=%r is not a number from 1 to %d: using %d",
            raw,
            MAX_TUNNEL_LOOPS,
            setting,
        )
        return setting
    return n


class LoopThread:
    """One extra event loop, running on its own thread until `stop()`."""

    def __init__(self, index: int, factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
        self.index = index
        self._factory = factory
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._failed: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"tunnel-loop-{index}", daemon=True)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "LoopThread used before start()"
        return self._loop

    def start(self) -> None:
        self.thread.start()
        if not self._started.wait(START_TIMEOUT) or self._loop is None:
            raise RuntimeError(f"tunnel loop {self.index} did not start: {self._failed}")

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=self._factory) as runner:
                runner.run(self._main())
        except BaseException as e:  # the thread's end: say why, never silently
            self._failed = e
            self._started.set()
            log.exception("tunnel loop %d ended with an error", self.index)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._started.set()
        await self._stopping.wait()
        # Runner.close() then cancels what is left and waits for it

    def stop(self) -> None:
        """End the loop (its remaining tasks are cancelled) and join the thread."""
        if self._loop is not None and self._stopping is not None and self.thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
        self.thread.join(STOP_TIMEOUT)
        if self.thread.is_alive():
            log.error("tunnel loop %d did not stop within %ss", self.index, STOP_TIMEOUT)


class Loops:
    """The main loop and the extra ones; the main loop is index 0."""

    def __init__(self, count: int, factory: Callable[[], asyncio.AbstractEventLoop] | None = None):
        if not 1 <= count <= MAX_TUNNEL_LOOPS:
            raise ValueError(f"tunnel loops: {count} is not from 1 to {MAX_TUNNEL_LOOPS}")
        self.count = count
        self._factory = factory or loop_factory()[1]
        self.main: asyncio.AbstractEventLoop | None = None
        self.extra: list[LoopThread] = []

    def start(self) -> None:
        """Start the extra loops (call on the main loop)."""
        self.main = asyncio.get_running_loop()
        for i in range(1, self.count):
            lt = LoopThread(i, self._factory)
            lt.start()
            self.extra.append(lt)
        if self.extra:
            log.info("tunnel: %d event loops (%d extra threads)", self.count, len(self.extra))

    def all(self) -> list[asyncio.AbstractEventLoop]:
        assert self.main is not None, "Loops used before start()"
        return [self.main, *(lt.loop for lt in self.extra)]

    def index_of(self, loop: asyncio.AbstractEventLoop | None) -> int | None:
        for i, lp in enumerate(self.all() if self.main is not None else []):
            if lp is loop:
                return i
        return None

    def on_main(
        self, fn: Callable[..., Coroutine[Any, Any, T]]
    ) -> Callable[..., Coroutine[Any, Any, T]]:
        """`fn` (a coroutine function of the main loop's objects) callable
        from any loop: on another one it runs on the main loop and is awaited."""

        async def call(*args: Any) -> T:
            main = self.main
            if main is None or asyncio.get_running_loop() is main:
                return await fn(*args)
            return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(fn(*args), main))

        return call

    async def each(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> list[T]:
        """Run `fn()` on every loop at once (each its own call), await all."""
        here = asyncio.get_running_loop()
        waits: list[Awaitable[T]] = []
        for lp in self.all():
            if lp.is_closed():  # its thread ended (logged there): nothing of it is left
                continue
            if lp is here:
                waits.append(fn())
            else:
                waits.append(asyncio.wrap_future(asyncio.run_coroutine_threadsafe(fn(), lp)))
        return list(await asyncio.gather(*waits))

    def stop(self) -> None:
        for lt in self.extra:
            lt.stop()
        self.extra.clear()


def call_on(loop: asyncio.AbstractEventLoop | None, fn: Callable[[], Any]) -> None:
    """Call `fn` on `loop`'s thread: now if that is this thread's loop (or
    there is no loop to go to), else as soon as that loop gets to it."""
    try:
        here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        here = None
    if loop is None or loop is here:
        fn()
    else:
        with contextlib.suppress(RuntimeError):  # that loop has ended: nothing left to call
            loop.call_soon_threadsafe(fn)


async def run_on(loop: asyncio.AbstractEventLoop | None, coro: Coroutine[Any, Any, T]) -> T:
    """Await `coro` on `loop` (this loop if it is this one or None)."""
    if loop is None or loop is asyncio.get_running_loop():
        return await coro
    fut: concurrent.futures.Future[T] = asyncio.run_coroutine_threadsafe(coro, loop)
    return await asyncio.wrap_future(fut)
