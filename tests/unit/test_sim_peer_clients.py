"""The test peer's clients, which the netns and waypoint tiers count with.
The HTTP client (agent.sim.peer.http_requests) reuses a kept-alive
connection, reads bodies whole, and counts a cut body to the byte; the echo
client (connect) reports a connection reset at once as a reset."""

from __future__ import annotations

import fcntl
import http.server
import socket
import socketserver
import struct
import termios
import threading
import time
from collections.abc import Iterator

import pytest

from agent.sim import peer

BIG = 300_000
_connections: set[int] = set()  # client ports seen


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _unacked(sock: socket.socket) -> int:
    return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0])


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive

    def do_GET(self) -> None:
        _connections.add(self.client_address[1])
        n = BIG if self.path.startswith("/big") else 5
        self.send_response(200)
        self.send_header("content-length", str(n))
        self.end_headers()
        if self.path == "/big-cut":  # half the body, then a reset once the client has it
            self.wfile.write(b"x" * (n // 2))
            self.wfile.flush()
            deadline = time.monotonic() + 5
            while _unacked(self.connection) and time.monotonic() < deadline:
                time.sleep(0.005)
            _reset(self.connection)
            self.close_connection = True
            return
        self.wfile.write(b"x" * n)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[int]:
    _connections.clear()
    srv = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()


def test_requests_reuse_one_kept_alive_connection(server: int) -> None:
    r = peer.http_requests("127.0.0.1", server, count=5)
    assert r["ok"] and r["status"] == {"200": 5} and r["lengths"] == [5] * 5, r
    assert len(_connections) == 1


def test_large_bodies_are_read_whole(server: int) -> None:
    r = peer.http_requests("127.0.0.1", server, count=3, path="/big")
    assert r["ok"] and r["lengths"] == [BIG] * 3, r


def test_a_cut_body_counts_every_byte_read_before_the_reset(server: int) -> None:
    r = peer.http_requests("127.0.0.1", server, count=1, path="/big-cut")
    assert not r["ok"] and r["lengths"] == [] and r["cut"] == [BIG // 2], r


def test_a_connection_reset_right_after_it_was_made_is_reported_as_a_reset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A denial resets an accepted connection at once; when the RST is in
    before the client's first call (getpeername), the error is still a
    reset (ENOTCONN was reported as such and read as a different failure)."""
    lst = socket.create_server(("127.0.0.1", 0))
    port = lst.getsockname()[1]

    def reset_first() -> None:
        conn, _ = lst.accept()
        _reset(conn)

    server = threading.Thread(target=reset_first, daemon=True)
    server.start()
    connect = peer._connect

    def connect_then_wait(host: str, port: int, timeout: float) -> socket.socket:
        sock = connect(host, port, timeout)
        server.join(5)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # until the RST is in
            try:
                sock.getpeername()
            except OSError:
                break
            time.sleep(0.005)
        return sock

    monkeypatch.setattr(peer, "_connect", connect_then_wait)
    try:
        r = peer.connect("127.0.0.1", port, timeout=2)
    finally:
        lst.close()
    assert not r["ok"] and r["server_saw_peer"] is None, r
    assert r["error"].startswith("ConnectionResetError") and "reset" in r["error"], r
