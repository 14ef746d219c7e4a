"""Traffic endpoints for tests, the demo and benchmarks (``python -m agent.sim.peer``).

Standard library only, so it runs in any pod netns with the bare interpreter.
The server first tells each client, in one JSON line, which addresses it saw:
that is how tests prove a mesh preserved (or rewrote) the client's identity.

    serve   --port P [--bind ADDR ...] [--sink]   echo (or discard) server; prints "ready"
    connect HOST PORT [--bytes N] [--hold S] [--until FILE]  one checked echo exchange, JSON result
    rr      HOST PORT [--size B] [--count N]      request/response latency, JSON p50/p99/mean
    stream  HOST PORT [--seconds S]               one-way throughput (use with serve --sink)
    http-serve --port P --name N [--fail-first K] HTTP/1.1 server answering its name (503
                                                  to its first K requests); prints "ready"
    http    HOST PORT [--count N] [--method M] [--path P] [--header K:V ...]
                                                  N requests on keep-alive connections,
                                                  JSON counts by status and by body

Every wait is bounded: a stall of ``--timeout`` seconds without progress fails.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import os
import selectors
import signal
import socket
import statistics
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

DEFAULT_PORT = 8080
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_IDLE_TIMEOUT_S = 300.0
HOLD_INTERVAL_S = 0.2
MAX_LINE = 4096
MAX_RR_SIZE = 65536
_CHUNK = 256 * 1024

Addr = list[Any]  # [ip: str, port: int]


def normalize(addr: Any) -> Addr:
    """``[ip, port]`` from a socket address; IPv4-mapped IPv6 becomes plain IPv4."""
    host = str(addr[0])
    ip_part, pct, scope = host.partition("%")
    try:
        ip = ipaddress.ip_address(ip_part)
    except ValueError:
        return [host, int(addr[1])]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return [str(ip.ipv4_mapped), int(addr[1])]
    return [str(ip) + pct + scope, int(addr[1])]


# -- server -----------------------------------------------------------------


def _listen(binds: Sequence[str], port: int) -> list[socket.socket]:
    """One listening socket per address; ``::`` is dual-stack only when no IPv4 bind is given."""
    has_v4 = any(":" not in b for b in binds)
    socks: list[socket.socket] = []
    try:
        for addr in binds:
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if has_v4 else 0)
            try:
                s.bind((addr, port))
            except OSError as e:
                raise OSError(e.errno, f"cannot bind [{addr}]:{port}: {e.strerror}") from e
            s.listen(128)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def _handle(conn: socket.socket, sink: bool, idle_timeout: float) -> None:
    """Hello line, then echo (or discard) until EOF; idle connections are dropped."""
    with conn:
        try:
            conn.settimeout(idle_timeout)
            hello = {"peer": normalize(conn.getpeername()), "local": normalize(conn.getsockname())}
            conn.sendall((json.dumps(hello) + "\n").encode())
            while True:
                data = conn.recv(_CHUNK)
                if not data:
                    break
                if not sink:
                    conn.sendall(data)
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_WR)
        except OSError as e:  # includes timeouts and resets: this connection only
            print(f"peer serve: connection error: {e}", file=sys.stderr, flush=True)


def serve(
    port: int,
    binds: Sequence[str] = ("0.0.0.0", "::"),
    sink: bool = False,
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT_S,
    stop: threading.Event | None = None,
    on_ready: Any = None,
) -> None:
    """Serve until ``stop`` is set; ``on_ready()`` is called once all sockets listen."""
    stop = stop or threading.Event()
    listeners = _listen(binds, port)
    sel = selectors.DefaultSelector()
    try:
        for s in listeners:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        if on_ready is not None:
            on_ready()
        while not stop.is_set():
            for key, _ in sel.select(timeout=0.2):
                lsock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    conn, _addr = lsock.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                conn.setblocking(True)
                threading.Thread(
                    target=_handle, args=(conn, sink, idle_timeout), daemon=True
                ).start()
    finally:
        sel.close()
        for s in listeners:
            s.close()


# -- client helpers ---------------------------------------------------------


def _read_line(sock: socket.socket, stall: float) -> tuple[dict[str, Any], bytes]:
    """The server's hello line, parsed, plus any bytes that arrived after it."""
    sock.settimeout(stall)
    buf = bytearray()
    while b"\n" not in buf:
        if len(buf) > MAX_LINE:
            raise ValueError(f"no newline in the first {MAX_LINE} bytes from the server")
        chunk = sock.recv(MAX_LINE)
        if not chunk:
            raise ConnectionError("server closed the connection before its hello line")
        buf += chunk
    line, _, rest = bytes(buf).partition(b"\n")
    hello = json.loads(line)
    if not isinstance(hello, dict) or "peer" not in hello or "local" not in hello:
        raise ValueError(f"unexpected hello line from the server: {line[:200]!r}")
    return hello, rest


