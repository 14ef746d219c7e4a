"""The one address normaliser.  The kernel hands the agent IPv4 as
IPv4-mapped IPv6 on dual-stack sockets (`::ffff:10.0.0.1`); every lookup,
log line and policy match uses the plain form, so they agree."""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

HBONE_PORT = 15008  # every mesh pod's inbound HBONE (Istio ambient)


# Cached: every connection asks for the same few pod and node addresses
# several times over (socket names, the authority, the datapath's keys), and
# ipaddress parses text in Python.  A text that is no address raises and is
# not cached; the cache holds at most ADDR_CACHE answers, least recent out.
ADDR_CACHE = 4096


@functools.lru_cache(maxsize=ADDR_CACHE)
def norm_ip(ip: str) -> str:
    """Canonical text of an address, IPv4-mapped IPv6 folded to IPv4.
    Raises ValueError for text that is no address."""
    a = ipaddress.ip_address(ip)
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped:
        return str(a.ipv4_mapped)
    return str(a)


def plain(addr: tuple[Any, ...]) -> tuple[str, int]:
    """(host, port) of a socket address (2- or 4-tuple), IPv4-mapped shown as IPv4."""
    host = str(addr[0])
    with contextlib.suppress(ValueError):
        host = norm_ip(host)
    return host, int(addr[1])


def family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def format_authority(ip: str, port: int) -> str:
    """`ip:port`, IPv6 in brackets (HBONE's :authority, access logs, errors)."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def same_family(addresses: Iterable[str], like: str) -> str:
    """The first of `addresses` in the family of `like` (else the first)."""
    want = ipaddress.ip_address(like).version
    addrs = list(addresses)
    for a in addrs:
        if ipaddress.ip_address(a).version == want:
            return a
    return addrs[0]
