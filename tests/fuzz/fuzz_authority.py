"""Fuzz target: the HBONE `:authority` parser (agent.tunnel.hbone.parse_authority).

parse_authority must return (ip, port) with a valid IP and a port in 1..65535,
or raise ValueError; what it accepts must survive format_authority and parse
again unchanged.

    python -m tests.fuzz.fuzz_authority -runs=100000 tests/fuzz/corpus/authority
"""

from __future__ import annotations

import ipaddress
import sys

import atheris

with atheris.instrument_imports():
    from agent.tunnel.hbone import format_authority, parse_authority

from tests.fuzz._common import STRUCTURED, check, text

PIECES = (
    "[",
    "]",
    ":",
    "%",
    ".",
    "10.0.0.1",
    "::",
    "::1",
    "fd00::1",
    "::ffff:10.0.0.1",
    "fe80::1%eth0",
    "1.2.3.4",
    "80",
    "0",
    "65535",
    "65536",
    "08",
    "٣",
    "²",
    "-1",
    "+1",
    " ",
)


def authority_from(fdp: atheris.FuzzedDataProvider) -> str:
    if fdp.ConsumeBool():
        return str(fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 64)))
    return "".join(text(fdp, PIECES) for _ in range(fdp.ConsumeIntInRange(1, 6)))


def TestOneInput(data: bytes) -> None:
    if data[:1] == STRUCTURED:
        value = authority_from(atheris.FuzzedDataProvider(data[1:]))
    else:
        value = data.decode("utf-8", "replace")
    try:
        ip, port = parse_authority(value)
    except ValueError:
        return
    check(isinstance(ip, str) and type(port) is int, f"{value!r} -> {(ip, port)!r}")
    check(0 < port < 65536, f"{value!r}: port {port} out of range")
    parsed = ipaddress.ip_address(ip)
    check(str(parsed) == ip, f"{value!r}: ip {ip!r} is not canonical")
    again = format_authority(ip, port)
    try:
        back = parse_authority(again)
    except ValueError as e:
        raise AssertionError(f"{value!r} -> {again!r} does not parse again: {e}") from e
    check(back == (ip, port), f"{value!r} -> {again!r} -> {back!r}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
