"""Delivery to the app inside the destination pod, keeping the client's
source IP (IP_TRANSPARENT + SO_MARK, routed back by agent.datapath.podnet),
and the two ways bytes then move: a socket relay or an HBONE stream bridge.
Used by every inbound path and by same-node connections."""

from __future__ import annotations

import contextlib
import socket

from agent import netns
from agent.model import family, plain
from agent.tunnel.bridge import Bridge
from agent.tunnel.conns import Connection, ConnTable
from agent.tunnel.context import DeliveryBypass, PodRef
from agent.tunnel.h2conn import H2Stream
from agent.tunnel.hbone import CONNECT_TIMEOUT
from agent.tunnel.relay import Relay, connect, tcp_socket

IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
DELIVERY_MARK = 0x539  # the same mark agent.datapath.podnet routes back to the agent


async def deliver(
    pod: PodRef, bypass: DeliveryBypass, src_ip: str, dst: tuple[str, int]
) -> tuple[socket.socket, tuple[str, int]]:
    """Connect to the app from inside the pod, with the client's source IP.
    Returns the socket and the source address the app sees."""
    fam = family(dst[0])
    with netns.entered(pod.netns):
        app = tcp_socket(fam)
    try:
        app.setblocking(False)
        if fam == socket.AF_INET:
            app.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        else:
            app.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        app.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, DELIVERY_MARK)
        if family(src_ip) != fam:  # an IPv4 client reaching an IPv6 target
            src_ip = f"::ffff:{src_ip}" if fam == socket.AF_INET6 else dst[0]
        app.bind((src_ip, 0))
        local = plain(app.getsockname())
        # Stays until the connection ends (undeliver): the datapath also
        # uses it to recognise this hop for sk_msg when it is established.
        bypass.add(local, dst)
        try:
            await connect(app, dst, CONNECT_TIMEOUT)
        except BaseException:
            bypass.remove(local, dst)
            raise
    except BaseException:
        app.close()
        raise
    return app, local


def undeliver(bypass: DeliveryBypass, c: Connection) -> None:
    if c.delivered_as is not None:
        with contextlib.suppress(OSError):
            bypass.remove(c.delivered_as, c.dst)


async def run_relay(
    conns: ConnTable, bypass: DeliveryBypass, c: Connection, a: socket.socket, b: socket.socket
) -> None:
    """Relay two sockets until both ends are done; a frozen relay (handoff)
    is neither ended nor undelivered: the successor carries it on."""
    r = Relay(c.record())
    c.relay = r
    c.kill = r.kill
    try:
        await r.start(a, b)
        await r.done
    finally:
        if not r.frozen:
            undeliver(bypass, c)
            conns.end(c, None)


async def run_bridge(
    conns: ConnTable,
    bypass: DeliveryBypass,
    c: Connection,
    sock: socket.socket,
    stream: H2Stream,
    initiator: str,
    sent: int = 0,
) -> None:
    """`sent`: bytes of the socket's already sent on the stream (early data)."""
    b = Bridge(stream, initiator=initiator)
    b.from_socket = sent
    c.relay = b
    c.kill = b.close
    try:
        await b.start(sock)
        await b.done
    finally:
        undeliver(bypass, c)
        conns.end(c, str(b.error) if b.error else None)