def _exchange(
    sock: socket.socket,
    sel: selectors.BaseSelector,
    payload: bytes,
    expect: int,
    stall: float,
    initial: bytes = b"",
) -> bytes:
    """Send ``payload`` while reading ``expect`` bytes, so neither side's buffers deadlock.

    Fails when nothing moves for ``stall`` seconds.  Reads never go past
    ``expect``, so surplus data stays in the socket for the caller to notice.
    """
    view = memoryview(payload)
    sent = 0
    received = bytearray(initial[:expect])
    if len(initial) > expect:
        raise ValueError(f"server sent {len(initial) - expect} bytes more than echoed")
    last = time.monotonic()
    while sent < len(payload) or len(received) < expect:
        events = 0
        if sent < len(payload):
            events |= selectors.EVENT_WRITE
        if len(received) < expect:
            events |= selectors.EVENT_READ
        sel.modify(sock, events)
        ready = sel.select(timeout=min(0.5, stall))
        now = time.monotonic()
        if not ready and now - last > stall:
            raise TimeoutError(
                f"no progress for {stall:g}s (sent {sent}/{len(payload)}, "
                f"received {len(received)}/{expect})"
            )
        for _, mask in ready:
            if mask & selectors.EVENT_WRITE:
                with contextlib.suppress(BlockingIOError):
                    sent += sock.send(view[sent : sent + _CHUNK])
                    last = now
            if mask & selectors.EVENT_READ:
                try:
                    chunk = sock.recv(min(_CHUNK, expect - len(received)))
                except BlockingIOError:
                    continue
                if not chunk:
                    raise ConnectionError(
                        f"server closed the connection after {len(received)} of {expect} bytes"
                    )
                received += chunk
                last = now
    return bytes(received)


def _wait_eof(sock: socket.socket, stall: float) -> None:
    """After our FIN, the server must close without sending anything more."""
    sock.setblocking(True)
    sock.settimeout(stall)
    extra = sock.recv(MAX_LINE)
    if extra:
        raise ValueError(f"server sent {len(extra)}+ unexpected bytes after the echo")


def _first_diff(a: bytes, b: bytes) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return min(len(a), len(b))


def _peername(sock: socket.socket) -> Any:
    """getpeername, with a connection torn down right after it was made
    reported as what it is: only an RST takes a connected TCP socket to
    ENOTCONN (a FIN leaves it in CLOSE_WAIT, still connected)."""
    try:
        return sock.getpeername()
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise
        raise ConnectionResetError(
            errno.ECONNRESET, "connection reset right after it was made (getpeername: ENOTCONN)"
        ) from e


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# -- clients ----------------------------------------------------------------


