"""Open connections against changed policy, in one place (ztunnel's
PolicyWatcher): after a policy change (or a change of which pods a waypoint
guards) every open inbound connection is authorized again and only those
the new state denies are closed."""

from __future__ import annotations

import asyncio
import contextlib

from agent.identity.spiffe import SpiffeId
from agent.tunnel.context import Tunnel, why_denied


def revalidate(t: Tunnel) -> dict[str, int]:
    """Close the open inbound connections of this event loop that the
    current policy denies; returns how many were closed per pod.

    With more than one loop (agent/tunnel/loops.py) the agent runs this on
    each, after the new view is in force: a connection is checked between
    two steps of its own loop, so it is either live here (`kill` set) or
    still connecting, and then `context.recheck` sees the new view before it
    goes live.  A connection recorded outside any loop (tests) is checked by
    whichever loop runs this."""
    here = None
    with contextlib.suppress(RuntimeError):
        here = asyncio.get_running_loop()
    view = t.view
    closed: dict[str, int] = {}
    for c in list(t.conns.open.values()):
        proxy = t.local.get(c.pod)
        if c.direction != "inbound" or c.kill is None or proxy is None:
            continue
        if c.loop is not None and c.loop is not here:
            continue  # another loop's: checked there
        ident = SpiffeId.parse(c.src_identity) if c.src_identity else None
        why = why_denied(t, proxy.pod, c.src[0], ident, c.dst, view)
        if why is not None:
            c.flag = "DENY"
            c.error = f"closed by policy change: {why}"
            c.kill()
            closed[c.pod] = closed.get(c.pod, 0) + 1
    return closed
