#!/usr/bin/env python3
"""Test workload for the node tier (stdlib only).

    echo.py serve [--http 8080] [--tcp 9000]   HTTP + TCP echo server
    echo.py get URL                            one HTTP GET, body on stdout
    echo.py tcp HOST PORT [MESSAGE]            one TCP exchange, reply on stdout

HTTP: GET /healthz -> "ok"; any other path -> JSON {"peer": source address
seen by the server, "pod": $HOSTNAME, "path": ...}, and a counter of
/healthz hits per client address is kept (GET /probes returns it), so a test
can count kubelet probe successes. TCP: first line back is "peer <ip>:<port>",
then every byte received is echoed.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import socketserver
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PROBES: collections.Counter[str] = collections.Counter()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        peer = self.client_address[0]
        if self.path == "/healthz":
            PROBES[peer] += 1
            self._send(200, b"ok\n", "text/plain")
        elif self.path == "/probes":
            self._send(200, json.dumps(dict(PROBES)).encode())
        else:
            body = {
                "peer": f"{peer}:{self.client_address[1]}",
                "pod": os.environ.get("HOSTNAME", ""),
                "path": self.path,
            }
            self._send(200, json.dumps(body).encode())

    def log_message(self, fmt: str, *args: object) -> None:
        if self.path != "/healthz":
            sys.stderr.write(f"{self.client_address[0]} {fmt % args}\n")


class TCPEcho(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        ip, port = self.client_address[:2]
        self.request.sendall(f"peer {ip}:{port}\n".encode())
        while data := self.request.recv(65536):
            self.request.sendall(data)


class TCPServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def serve(http_port: int, tcp_port: int) -> None:
    tcp = TCPServer(("0.0.0.0", tcp_port), TCPEcho)
    threading.Thread(target=tcp.serve_forever, daemon=True).start()
    httpd = ThreadingHTTPServer(("0.0.0.0", http_port), Handler)
    httpd.daemon_threads = True
    print(f"serving http :{http_port} tcp :{tcp_port}", flush=True)
    httpd.serve_forever()


def main(argv: list[str]) -> int:
    if not argv or argv[0] == "serve":
        args = dict(zip(argv[1::2], argv[2::2], strict=False))
        serve(int(args.get("--http", 8080)), int(args.get("--tcp", 9000)))
        return 0
    if argv[0] == "get":
        with urllib.request.urlopen(argv[1], timeout=10) as r:
            sys.stdout.write(r.read().decode())
        return 0
    if argv[0] == "tcp":
        msg = (argv[3] if len(argv) > 3 else "hello") + "\n"
        with socket.create_connection((argv[1], int(argv[2])), timeout=10) as s:
            s.sendall(msg.encode())
            s.shutdown(socket.SHUT_WR)
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        sys.stdout.write(out.decode())
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