def connect(
    host: str,
    port: int,
    nbytes: int = 4096,
    hold: float = 0.0,
    timeout: float = DEFAULT_TIMEOUT_S,
    marker: str = "",
    until: str = "",
) -> dict[str, Any]:
    """One connection: hello, echo of ``nbytes`` random bytes, optional hold; never raises.

    ``marker`` is repeated over the payload instead of random bytes, so a wire
    capture can tell whether the payload crossed a link in plaintext.
    ``until`` names a file whose creation ends the hold early: a test holds
    connections open until it has looked at them, however slow the machine,
    with ``hold`` only as the upper bound."""
    result: dict[str, Any] = {
        "ok": False,
        "server_saw_peer": None,
        "server_saw_local": None,
        "getpeername": None,
        "getsockname": None,
        "bytes": nbytes,
        "error": None,
    }
    try:
        with _connect(host, port, timeout) as sock:
            result["getpeername"] = normalize(_peername(sock))
            result["getsockname"] = normalize(sock.getsockname())
            hello, rest = _read_line(sock, timeout)
            result["server_saw_peer"] = hello["peer"]
            result["server_saw_local"] = hello["local"]
            sock.setblocking(False)
            with selectors.DefaultSelector() as sel:
                sel.register(sock, selectors.EVENT_READ)
                payload = (
                    (marker.encode() * (nbytes // max(len(marker), 1) + 1))[:nbytes]
                    if marker
                    else os.urandom(nbytes)
                )
                echo = _exchange(sock, sel, payload, nbytes, timeout, rest)
                if echo != payload:
                    raise ValueError(
                        f"echo differs from what was sent at byte {_first_diff(echo, payload)}"
                    )
                end = time.monotonic() + hold
                seq = 0
                while time.monotonic() < end and not (until and os.path.exists(until)):
                    msg = f"hold {seq}\n".encode()
                    if _exchange(sock, sel, msg, len(msg), timeout) != msg:
                        raise ValueError(f"hold message {seq} echoed wrongly")
                    seq += 1
                    time.sleep(max(0.0, min(HOLD_INTERVAL_S, end - time.monotonic())))
                sel.unregister(sock)
            sock.shutdown(socket.SHUT_WR)
            _wait_eof(sock, timeout)
        result["ok"] = True
    except (OSError, ValueError) as e:  # TimeoutError and ConnectionError are OSErrors
        result["error"] = f"{type(e).__name__}: {e}"
    return result


def rr(
    host: str, port: int, size: int = 1024, count: int = 1000, timeout: float = DEFAULT_TIMEOUT_S
) -> dict[str, Any]:
    """Request/response latency: ``count`` round trips of ``size`` bytes on one connection."""
    result: dict[str, Any] = {"ok": False, "size": size, "count": count, "error": None}
    if not 1 <= size <= MAX_RR_SIZE or count < 1:
        result["error"] = f"need 1 <= size <= {MAX_RR_SIZE} and count >= 1"
        return result
    lat_us: list[float] = []
    try:
        with _connect(host, port, timeout) as sock:
            hello, rest = _read_line(sock, timeout)
            if rest:
                raise ValueError("server sent data before any request")
            result["server_saw_peer"] = hello["peer"]
            payload = os.urandom(size)
            buf = bytearray(size)
            view = memoryview(buf)
            for i in range(count):
                t0 = time.perf_counter_ns()
                sock.sendall(payload)
                got = 0
                while got < size:
                    n = sock.recv_into(view[got:], size - got)
                    if n == 0:
                        raise ConnectionError(f"server closed the connection in round {i}")
                    got += n
                lat_us.append((time.perf_counter_ns() - t0) / 1000.0)
                if buf != payload:
                    raise ValueError(f"response {i} differs from the request")
        lat_us.sort()
        result.update(
            ok=True,
            p50_us=round(lat_us[len(lat_us) // 2], 1),
            p99_us=round(lat_us[min(len(lat_us) - 1, int(len(lat_us) * 0.99))], 1),
            mean_us=round(statistics.fmean(lat_us), 1),
            min_us=round(lat_us[0], 1),
            max_us=round(lat_us[-1], 1),
        )
    except (OSError, ValueError) as e:
        result["error"] = f"{type(e).__name__}: {e}"
        result["completed"] = len(lat_us)
    return result


def stream(
    host: str, port: int, seconds: float = 5.0, timeout: float = DEFAULT_TIMEOUT_S
) -> dict[str, Any]:
    """One-way throughput: send for ``seconds``, then wait for the server to close.

    Anything the server sends back is read and discarded, so an echo server
    works too (measuring both directions at once).
    """
    result: dict[str, Any] = {"ok": False, "bytes": 0, "seconds": seconds, "error": None}
    chunk = memoryview(os.urandom(_CHUNK))
    sent = 0
    try:
        with _connect(host, port, timeout) as sock:
            hello, _rest = _read_line(sock, timeout)
            result["server_saw_peer"] = hello["peer"]
            sock.setblocking(False)
            with selectors.DefaultSelector() as sel:
                sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
                start = time.monotonic()
                end = start + seconds
                last = start
                writing, eof = True, False
                while not eof:
                    now = time.monotonic()
                    if writing and now >= end:
                        writing = False
                        sock.shutdown(socket.SHUT_WR)
                        sel.modify(sock, selectors.EVENT_READ)
                    if now - last > timeout:
                        raise TimeoutError(f"no progress for {timeout:g}s after {sent} bytes")
                    for _, mask in sel.select(timeout=0.05):
                        if writing and mask & selectors.EVENT_WRITE:
                            with contextlib.suppress(BlockingIOError):
                                sent += sock.send(chunk)
                                last = now
                        if mask & selectors.EVENT_READ:
                            try:
                                data = sock.recv(_CHUNK)
                            except BlockingIOError:
                                continue
                            last = now
                            if not data:
                                eof = True
                elapsed = time.monotonic() - start
        if writing:
            raise ConnectionError(f"server closed the connection after {sent} bytes")
        result.update(
            ok=True,
            bytes=sent,
            seconds=round(elapsed, 3),
            bytes_per_s=round(sent / elapsed),
            bits_per_s=round(sent * 8 / elapsed),
        )
    except (OSError, ValueError) as e:
        result["error"] = f"{type(e).__name__}: {e}"
        result["bytes"] = sent
    return result


# -- HTTP -------------------------------------------------------------------


def http_serve(
    port: int,
    name: str,
    fail_first: int = 0,
    stop: threading.Event | None = None,
    on_ready: Any = None,
) -> None:
    """An HTTP/1.1 server answering every request with ``name`` (and header
    ``x-served-by``), except the first ``fail_first`` requests: 503.
    ``/bytes/N`` answers N bytes instead (at most 64 MiB)."""
    import http.server

    lock = threading.Lock()
    seen = [0]

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            n = int(self.headers.get("content-length") or 0)
            if n:
                self.rfile.read(n)
            with lock:
                seen[0] += 1
                failing = seen[0] <= fail_first
            body = f"{name}\n".encode()
            if self.path.startswith("/bytes/") and self.path[7:].isdigit():
                n = min(int(self.path[7:]), 64 << 20)
                body = (bytes(range(251)) * (n // 251 + 1))[:n]
            self.send_response(503 if failing else 200)
            self.send_header("content-type", "text/plain")
            self.send_header("content-length", str(len(body)))
            self.send_header("x-served-by", name)
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        allow_reuse_address = True
        address_family = socket.AF_INET6  # dual-stack: a pod's IPv4 and IPv6 addresses

        def server_bind(self) -> None:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            super().server_bind()

        def handle_error(self, request: Any, client_address: Any) -> None:
            # a proxy resetting an idle keep-alive connection is no news
            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)

    srv = Server(("::", port), Handler)
    stop = stop or threading.Event()
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    if on_ready is not None:
        on_ready()
    try:
        stop.wait()
    finally:
        srv.shutdown()
        srv.server_close()


def http_requests(
    host: str,
    port: int,
    count: int = 1,
    method: str = "GET",
    path: str = "/",
    headers: Sequence[str] = (),
    timeout: float = DEFAULT_TIMEOUT_S,
    duration: float = 0.0,
) -> dict[str, Any]:
    """``count`` requests (or as many as fit in ``duration`` seconds), reusing
    a connection while the server keeps it; counts by status and by body;
    ``ok`` when every request got an answer."""
    import http.client

    hdrs = {}
    for h in headers:
        k, _, v = h.partition(":")
        hdrs[k.strip()] = v.strip()
    status: dict[str, int] = {}
    bodies: dict[str, int] = {}
    lengths: list[int] = []  # of each body read whole, in order
    cut: list[int] = []  # body bytes read before each failure, in order
    errors: list[str] = []
    conn: http.client.HTTPConnection | None = None
    end = time.monotonic() + duration
    done = 0
    while (time.monotonic() < end) if duration > 0 else (done < count):
        done += 1
        got = 0
        try:
            if conn is None:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
            conn.request(method, path, headers=hdrs)
            resp = conn.getresponse()
            head = b""
            # read1: one recv at most, so a reset loses nothing already read
            # (read(n) fills n first and drops a partial fill on the error);
            # the last read() marks the response done (read1 does not, and
            # the connection could not be reused)
            while chunk := resp.read1(65536) or resp.read():
                head += chunk[: 200 - len(head)]
                got += len(chunk)
            lengths.append(got)
            body = head.decode(errors="replace").strip()
            status[str(resp.status)] = status.get(str(resp.status), 0) + 1
            bodies[body[:80]] = bodies.get(body[:80], 0) + 1
            if resp.will_close:
                conn.close()
                conn = None
        except (OSError, http.client.HTTPException) as e:
            errors.append(f"{type(e).__name__}: {e}")
            cut.append(got)
            if conn is not None:
                conn.close()
            conn = None
    if conn is not None:
        conn.close()
    return {
        "ok": not errors,
        "count": done,
        "status": status,
        "bodies": bodies,
        "lengths": lengths[:1000],
        "cut": cut[:1000],
        "errors": len(errors),
        "error": errors[0] if errors else None,
    }


# -- command line -----------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m agent.sim.peer", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="echo (or sink) server")
    s.add_argument("--port", type=int, default=DEFAULT_PORT)
    s.add_argument(
        "--bind", action="append", metavar="ADDR", help="repeatable; default 0.0.0.0 and ::"
    )
    s.add_argument("--sink", action="store_true", help="discard input instead of echoing")
    s.add_argument("--idle-timeout", type=float, default=DEFAULT_IDLE_TIMEOUT_S)
    h = sub.add_parser("http-serve", help="HTTP server answering its name")
    h.add_argument("--port", type=int, default=DEFAULT_PORT)
    h.add_argument("--name", required=True)
    h.add_argument("--fail-first", type=int, default=0, help="answer 503 to this many first")
    c = sub.add_parser("http", help="HTTP requests, counted by status and body")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S)
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--method", default="GET")
    c.add_argument("--path", default="/")
    c.add_argument("--header", action="append", default=[], metavar="NAME:VALUE")
    c.add_argument("--duration", type=float, default=0.0, help="run this long instead (s)")
    for name, help_ in (
        ("connect", "checked echo exchange"),
        ("rr", "request/response latency"),
        ("stream", "one-way throughput"),
    ):
        c = sub.add_parser(name, help=help_)
        c.add_argument("host")
        c.add_argument("port", type=int)
        c.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="stall timeout (s)")
        if name == "connect":
            c.add_argument("--bytes", type=int, default=4096)
            c.add_argument("--hold", type=float, default=0.0, help="keep talking for this long (s)")
            c.add_argument("--marker", default="", help="repeat this text as the payload")
            c.add_argument("--until", default="", help="end the hold early once this file exists")
        elif name == "rr":
            c.add_argument("--size", type=int, default=1024)
            c.add_argument("--count", type=int, default=1000)
        else:
            c.add_argument("--seconds", type=float, default=5.0)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; clients exit 0 iff their JSON says ok."""
    args = _parser().parse_args(argv)
    if args.cmd == "serve":
        stop = threading.Event()

        def _stop(_signum: int, _frame: object) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, _stop)
        signal.signal(signal.SIGINT, _stop)
        try:
            serve(
                args.port,
                args.bind or ["0.0.0.0", "::"],
                sink=args.sink,
                idle_timeout=args.idle_timeout,
                stop=stop,
                on_ready=lambda: print("ready", flush=True),
            )
        except OSError as e:
            print(f"peer serve: {e}", file=sys.stderr)
            return 1
        return 0
    if args.cmd == "http-serve":
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda _s, _f: stop.set())
        signal.signal(signal.SIGINT, lambda _s, _f: stop.set())
        try:
            http_serve(
                args.port,
                args.name,
                args.fail_first,
                stop=stop,
                on_ready=lambda: print("ready", flush=True),
            )
        except OSError as e:
            print(f"peer http-serve: {e}", file=sys.stderr)
            return 1
        return 0
    if args.cmd == "http":
        result = http_requests(
            args.host,
            args.port,
            args.count,
            args.method,
            args.path,
            args.header,
            args.timeout,
            args.duration,
        )
        print(json.dumps(result), flush=True)
        return 0 if result["ok"] else 1
    if args.cmd == "connect":
        if args.bytes < 0 or args.hold < 0:
            print("--bytes and --hold must be >= 0", file=sys.stderr)
            return 2
        result = connect(
            args.host, args.port, args.bytes, args.hold, args.timeout, args.marker, args.until
        )
    elif args.cmd == "rr":
        result = rr(args.host, args.port, args.size, args.count, args.timeout)
    else:
        result = stream(args.host, args.port, args.seconds, args.timeout)
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
