"""Short-lived worker processes for work whose libraries the agent should not
keep resident: a JSON request per line on the worker's stdin, a JSON answer
per line on its stdout.

The agent's event loop drives a worker through `Worker`: requests go one at
a time, in the order they were made, to one child process that is started
on demand (`python -P -m MODULE serve`, this interpreter and this tree's
code) and exits `idle` seconds after its last request.  A worker that hangs,
dies or answers out of step is killed and the request fails with
WorkerError naming it; the next request starts a fresh one.  `run_once` is
the blocking form for callers off the event loop.

The worker side is `serve(handle)`: it answers each request with
`handle(request)`, and one request's failure is that request's answer,
never the worker's end.  Used by agent/datapath/podnet.py (pyroute2) and
agent/identity/issuer.py (cryptography).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

IDLE_S = 5.0  # a worker exits after this long without a request
TIMEOUT_S = 30.0  # per request

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class WorkerError(OSError):
    """A worker could not answer a request: it hung, died or answered out of step."""


def command(module: str, *args: str) -> list[str]:
    """This interpreter running this tree's `module`: -P keeps the working
    directory off sys.path, PYTHONPATH (see env) puts this tree first, so
    the worker runs the agent's own code, whatever the cwd."""
    return [sys.executable, "-P", "-m", module, *args]


def env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parent.parent)
    old = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + old if old else "")}


def run_once(module: str, request: dict[str, Any], timeout: float = TIMEOUT_S) -> dict[str, Any]:
    """`request` answered by a one-shot worker (`module serve`), blocking."""
    try:
        out = subprocess.run(
            command(module, "serve"),
            env=env(),
            input=json.dumps(request) + "\n",
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise WorkerError(errno.ETIMEDOUT, f"worker failed: no answer in {timeout:g} s") from e
    try:
        reply = json.loads(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = out.stderr.strip().splitlines()[-1:] or ["no answer"]
        raise WorkerError(errno.EIO, f"worker failed: {tail[0]}") from None
    if not isinstance(reply, dict):
        raise WorkerError(errno.EIO, f"worker failed: it answered {reply!r}")
    return reply


class Worker:
    """One worker process as the agent's event loop drives it (see module doc)."""

    def __init__(
        self,
        module: str,
        idle: float = IDLE_S,
        timeout: float = TIMEOUT_S,
        argv: list[str] | None = None,
    ) -> None:
        self.module = module
        self.idle = idle
        self.timeout = timeout
        self.argv = argv or command(module, "serve")
        self.started = 0  # worker processes started
        self._proc: asyncio.subprocess.Process | None = None
        self._ending: list[asyncio.subprocess.Process] = []  # retired or killed, not yet reaped
        self._lock = asyncio.Lock()
        self._idle_timer: asyncio.TimerHandle | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def call(self, request: dict[str, Any]) -> dict[str, Any]:
        """The worker's answer to `request`; WorkerError if there is none
        (the worker is then stopped, the next call starts a fresh one)."""
        async with self._lock:
            if self._idle_timer is not None:
                self._idle_timer.cancel()
                self._idle_timer = None
            try:
                proc = await self._process()
                assert proc.stdin is not None and proc.stdout is not None
                proc.stdin.write(json.dumps(request).encode() + b"\n")
                await proc.stdin.drain()
                line = await asyncio.wait_for(proc.stdout.readline(), self.timeout)
                if not line:
                    raise EOFError("worker exited (see its log)")
                reply = json.loads(line)  # anything else: out of step, never reuse it
                if not isinstance(reply, dict):
                    raise ValueError(f"worker answered {reply!r}")
            except (OSError, TimeoutError, EOFError, ValueError) as e:
                self._kill()
                why = f"no answer in {self.timeout:g} s" if isinstance(e, TimeoutError) else str(e)
                raise WorkerError(errno.EIO, f"worker failed: {why}") from e
            loop = asyncio.get_running_loop()
            self._idle_timer = loop.call_later(self.idle, self._retire)
            return reply

    async def _process(self) -> asyncio.subprocess.Process:
        self._ending = [p for p in self._ending if p.returncode is None]
        if self._proc is None or self._proc.returncode is not None:
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv,
                env=env(),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
            )
            self.started += 1
            log.debug("%s worker started (pid %d)", self.module, self._proc.pid)
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


def serve(handle: Handler) -> int:
    """Answer a request per stdin line with `handle(request)` until EOF.
    Answers go to the original stdout; anything else that writes there (a
    library's print) goes to stderr, so the answers stay one per request."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    for line in sys.stdin:
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError(f"not an object: {req!r}")
        except ValueError as e:
            reply: dict[str, Any] = {"ok": False, "error": f"bad request: {e}"}
        else:
            try:
                reply = handle(req)
            except Exception as e:  # that request's answer, never the worker's end
                reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0
