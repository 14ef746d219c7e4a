"""netns tier: tether's HBONE against Istio's own HBONE code, both ways.

`tests/interop/hbone-peer` wraps istio.io/istio/pkg/hbone — the Go dialer
and server Istio's test workloads use against ztunnel, on Go's HTTP/2 and
TLS stacks — built from Go modules by `tests/interop/build.sh`.  So the wire
format tether speaks (HTTP/2 CONNECT over mutual TLS 1.3 on 15008, ALPN h2,
SPIFFE SVIDs, `:authority` ip:port) is checked against a peer that tether's
authors did not write:

- Istio's dialer, from a pod on a node with no agent, through tether's
  inbound 15008 to an enrolled pod: echo, the client's source IP kept, the
  client's identity in the destination agent's record;
- tether's outbound, from an enrolled pod, to Istio's server standing in for
  a remote ztunnel on the destination pod's 15008: echo, each side sees the
  other's SPIFFE identity.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.identity.ca import CertificateAuthority
from agent.identity.spiffe import SpiffeId
from agent.identity.svid import Svid, generate_key, utcnow
from agent.sim.harness import AgentNode, cluster_nodes
from agent.sim.topology import Pod, Testbed

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="netns tier needs root")

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "tests" / "interop" / "build.sh"
TD = "cluster.local"
SA_B = SpiffeId(TD, "shop", "sa-b")
SA_A = SpiffeId(TD, "shop", "sa-a")
SA_X = SpiffeId(TD, "legacy", "sa-x")
SA_Z = SpiffeId(TD, "shop", "sa-z")


@pytest.fixture(scope="module")
def peer_bin() -> str:
    if shutil.which("go") is None and not Path("/usr/local/go/bin/go").exists():
        pytest.skip("no Go toolchain to build Istio's HBONE peer (tests/interop/build.sh)")
    r = subprocess.run([str(BUILD)], capture_output=True, text=True, timeout=900, check=False)
    assert r.returncode == 0, f"tests/interop/build.sh failed:\n{r.stderr[-3000:]}"
    return r.stdout.strip().splitlines()[-1]


@dataclass
class Interop:
    tb: Testbed
    n1: AgentNode
    n2: AgentNode
    n3: AgentNode  # no agent: Istio's peer stands in on its pods
    a: Pod
    b: Pod
    x: Pod
    z: Pod
    ca: CertificateAuthority
    certs: Path


@pytest.fixture(scope="module")
def interop() -> Iterator[Interop]:
    with (
        cluster_nodes("node1", "node2", "node3") as (cluster, (n1, n2, n3)),
        tempfile.TemporaryDirectory(prefix=f"tether-{cluster.tb.prefix}-") as d,
    ):
        a = n1.add_pod("a", "shop", "sa-a")
        b = n2.add_pod("b", "shop", "sa-b")
        x = n3.add_pod("x", "legacy", "sa-x")
        z = n3.add_pod("z", "shop", "sa-z")
        n1.enroll_namespace("shop")
        ca = CertificateAuthority.load_or_generate(cluster.ca_dir)
        n2.serve(b, 8080)
        n3.serve(z, 8080)
        n1.start_agent()
        n2.start_agent()
        yield Interop(cluster.tb, n1, n2, n3, a, b, x, z, ca, Path(d))


def _svid_files(m: Interop, ident: SpiffeId) -> list[str]:
    key = generate_key()
    svid = Svid(ident, key, (m.ca.issue(key.public_key(), ident, None),), m.ca.roots, utcnow())
    base = m.certs / ident.service_account
    (base.with_suffix(".crt")).write_bytes(svid.chain_pem())
    (base.with_suffix(".key")).write_bytes(svid.key_pem())
    (m.certs / "ca.crt").write_bytes(svid.roots_pem())
    return [
        "--cert",
        str(base.with_suffix(".crt")),
        "--key",
        str(base.with_suffix(".key")),
        "--ca",
        str(m.certs / "ca.crt"),
    ]


def _line_from(p: subprocess.Popen[bytes], prefix: bytes, limit: int = 50) -> bytes:
    """The first stdout line starting with prefix (Istio's logger shares stdout)."""
    assert p.stdout is not None
    for _ in range(limit):
        line = p.stdout.readline()
        if not line:
            err = p.stderr.read().decode()[-2000:] if p.stderr else ""
            raise AssertionError(f"hbone-peer ended before {prefix!r}: {err}")
        if line.startswith(prefix):
            return line
    raise AssertionError(f"no {prefix!r} line from hbone-peer")


def _records(node: AgentNode, direction: str, timeout: float = 8.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while True:
        got = [c for c in node.status()["connections"]["closed"] if c["direction"] == direction]
        if got or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def _hp(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@pytest.mark.parametrize("family", [4, 6])
def test_istio_hbone_dialer_through_tether_inbound(
    interop: Interop, peer_bin: str, family: int
) -> None:
    m = interop
    b_ip = m.b.ip4 if family == 4 else m.b.ip6
    p = m.tb.spawn(
        m.x,
        [
            peer_bin,
            "dial",
            "--proxy",
            _hp(b_ip, 15008),
            "--target",
            _hp(b_ip, 8080),
            "--expect-id",
            SA_B.uri,
            "--send",
            "istio says hi",
            "--linger",
            *_svid_files(m, SA_X),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert p.stdout is not None and p.stdin is not None
        res = json.loads(_line_from(p, b'{"'))
        assert res["echo"] == "istio says hi", res
        assert res["server_id"] == SA_B.uri, res
        assert res["greeting"]["peer"][0] == (m.x.ip4 if family == 4 else m.x.ip6), (
            "tether delivers with the client's IP"
        )
        # the dialer ended its stream (END_STREAM both ways) while still running
        recs = [r for r in _records(m.n2, "inbound") if r["path"] == "hbone"]
        assert recs, m.n2.status()["connections"]
    finally:
        if p.stdin is not None:
            p.stdin.close()
        p.wait(10)
    r = recs[-1]
    assert (r["src_identity"], r["dst_identity"]) == (SA_X.uri, SA_B.uri), r
    assert r["security"] == "mutual_tls", r
    assert (r["response_flag"], r["error"]) == ("-", None), json.dumps(r)
    assert r["bytes_sent"] == len("istio says hi\n"), r


@pytest.mark.parametrize("family", [4, 6])
def test_tether_outbound_to_istio_hbone_server(
    interop: Interop, peer_bin: str, family: int
) -> None:
    m = interop
    z_ip = m.z.ip4 if family == 4 else m.z.ip6
    srv = m.tb.spawn(
        m.z,
        [
            peer_bin,
            "serve",
            "--listen",
            _hp(z_ip, 15008),
            "--trust-domain",
            TD,
            *_svid_files(m, SA_Z),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _line_from(srv, b"ready")
        r = m.n1.connect(m.a, m.z, family=family, nbytes=1 << 20)
        assert r["ok"], (r, m.n1.connections(), m.n1.log_tail(30))
        out = [c for c in _records(m.n1, "outbound") if c["path"] == "hbone"]
        assert out, m.n1.status()["connections"]
        assert (out[-1]["src_identity"], out[-1]["dst_identity"]) == (SA_A.uri, SA_Z.uri)
        assert out[-1]["bytes_sent"] == 1 << 20 and out[-1]["bytes_received"] >= 1 << 20
    finally:
        srv.terminate()
        log, _ = srv.communicate(timeout=10)
    line = next(ln for ln in log.decode().splitlines() if ln.startswith("CONNECT"))
    # Istio's server saw HTTP/2, the authority tether dialled, and tether's SVID
    assert line.startswith(f"CONNECT HTTP/2.0 {_hp(z_ip, 8080)} from {SA_A.uri} "), line


def test_istio_server_graceful_shutdown_lets_tethers_in_flight_stream_finish(
    interop: Interop, peer_bin: str
) -> None:
    """Go's http.Server.Shutdown mid-stream: GOAWAY(NO_ERROR), then the open
    stream is let finish.  h2 closed its whole connection state on any
    GOAWAY, so the stream's next DATA or WINDOW_UPDATE was a protocol error
    and tether killed it; now it runs to a byte-exact end (the echo of every
    byte is checked by the client), the connection leaves tether's pool, and
    Istio's server completes its drain."""
    m = interop
    srv = m.tb.spawn(
        m.z,
        [
            peer_bin,
            "serve",
            "--listen",
            _hp(m.z.ip4, 15008),
            "--trust-domain",
            TD,
            *_svid_files(m, SA_Z),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        _line_from(srv, b"ready")
        client = m.n1.spawn_peer(
            m.a,
            ["connect", m.z.ip4, "8080", "--bytes", str(1 << 20), "--hold", "4", "--timeout", "10"],
        )
        _line_from(srv, b"CONNECT")
        time.sleep(1.5)  # mid-hold: echo exchanges are in flight both ways
        srv.send_signal(signal.SIGUSR1)
        _line_from(srv, b"draining")
        out, err = client.communicate(timeout=30)
        res = json.loads(out.decode().strip().splitlines()[-1])
        assert res["ok"], (res, err.decode()[-1000:], m.n1.log_tail(30))
        drained = _line_from(srv, b"drained")
        assert drained.strip() == b"drained <nil>", drained
    finally:
        if srv.poll() is None:
            srv.kill()
        srv.wait(10)
    recs = [
        r
        for r in _records(m.n1, "outbound")
        if r["path"] == "hbone" and r["dst"] == _hp(m.z.ip4, 8080)
    ]
    assert recs, m.n1.connections()
    assert (recs[-1]["response_flag"], recs[-1]["error"]) == ("-", None), recs[-1]
    assert recs[-1]["bytes_sent"] >= 1 << 20 and recs[-1]["bytes_received"] >= 1 << 20
    assert "protocol error" not in m.n1.log_tail(200).lower()
