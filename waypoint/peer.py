"""Who is on the other end of the xDS socket: SO_PEERCRED, checked before grpc sees a byte.

grpcio accepts connections in its C core and tells a handler neither the fd
nor the peer's credentials, so the check sits in front of it: a gate owns the
socket Envoy connects to, reads the connecting process's pid with
SO_PEERCRED, refuses (closes) a peer that is not in the waypoint pod, and
relays the accepted ones to grpc's own socket, which lives in the same 0700
directory and is never mounted into a pod.

The pid is the one that called connect(), as the kernel recorded it, in the
agent's pid namespace (the agent runs with the host's).  Between connect()
and the check that process could exit and its pid be reused; SO_PEERPIDFD
(Linux 6.5) would close that gap, the per-waypoint socket mount narrows it to
processes in that pod anyway.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from agent.netns import netns_inode

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclasses.dataclass(frozen=True)
class PeerCred:
    pid: int
    uid: int
    gid: int


#: True when the peer may talk to this socket's ADS server
PeerCheck = Callable[[PeerCred], bool]


def peer_cred(sock: socket.socket) -> PeerCred:
    """The credentials the kernel recorded when the peer connected."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    return PeerCred(*_UCRED.unpack(raw))


def peer_in_netns(netns_path: str | os.PathLike[str]) -> PeerCheck:
    """Allow processes whose network namespace is ``netns_path`` (the waypoint pod's)."""
    want = netns_inode(netns_path)

    def check(peer: PeerCred) -> bool:
        try:
            return netns_inode(f"/proc/{peer.pid}/ns/net") == want
        except OSError:  # gone already, or not visible (no host pid namespace)
            return False

    return check


def peer_in_cgroup(cgroup_path: str | os.PathLike[str], root: str = "/sys/fs/cgroup") -> PeerCheck:
    """Allow processes in the cgroup v2 ``cgroup_path`` or below it (the pod's cgroup).

    /proc/PID/cgroup is relative to the reader's cgroup namespace: the agent
    reads it from the host's, where ``root`` is the cgroup2 mount.
    """
    rel = os.path.relpath(os.fspath(cgroup_path), root)
    if rel == ".." or rel.startswith("../"):
        raise ValueError(f"{cgroup_path} is not under {root}")
    want = "/" if rel == "." else "/" + rel.strip("/")

    def check(peer: PeerCred) -> bool:
        try:
            text = Path(f"/proc/{peer.pid}/cgroup").read_text()
        except OSError:
            return False
        for line in text.splitlines():
            if line.startswith("0::"):
                path = line[3:].rstrip("/") or "/"
                return path == want or path.startswith(want.rstrip("/") + "/")
        return False

    return check


class PeerGate:
    """Listen on ``public``, admit peers ``check`` allows, relay them to ``private``."""

    def __init__(self, public: Path, private: Path, check: PeerCheck, name: str = "") -> None:
        self.public = public
        self.private = private
        self.check = check
        self.name = name or public.name
        self.refused = 0
        self._sock: socket.socket | None = None
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.public.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        # the directory is 0700 (XdsServer): nobody reaches the socket before the chmod
        sock.bind(os.fspath(self.public))
        os.chmod(self.public, 0o600)
        sock.listen(16)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, name=f"xds-gate-{self.name}")
        self._thread.daemon = True
        self._thread.start()

    def _accept(self) -> None:
        # the listener as started: stop() clears self._sock, and a thread
        # that read the attribute after that raised AttributeError
        sock = self._sock
        assert sock is not None
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return  # stop() shut the listener down
            try:
                cred = peer_cred(conn)
                allowed = self.check(cred)
            except Exception:
                log.exception("xds: peer check failed on %s", self.name)
                allowed, cred = False, PeerCred(0, -1, -1)
            if not allowed:
                self.refused += 1
                log.warning(
                    "xds: refused pid %d (uid %d) on %s: not in the waypoint's pod",
                    cred.pid,
                    cred.uid,
                    self.name,
                )
                conn.close()
                continue
            try:
                upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                upstream.connect(os.fspath(self.private))
            except OSError as e:
                log.warning("xds: %s: grpc socket unreachable: %s", self.name, e)
                conn.close()
                continue
            with self._lock:
                self._open.update((conn, upstream))
            done = threading.Barrier(2, action=functools.partial(self._close, conn, upstream))
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(
                    target=self._pump,
                    args=(src, dst, done),
                    name=f"xds-relay-{self.name}",
                    daemon=True,
                ).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, done: threading.Barrier) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
            with contextlib.suppress(threading.BrokenBarrierError):
                done.wait()

    def _close(self, *socks: socket.socket) -> None:
        with self._lock:
            for s in socks:
                self._open.discard(s)
                s.close()

    def stop(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept()
            self._sock.close()
            self._sock = None
        if self._thread is not None:
            self._thread.join(2)
            self._thread = None
        with self._lock:
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(FileNotFoundError):
            self.public.unlink()
