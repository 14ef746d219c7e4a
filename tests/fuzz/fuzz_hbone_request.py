"""Fuzz target: the HBONE CONNECT request check (agent.tunnel.hbone.check_request).

The request headers come off the wire from any peer that reaches port 15008.
check_request must return the (ip, port) the CONNECT names, which is the
address the connection came to, or raise HboneError with status 400; any other
exception (or a malformed return) is a finding.

    python -m tests.fuzz.fuzz_hbone_request -runs=100000 tests/fuzz/corpus/hbone_request
"""

from __future__ import annotations

import ipaddress
import sys

import atheris

with atheris.instrument_imports():
    from agent.tunnel.hbone import HboneError, check_request, format_authority

from tests.fuzz._common import STRUCTURED, check, pick, text

LOCAL_IPS = ("10.0.0.1", "fd00::1", "::ffff:10.0.0.1", "fe80::1%eth0", "0.0.0.0", "::")
NAMES = (
    ":method",
    ":authority",
    ":protocol",
    ":scheme",
    ":path",
    ":status",
    "baggage",
    "forwarded",
    "traceparent",
    "content-length",
    "host",
    ":METHOD",
    "",
)
METHODS = ("CONNECT", "GET", "POST", "connect", "CONNECT ", "")


def _authority(fdp: atheris.FuzzedDataProvider, local_ip: str) -> str:
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind == 0:  # well formed, to this address or a near one
        ip = pick(fdp, (local_ip, *LOCAL_IPS, "10.0.0.01", "[10.0.0.1]", "fd00:0::1"))
        port = pick(fdp, (1, 80, 15008, 65535, 0, 65536, -1, "08", "٣", "", " 80", "80 "))
        return f"{ip}:{port}" if fdp.ConsumeBool() else format_authority(ip, 1) + str(port)
    if kind == 1:
        return format_authority(local_ip, fdp.ConsumeIntInRange(-2, 70000))
    return text(fdp, ("[", "]", ":", "[::1]:", "10.0.0.1:", "[fd00::1]:80"))


def headers_from(fdp: atheris.FuzzedDataProvider) -> tuple[list[tuple[str, str]], str]:
    local_ip = pick(fdp, LOCAL_IPS)
    headers: list[tuple[str, str]] = []
    if fdp.ConsumeProbability() < 0.8:
        headers.append((":method", pick(fdp, METHODS)))
    if fdp.ConsumeProbability() < 0.8:
        headers.append((":authority", _authority(fdp, local_ip)))
    for _ in range(fdp.ConsumeIntInRange(0, 6)):
        name = text(fdp, NAMES)
        if name == ":method":
            v = pick(fdp, METHODS)
        elif name == ":authority":
            v = _authority(fdp, local_ip)
        else:
            v = text(fdp, ("CONNECT", "connect-tcp", "https", "/", 'for="10.0.0.2:1"'))
        headers.insert(fdp.ConsumeIntInRange(0, len(headers)), (name, v))
    return headers, local_ip


def headers_from_text(data: bytes) -> tuple[list[tuple[str, str]], str]:
    """The corpus format: the local IP on the first line, then one header a
    line, name and value separated by the first space."""
    lines = data.decode("utf-8", "replace").split("\n")
    headers = []
    for line in lines[1:]:
        name, _, v = line.partition(" ")
        headers.append((name, v))
    return headers, lines[0]


def TestOneInput(data: bytes) -> None:
    if data[:1] == STRUCTURED:
        headers, local_ip = headers_from(atheris.FuzzedDataProvider(data[1:]))
    else:
        headers, local_ip = headers_from_text(data)
        try:
            ipaddress.ip_address(local_ip)
        except ValueError:
            return  # the local address comes from the kernel, not the peer
    try:
        ip, port = check_request(headers, local_ip)
    except HboneError as e:
        check(e.status == 400, f"HboneError status {e.status}, expected 400")
        return
    check(isinstance(ip, str) and type(port) is int, f"returned {(ip, port)!r}")
    check(0 < port < 65536, f"port {port} out of range")
    want = ipaddress.ip_address(local_ip)
    if isinstance(want, ipaddress.IPv6Address) and want.ipv4_mapped:
        want = want.ipv4_mapped
    check(ipaddress.ip_address(ip) == want, f"accepted {ip} arriving at {local_ip}")
    methods = [v for k, v in headers if k == ":method"]
    check(methods == ["CONNECT"], f"accepted :method {methods}")
    check(not any(k in (":path", ":scheme") for k, _ in headers), "accepted :path/:scheme")


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
