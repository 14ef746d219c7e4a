"""The agent's event loop: asyncio's own, or uvloop's (libuv, its TLS on
memory BIOs in Cython).  `TETHER_LOOP=asyncio|uvloop` picks it; uvloop is
optional: asked for and not installed, the agent says so and runs on
asyncio.  The default is whichever `tether bench tunnel` measured faster
(README, Benchmarks)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT = "uvloop"
CHOICES = ("asyncio", "uvloop")


def chosen() -> str:
    """The loop asked for (TETHER_LOOP, else the default)."""
    name = os.environ.get("TETHER_LOOP", DEFAULT).strip().lower() or DEFAULT
    if name not in CHOICES:
        log.warning("TETHER_LOOP=%r is none of %s: using asyncio", name, "|".join(CHOICES))
        return "asyncio"
    return name


def loop_factory(name: str | None = None) -> tuple[str, Callable[[], asyncio.AbstractEventLoop]]:
    """(the loop actually used, a factory for it)."""
    name = name or chosen()
    if name == "uvloop":
        try:
            import uvloop
        except ImportError as e:
            log.warning("TETHER_LOOP=uvloop but uvloop is not importable (%s): using asyncio", e)
        else:
            return "uvloop", uvloop.new_event_loop
    return "asyncio", asyncio.new_event_loop


def run(main: Coroutine[Any, Any, T], name: str | None = None) -> T:
    used, factory = loop_factory(name)
    log.info("event loop: %s", used)
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
