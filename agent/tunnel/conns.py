"""Open and recent connections: the agent's record of what it relays, read by
/config_dump, `tether status`, access logs and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from agent.model import format_authority

access_log = logging.getLogger("tether.access")


def parse_endpoint(value: str) -> tuple[str, int]:
    """format_authority's inverse (brackets optional for IPv6)."""
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


class Counted(Protocol):
    """Anything relaying bytes both ways: a plain relay or an HBONE bridge."""

    @property
    def bytes_a_to_b(self) -> int: ...

    @property
    def bytes_b_to_a(self) -> int: ...


@dataclasses.dataclass
class Connection:
    """One connection the agent handles, in Istio's terms where they exist."""

    id: int
    pod: str  # the enrolled pod whose listener took it (namespace/name)
    direction: str  # outbound | inbound
    src: tuple[str, int]
    dst: tuple[str, int]
    path: str  # passthrough | sk_msg | hbone | plaintext
    started: float
    reporter: str = "source"  # source | destination (Istio's `reporter` label)
    src_identity: str | None = None  # spiffe://...
    dst_identity: str | None = None
    src_workload: str | None = None  # namespace/name
    dst_workload: str | None = None
    dst_service: str | None = None
    security: str = "unknown"  # mutual_tls | unknown
    flag: str = "-"  # Istio response flag: -, DENY, CONNECT, TLS_FAILURE, ...
    relay: Counted | None = None
    ended: float | None = None
    error: str | None = None
    inherited: bool = False  # taken over from a predecessor agent
    spliced: bool = False  # the pod<->agent loopback hop goes through sk_msg
    delivered_as: tuple[str, int] | None = None  # inbound: the source the app sees
    sent_base: int = 0  # bytes counted before a handoff
    received_base: int = 0
    kill: Callable[[], None] | None = None  # tear the connection down (policy change)
    # the event loop serving it (agent/tunnel/loops.py): kill, freeze and
    # drain run there, never from another loop's thread
    loop: asyncio.AbstractEventLoop | None = dataclasses.field(default=None, repr=False)

    @property
    def bytes_sent(self) -> int:
        return self.sent_base + (self.relay.bytes_a_to_b if self.relay else 0)

    @property
    def bytes_received(self) -> int:
        return self.received_base + (self.relay.bytes_b_to_a if self.relay else 0)

    def record(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pod": self.pod,
            "direction": self.direction,
            "reporter": self.reporter,
            "src": format_authority(*self.src),
            "dst": format_authority(*self.dst),
            "path": self.path,
            "src_identity": self.src_identity,
            "dst_identity": self.dst_identity,
            "src_workload": self.src_workload,
            "dst_workload": self.dst_workload,
            "dst_service": self.dst_service,
            "security": self.security,
            "response_flag": self.flag,
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "duration_s": round((self.ended or time.monotonic()) - self.started, 6),
            "open": self.ended is None,
            "error": self.error,
            "inherited": self.inherited,
            "spliced": self.spliced,
            "delivered_as": format_authority(*self.delivered_as) if self.delivered_as else None,
        }


class ConnTable:
    """Open and recently closed connections (bounded).  Every end is written
    to the JSON access log and handed to the close callbacks (metrics).
    Every tunnel loop adds and ends its connections here: each change is one
    dict or list operation, atomic under the interpreter lock."""

    def __init__(self, keep_closed: int = 1000) -> None:
        self._ids = itertools.count(1)
        self.open: dict[int, Connection] = {}
        self.closed: list[Connection] = []
        self.keep_closed = keep_closed
        self.on_open: list[Callable[[Connection], None]] = []
        self.on_close: list[Callable[[Connection], None]] = []

    def add(
        self,
        pod: str,
        direction: str,
        src: tuple[str, int],
        dst: tuple[str, int],
        path: str,
        **fields: Any,
    ) -> Connection:
        c = Connection(next(self._ids), pod, direction, src, dst, path, time.monotonic(), **fields)
        if c.loop is None:
            # outside a loop (tests) it stays None: served by whoever holds it
            with contextlib.suppress(RuntimeError):
                c.loop = asyncio.get_running_loop()
        self.open[c.id] = c
        return c

    def opened(self, c: Connection) -> None:
        """The connection is established (or refused): count it as opened."""
        for cb in self.on_open:
            cb(c)

    def refuse(self, c: Connection, error: str, flag: str) -> None:
        """A connection that never got through: counted as opened and closed,
        both with its response flag (as Istio reports a denied connection)."""
        c.flag = flag
        self.opened(c)
        self.end(c, error, flag)

    def end(self, c: Connection, error: str | None, flag: str | None = None) -> None:
        if self.open.pop(c.id, None) is None:
            return  # already ended (by its loop, or a freeze for a handoff)
        c.ended = time.monotonic()
        c.error = c.error or error  # a reason given earlier (policy change) wins
        abort = getattr(c.relay, "abort_flag", None)  # DC | UC: a side reset mid-transfer
        if flag is not None:
            c.flag = flag
        elif abort and c.flag == "-":
            c.flag = abort
            c.error = c.error or getattr(c.relay, "abort_reason", None) or error
        elif error and c.flag == "-":
            c.flag = "CONNECT" if c.relay is None else "DC"
        self.closed.append(c)
        del self.closed[: -self.keep_closed]
        if access_log.isEnabledFor(logging.INFO):
            access_log.info("%s", json.dumps(c.record(), separators=(",", ":")))
        for cb in self.on_close:
            cb(c)
