"""The agent's small HTTP servers: admin (15000, localhost: /healthz, /ready,
/config_dump, /connections, /metrics), Istio's readiness port (15021:
/healthz/ready only) and Prometheus metrics (15020).

HTTP/1.1 is parsed by h11 (the python-hyper project's, as h2 is), never by
hand: keep-alive, pipelining limits, bounded header size (h11 refuses an
incomplete request head past 16 KiB) and a read deadline per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import h11

log = logging.getLogger(__name__)

READ_TIMEOUT = 5.0
BIND_RETRY = 30.0  # a predecessor frees the node's ports when it hands over


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Route = Callable[[], Response]


class HttpServer:
    """GET-only routes on one address; anything else is a 404 or 405."""

    def __init__(self, routes: dict[str, Route], what: str) -> None:
        self.routes = routes
        self.what = what
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> None:
        """Listen, retrying for a bounded time: during a rolling update the old
        agent holds the port until it has handed over."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BIND_RETRY
        while True:
            try:
                self._server = await asyncio.start_server(self._serve, host, port)
                return
            except OSError as e:
                if loop.time() > deadline:
                    raise OSError(
                        e.errno, f"cannot listen on {host}:{port} for {self.what}: {e}"
                    ) from e
                await asyncio.sleep(0.2)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()

    def _respond(self, method: str, target: str) -> Response:
        path = target.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return Response(405, b"only GET\n")
        route = self.routes.get(path)
        if route is None:
            return Response(404, f"not found; try: {' '.join(sorted(self.routes))}\n".encode())
        try:
            return route()
        except Exception as e:
            log.exception("%s %s failed", self.what, path)
            return Response(500, f"{type(e).__name__}\n".encode())

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                event = await self._next_event(conn, reader)
                if isinstance(event, h11.Request):
                    resp = self._respond(event.method.decode(), event.target.decode("latin-1"))
                    headers = [
                        ("content-type", resp.content_type),
                        ("content-length", str(len(resp.body))),
                    ]
                    out = conn.send(h11.Response(status_code=resp.status, headers=headers))
                    if event.method != b"HEAD":
                        out += conn.send(h11.Data(data=resp.body))
                    out += conn.send(h11.EndOfMessage())
                    writer.write(out)
                    await writer.drain()
                    # drain the request body, if any, before the next cycle
                    while not isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                        event = await self._next_event(conn, reader)
                if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (h11.RemoteProtocolError, TimeoutError, ConnectionError):
            return  # a malformed or idle client: just close
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    @staticmethod
    async def _next_event(conn: h11.Connection, reader: asyncio.StreamReader) -> object:
        while True:
            event = conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await asyncio.wait_for(reader.read(65536), READ_TIMEOUT)
            conn.receive_data(data)
