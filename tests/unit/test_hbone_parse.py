"""HBONE request parsing and building (agent.tunnel.hbone): tables for the cases
ztunnel's wire format fixes, and properties that must hold for any input a peer
can send: a request either names this destination or is refused with 400,
never anything else.
"""

from __future__ import annotations

import ipaddress
import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.tunnel.hbone import (
    HboneError,
    check_request,
    format_authority,
    parse_authority,
    request_headers,
)

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01")
FORWARDED = re.compile(r'for="(?P<addr>[^"]+)"(;host=(?P<host>[^;,]+))?')

ips = st.ip_addresses()
ports = st.integers(min_value=1, max_value=65535)


def connect(authority: str, *extra: tuple[str, str]) -> list[tuple[str, str]]:
    return [(":method", "CONNECT"), (":authority", authority), *extra]


# -- parse_authority / format_authority -------------------------------------------------


@pytest.mark.parametrize(
    ("value", "want"),
    [
        ("10.0.0.1:8080", ("10.0.0.1", 8080)),
        ("10.0.0.1:1", ("10.0.0.1", 1)),
        ("10.0.0.1:65535", ("10.0.0.1", 65535)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("[fd00::1]:15008", ("fd00::1", 15008)),
        ("[::1]:80", ("::1", 80)),
        ("[FD00:0:0::1]:80", ("fd00::1", 80)),  # canonical form out
        ("[::]:443", ("::", 443)),
    ],
)
def test_parse_authority_accepts(value: str, want: tuple[str, int]) -> None:
    assert parse_authority(value) == want


@pytest.mark.parametrize(
    "value",
    [
        "",
        ":",
        ":80",
        "10.0.0.1",
        "10.0.0.1:",
        "10.0.0.1:0",
        "10.0.0.1:65536",
        "10.0.0.1:-1",
        "10.0.0.1:+80",
        "10.0.0.1: 80",
        "10.0.0.1:80 ",
        "10.0.0.1:8o",
        "10.0.0.1:0x50",
        "10.0.0.256:80",
        "010.0.0.1:80",  # leading zeros are ambiguous (octal): refused
        "10.0.0:80",
        "host.example:80",
        "svc.ns.svc.cluster.local:8080",  # double HBONE host form is not a pod address
        "fd00::1:80",  # IPv6 must be bracketed
        "::1:80",
        "[fd00::1]",
        "[fd00::1]80",
        "[fd00::1]:",
        "[fd00::1:80",
        "[10.0.0.1]:80",  # brackets are for IPv6 only
        "[]:80",
        "[fd00::1]:80:80",
        "10.0.0.1:80:80",
        "10.0.0.1:" + "9" * 5000,
        "10.0.0.1:\u00b2",  # superscript two: str.isdigit() says yes, int() says no
    ],
)
def test_parse_authority_rejects_with_value_error(value: str) -> None:
    with pytest.raises(ValueError):
        parse_authority(value)


@pytest.mark.parametrize(
    "value", ["10.0.0.1:\uff18\uff10", "10.0.0.1:\u0668\u0660", "[fd00::1]:\u0968\u0966"]
)
def test_parse_authority_rejects_non_ascii_port_digits(value: str) -> None:
    with pytest.raises(ValueError):
        parse_authority(value)


@pytest.mark.parametrize(
    ("ip", "port", "text"),
    [
        ("10.0.0.1", 80, "10.0.0.1:80"),
        ("fd00::1", 15008, "[fd00::1]:15008"),
        ("::ffff:10.0.0.1", 80, "[::ffff:10.0.0.1]:80"),
    ],
)
def test_format_authority(ip: str, port: int, text: str) -> None:
    assert format_authority(ip, port) == text


@PROPS
@given(ip=ips, port=ports)
def test_authority_round_trip(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> None:
    text = format_authority(str(ip), port)
    assert parse_authority(text) == (str(ip), port)
    assert (text.startswith("[")) == (ip.version == 6)


@PROPS
@given(st.text(max_size=60))
@example("[")
@example("[]")
@example("[:]:1")
@example("[fe80::1%]:80")
@example("1.2.3.4:\u00b2")
@example("\x00:1")
def test_parse_authority_garbage_only_raises_value_error(value: str) -> None:
    try:
        ip, port = parse_authority(value)
    except ValueError:
        return
    # whatever was accepted is an address and a real port
    assert 0 < port < 65536
    ipaddress.ip_address(ip)


@PROPS
@given(ip=ips, port=ports, junk=st.text(alphabet="[]:.0123456789abcdefABCDEF%/ x-", max_size=24))
def test_parse_authority_mutations_only_raise_value_error(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, junk: str
) -> None:
    text = format_authority(str(ip), port)
    for candidate in (
        junk + text,
        text + junk,
        text[: len(junk)] + junk,
        junk.join(text.rsplit(":", 1)),
    ):
        try:
            got_ip, got_port = parse_authority(candidate)
        except ValueError:
            continue
        assert 0 < got_port < 65536
        ipaddress.ip_address(got_ip)


# -- check_request ---------------------------------------------------------------------------


LOCAL4 = "10.10.2.2"
LOCAL6 = "fd00:10:2::2"


@pytest.mark.parametrize(
    ("headers", "local", "want"),
    [
        (connect("10.10.2.2:8080"), LOCAL4, ("10.10.2.2", 8080)),
        (connect("[fd00:10:2::2]:8080"), LOCAL6, ("fd00:10:2::2", 8080)),
        # the local address as an IPv4-mapped IPv6 socket address folds to IPv4
        (connect("10.10.2.2:8080"), "::ffff:10.10.2.2", ("10.10.2.2", 8080)),
        # ordinary headers, even repeated, do not matter
        (
            connect("10.10.2.2:1", ("baggage", "a=1"), ("baggage", "b=2"), ("x-any", "")),
            LOCAL4,
            ("10.10.2.2", 1),
        ),
        # the pseudo-headers may come in any order
        ([(":authority", "10.10.2.2:80"), (":method", "CONNECT")], LOCAL4, ("10.10.2.2", 80)),
    ],
)
def test_check_request_accepts(
    headers: list[tuple[str, str]], local: str, want: tuple[str, int]
) -> None:
    assert check_request(headers, local) == want


@pytest.mark.parametrize(
    ("headers", "local", "why"),
    [
        ([], LOCAL4, "not CONNECT"),
        ([(":authority", "10.10.2.2:80")], LOCAL4, "not CONNECT"),
        (connect("10.10.2.2:80")[:1], LOCAL4, "missing :authority"),
        ([(":method", "GET"), (":authority", "10.10.2.2:80")], LOCAL4, "not CONNECT"),
        ([(":method", "connect"), (":authority", "10.10.2.2:80")], LOCAL4, "not CONNECT"),
        (
            [
                (":method", "POST"),
                (":authority", "10.10.2.2:80"),
                (":path", "/"),
                (":scheme", "https"),
            ],
            LOCAL4,
            "not CONNECT",
        ),
        (connect("10.10.2.2:80", (":path", "/")), LOCAL4, "no :path or :scheme"),
        (connect("10.10.2.2:80", (":scheme", "https")), LOCAL4, "no :path or :scheme"),
        (connect("10.10.2.2:80", (":path", "")), LOCAL4, "no :path or :scheme"),
        (connect("10.10.2.2:80", (":method", "CONNECT")), LOCAL4, "duplicate pseudo-header"),
        (
            connect("10.10.2.2:80", (":authority", "10.10.2.2:80")),
            LOCAL4,
            "duplicate pseudo-header",
        ),
        # a later duplicate must not override a first, acceptable, value
        (
            connect("10.10.2.2:80", (":authority", "10.10.2.3:80")),
            LOCAL4,
            "duplicate pseudo-header",
        ),
        (connect("10.10.2.3:8080"), LOCAL4, "is not this destination"),
        (connect("10.99.99.99:8080"), LOCAL4, "is not this destination"),
        (connect("[fd00:10:2::3]:8080"), LOCAL6, "is not this destination"),
        (connect("10.10.2.2:8080"), LOCAL6, "is not this destination"),
        (connect("[fd00:10:2::2]:8080"), LOCAL4, "is not this destination"),
        (connect("[fe80::1%eth0]:8080"), "fe80::1", "is not this destination"),
        (connect("10.10.2.2"), LOCAL4, "expected ip:port"),
        (connect("10.10.2.2:0"), LOCAL4, "bad port"),
        (connect("10.10.2.2:99999"), LOCAL4, "bad port"),
        (connect(""), LOCAL4, "expected ip:port"),
        (connect("b.shop.svc.cluster.local:8080"), LOCAL4, "does not appear to be"),
        (connect("fd00:10:2::2:8080"), LOCAL6, ""),
    ],
)
def test_check_request_refuses_with_400(
    headers: list[tuple[str, str]], local: str, why: str
) -> None:
    with pytest.raises(HboneError) as ei:
        check_request(headers, local)
    assert ei.value.status == 400
    assert why in str(ei.value)


@pytest.mark.parametrize("local", ["10.10.2.2", "::ffff:10.10.2.2"])
def test_check_request_folds_v4_mapped_authority(local: str) -> None:
    """'[::ffff:a.b.c.d]:p' names the same destination as 'a.b.c.d:p'."""
    ip, port = check_request(connect("[::ffff:10.10.2.2]:8080"), local)
    assert port == 8080
    a = ipaddress.ip_address(ip)
    assert (a.ipv4_mapped if isinstance(a, ipaddress.IPv6Address) else a) == ipaddress.IPv4Address(
        "10.10.2.2"
    )


@PROPS
@given(ip=ips, port=ports, mapped=st.booleans())
def test_check_request_accepts_its_own_address(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int, mapped: bool
) -> None:
    """An authority naming the connection's own address (as the socket reports
    it, IPv4 possibly as IPv4-mapped IPv6) is accepted and returned with
    IPv4-mapped addresses folded to IPv4, the form delivery and bypass use."""
    local = f"::ffff:{ip}" if mapped and ip.version == 4 else str(ip)
    folded = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
    assert check_request(connect(format_authority(str(ip), port)), local) == (str(folded), port)


@PROPS
@given(ip=ips, other=ips, port=ports)
def test_check_request_refuses_any_other_address(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    other: ipaddress.IPv4Address | ipaddress.IPv6Address,
    port: int,
) -> None:
    if ip == other:
        return
    if isinstance(other, ipaddress.IPv6Address) and other.ipv4_mapped == ip:
        return  # the same destination, differently spelt
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped == other:
        return
    with pytest.raises(HboneError) as ei:
        check_request(connect(format_authority(str(other), port)), str(ip))
    assert ei.value.status == 400


PSEUDO = st.sampled_from(
    [":method", ":authority", ":path", ":scheme", ":protocol", ":status", ":Method", ":"]
)
NAMES = st.one_of(
    PSEUDO, st.sampled_from(["baggage", "forwarded", "traceparent", "host"]), st.text(max_size=12)
)
VALUES = st.one_of(
    st.sampled_from(
        [
            "CONNECT",
            "GET",
            "connect",
            "10.10.2.2:8080",
            "[fd00:10:2::2]:8080",
            "10.10.2.2:0",
            "/",
            "https",
            "",
            "10.10.2.3:80",
        ]
    ),
    st.text(max_size=30),
)
HEADER_LISTS = st.lists(st.tuples(NAMES, VALUES), max_size=8)


@PROPS
@given(headers=HEADER_LISTS, local=st.sampled_from([LOCAL4, LOCAL6, "::ffff:10.10.2.2"]))
@example(headers=connect("10.10.2.2:8080"), local=LOCAL4)
@example(headers=[(":method", "CONNECT"), (":authority", "10.10.2.2:\u0668\u0660")], local=LOCAL4)
def test_check_request_any_header_list_is_a_target_or_a_400(
    headers: list[tuple[str, str]], local: str
) -> None:
    try:
        ip, port = check_request(headers, local)
    except HboneError as e:
        assert e.status == 400, e
        return
    # accepted: exactly one CONNECT, one authority naming this address, no :path/:scheme
    pseudo = [k for k, _ in headers if k.startswith(":")]
    assert len(pseudo) == len(set(pseudo))
    d = dict(headers)
    assert d[":method"] == "CONNECT"
    assert ":path" not in d and ":scheme" not in d
    here = ipaddress.ip_address(local)
    folded = here.ipv4_mapped if isinstance(here, ipaddress.IPv6Address) else None
    assert ipaddress.ip_address(ip) in (here, folded)
    assert 0 < port < 65536


@PROPS
@given(headers=HEADER_LISTS, ip=ips, port=ports, at=st.integers(min_value=0, max_value=8))
def test_check_request_valid_request_with_noise_is_a_target_or_a_400(
    headers: list[tuple[str, str]],
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    port: int,
    at: int,
) -> None:
    base = connect(format_authority(str(ip), port))
    mixed = [*headers[:at], *base, *headers[at:]]
    try:
        got = check_request(mixed, str(ip))
    except HboneError as e:
        assert e.status == 400
        # refused only for a reason in the noise: a pseudo-header
        assert any(k.startswith(":") for k, _ in headers)
        return
    folded = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip
    assert got == (str(folded), port)


# -- request_headers ------------------------------------------------------------------------


def test_request_headers_shape() -> None:
    hs = request_headers(
        "10.10.2.2:8080",
        ("10.10.1.2", 40000),
        namespace="shop",
        workload="a",
        service_host="b.shop.svc.cluster.local",
        cluster="Kubernetes",
    )
    names = [k for k, _ in hs]
    assert names[:2] == [":method", ":authority"], "pseudo-headers come first"
    assert len(names) == len(set(names))
    d = dict(hs)
    assert d[":method"] == "CONNECT"
    assert d[":authority"] == "10.10.2.2:8080"
    assert ":path" not in d and ":scheme" not in d
    assert TRACEPARENT.fullmatch(d["traceparent"]), d["traceparent"]
    assert d["forwarded"] == 'for="10.10.1.2:40000";host=b.shop.svc.cluster.local'
    bag = dict(kv.split("=", 1) for kv in d["baggage"].split(","))
    assert bag == {
        "k8s.cluster.name": "Kubernetes",
        "k8s.namespace.name": "shop",
        "k8s.deployment.name": "a",
        "service.name": "a",
        "service.version": "latest",
    }
    # what we send is what a destination accepts
    assert check_request(hs, "10.10.2.2") == ("10.10.2.2", 8080)


def test_request_headers_ipv6_source_is_bracketed_and_empty_fields_left_out() -> None:
    d = dict(request_headers("[fd00:10:2::2]:8080", ("fd00:10:1::2", 5)))
    assert d["forwarded"] == 'for="[fd00:10:1::2]:5"'
    assert "k8s.namespace.name" not in d["baggage"]
    assert "k8s.deployment.name" not in d["baggage"]
    assert "service.name" not in d["baggage"]
    assert "k8s.cluster.name=Kubernetes" in d["baggage"]
    assert "baggage" in d and "traceparent" in d


def test_traceparent_is_random_per_connection() -> None:
    seen = {dict(request_headers("10.0.0.1:1", ("10.0.0.2", 1)))["traceparent"] for _ in range(50)}
    assert len(seen) == 50
    trace_ids = {t.split("-")[1] for t in seen}
    span_ids = {t.split("-")[2] for t in seen}
    assert len(trace_ids) == 50 and len(span_ids) == 50


@PROPS
@given(
    dst=ips,
    dport=ports,
    src=ips,
    sport=st.integers(min_value=0, max_value=65535),
    ns=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", max_size=20),
    wl=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", max_size=20),
)
def test_request_headers_properties(
    dst: ipaddress.IPv4Address | ipaddress.IPv6Address,
    dport: int,
    src: ipaddress.IPv4Address | ipaddress.IPv6Address,
    sport: int,
    ns: str,
    wl: str,
) -> None:
    authority = format_authority(str(dst), dport)
    hs = request_headers(authority, (str(src), sport), namespace=ns, workload=wl)
    d = dict(hs)
    assert {"baggage", "forwarded", "traceparent"} <= d.keys()
    assert TRACEPARENT.fullmatch(d["traceparent"])
    m = FORWARDED.fullmatch(d["forwarded"])
    assert m is not None, d["forwarded"]
    addr = m["addr"]
    assert addr.startswith("[") == (src.version == 6)
    if sport:
        assert parse_authority(addr) == (str(src), sport)
    assert m["host"] is None
    folded = dst.ipv4_mapped if isinstance(dst, ipaddress.IPv6Address) and dst.ipv4_mapped else dst
    assert check_request(hs, str(dst)) == (str(folded), dport)
    assert (f"k8s.namespace.name={ns}" in d["baggage"]) == bool(ns)
