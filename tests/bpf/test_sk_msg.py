"""tether_sk_msg moves bytes between two loopback sockets in tether_socks without TCP.

Both ends of a connected loopback pair are put in tether_socks under their
own tuple (local, peer), as sockops and the agent do.  4 MiB of random data
go each way at once and must arrive byte-exact; TCP_INFO's tcpi_bytes_acked
of each sender shows whether they crossed TCP (it counts bytes the peer's
TCP acknowledged: near zero when sk_msg hands them over, at least the
payload when it does not).
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import netns
from agent.datapath import bpfsys
from agent.datapath.bpfsys import AttachType
from agent.datapath.loader import Programs
from agent.datapath.structs import TetherTuple

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="bpf tier needs root (bpf(2), bpffs, cgroup v2)"
)

PAYLOAD = 4 << 20
TCPI_BYTES_ACKED = 120  # struct tcp_info: u64 tcpi_bytes_acked (Linux >= 4.1)
TCPI_BYTES_RECEIVED = 128
NEAR_ZERO = 64 << 10
TIMEOUT = 30.0
FAMILIES = pytest.mark.parametrize(
    ("family", "lo"),
    [(socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")],
    ids=["ipv4", "ipv6"],
)


def tcpi(sock: socket.socket, offset: int) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    assert len(info) >= offset + 8, f"TCP_INFO has {len(info)} bytes"
    return int.from_bytes(info[offset : offset + 8], sys.byteorder)


def own_tuple(sock: socket.socket) -> TetherTuple:
    return TetherTuple.of(sock.getsockname()[:2], sock.getpeername()[:2])


@pytest.fixture
def attached(programs: Programs) -> Iterator[Programs]:
    """tether_sk_msg attached to the module's tether_socks."""
    map_fd = programs.map_fds["tether_socks"]
    prog_fd = programs.prog_fds["tether_sk_msg"]
    bpfsys.prog_attach(map_fd, prog_fd, AttachType.SK_MSG_VERDICT)
    try:
        yield programs
    finally:
        bpfsys.prog_detach(map_fd, AttachType.SK_MSG_VERDICT, prog_fd)


@pytest.fixture
def pair(scratch_netns) -> Iterator:
    """make(family, lo) -> (client, server): a connected loopback pair in a scratch netns."""
    ns: list[Path] = []
    owned: list[socket.socket] = []

    def make(family: int, lo: str) -> tuple[socket.socket, socket.socket]:
        if not ns:
            ns.append(scratch_netns())
        with netns.entered(ns[0]):
            lis = socket.socket(family, socket.SOCK_STREAM)
            cli = socket.socket(family, socket.SOCK_STREAM)
        owned.extend((lis, cli))
        lis.bind((lo, 0))
        lis.listen(1)
        lis.settimeout(TIMEOUT)
        cli.settimeout(TIMEOUT)
        cli.connect(lis.getsockname()[:2])
        srv, _ = lis.accept()
        owned.append(srv)
        srv.settimeout(TIMEOUT)
        return cli, srv

    try:
        yield make
    finally:
        for s in owned:
            s.close()


def exchange(a: socket.socket, b: socket.socket) -> None:
    """PAYLOAD random bytes a->b and b->a concurrently; both must arrive byte-exact."""
    data = {id(a): os.urandom(PAYLOAD), id(b): os.urandom(PAYLOAD)}
    got: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def send(s: socket.socket) -> None:
        try:
            s.sendall(data[id(s)])
        except BaseException as e:
            errors.append(e)

    def recv(s: socket.socket, into: int) -> None:
        buf = bytearray()
        try:
            while len(buf) < PAYLOAD:
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                buf += chunk
        except BaseException as e:
            errors.append(e)
        got[into] = bytes(buf)

    threads = [
        threading.Thread(target=send, args=(a,)),
        threading.Thread(target=send, args=(b,)),
        threading.Thread(target=recv, args=(b, id(a))),
        threading.Thread(target=recv, args=(a, id(b))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT + 5)
    assert not any(t.is_alive() for t in threads), "transfer hung"
    assert not errors, errors
    for who in (id(a), id(b)):
        assert len(got[who]) == PAYLOAD, f"got {len(got[who])} of {PAYLOAD} bytes"
        assert got[who] == data[who], "payload corrupted"


@FAMILIES
def test_redirected_bytes_skip_tcp(attached: Programs, maps, pair, family: int, lo: str) -> None:
    cli, srv = pair(family, lo)
    maps.put_sock("tether_socks", own_tuple(cli), cli)
    maps.put_sock("tether_socks", own_tuple(srv), srv)
    assert {bytes(own_tuple(cli)), bytes(own_tuple(srv))} <= set(maps.keys("tether_socks"))
    exchange(cli, srv)
    time.sleep(0.2)  # room for any late ACK to show up
    for s in (cli, srv):
        assert tcpi(s, TCPI_BYTES_ACKED) < NEAR_ZERO, "bytes went through TCP"
        assert tcpi(s, TCPI_BYTES_RECEIVED) < NEAR_ZERO, "bytes went through TCP"


@FAMILIES
def test_without_sockhash_bytes_cross_tcp(
    attached: Programs, pair, family: int, lo: str, wait_for
) -> None:
    """Control: the same transfer outside tether_socks does move the bytes over TCP."""
    cli, srv = pair(family, lo)
    exchange(cli, srv)
    for s in (cli, srv):
        assert tcpi(s, TCPI_BYTES_RECEIVED) >= PAYLOAD
        # the last (possibly delayed) ACK may still be on its way
        wait_for(lambda s=s: tcpi(s, TCPI_BYTES_ACKED) >= PAYLOAD, what="all bytes acked")


@FAMILIES
def test_peer_missing_from_sockhash_falls_back_to_tcp(
    attached: Programs, maps, pair, family: int, lo: str, wait_for
) -> None:
    cli, srv = pair(family, lo)
    maps.put_sock("tether_socks", own_tuple(cli), cli)  # the server end is not in the map
    exchange(cli, srv)
    for s in (cli, srv):
        assert tcpi(s, TCPI_BYTES_RECEIVED) >= PAYLOAD
        wait_for(lambda s=s: tcpi(s, TCPI_BYTES_ACKED) >= PAYLOAD, what="all bytes acked")
