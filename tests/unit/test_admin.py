"""The admin/readiness/metrics HTTP servers (h11): routes, keep-alive,
methods, and a malformed or oversized request only closes that connection."""

from __future__ import annotations

import asyncio
import http.client
import socket
import threading
from collections.abc import Iterator

import pytest

from agent.admin import HttpServer, Response


@pytest.fixture
def server() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    loop = asyncio.new_event_loop()
    srv = HttpServer(
        {
            "/healthz": lambda: Response(200, b"ok\n"),
            "/boom": lambda: 1 / 0,  # type: ignore[return-value,arg-type]
        },
        "test",
    )
    loop.run_until_complete(srv.start("127.0.0.1", port))
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    yield port

    async def shutdown() -> None:
        srv.close()
        tasks = [x for x in asyncio.all_tasks() if x is not asyncio.current_task()]
        for x in tasks:
            x.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run_coroutine_threadsafe(shutdown(), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)
    loop.close()


def test_routes_and_keep_alive(server: int) -> None:
    c = http.client.HTTPConnection("127.0.0.1", server, timeout=5)
    for _ in range(3):  # one connection, three requests
        c.request("GET", "/healthz?x=1")
        r = c.getresponse()
        assert (r.status, r.read()) == (200, b"ok\n")
    c.request("GET", "/nope")
    r = c.getresponse()
    assert r.status == 404 and b"/healthz" in r.read()
    c.request("POST", "/healthz", body=b"x" * 100)
    r = c.getresponse()
    assert r.status == 405
    r.read()
    c.request("HEAD", "/healthz")
    r = c.getresponse()
    assert r.status == 200 and r.read() == b""
    c.close()


def test_handler_error_is_a_500_and_the_server_lives(server: int) -> None:
    c = http.client.HTTPConnection("127.0.0.1", server, timeout=5)
    c.request("GET", "/boom")
    assert c.getresponse().status == 500
    c.close()
    c = http.client.HTTPConnection("127.0.0.1", server, timeout=5)
    c.request("GET", "/healthz")
    assert c.getresponse().status == 200


@pytest.mark.parametrize(
    "raw", [b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n"]
)
def test_malformed_request_closes_only_that_connection(server: int, raw: bytes) -> None:
    got = b""
    with socket.create_connection(("127.0.0.1", server), timeout=5) as s:
        s.sendall(raw)
        # The server may close first, with our bytes unread: a reset, and
        # then shutdown (ENOTCONN) or recv (ECONNRESET) fail. Closed either way.
        try:
            s.shutdown(socket.SHUT_WR)
            while chunk := s.recv(4096):
                got += chunk
        except TimeoutError:
            raise
        except OSError:
            pass
    assert not got.startswith(b"HTTP/1.1 200")
    c = http.client.HTTPConnection("127.0.0.1", server, timeout=5)
    c.request("GET", "/healthz")
    assert c.getresponse().status == 200
