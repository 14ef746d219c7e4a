"""netns tier: the inbound HBONE listener (pod b's :15008) against a hand-driven
client — valid and hostile TLS, well-formed and malformed HTTP/2 CONNECT.

The client runs in this test process with a socket made inside pod a's netns
(the process is not in a's cgroup, so connect4 leaves it alone; sk_lookup on
b's side steers :15008 to the agent).  It carries certificates issued here
with the cluster CA (or another CA) and drives `h2` by hand over a blocking
ssl socket.  Every case checks what the client saw (status, reset, TLS
alert), the destination agent's connection record (response_flag), its
Prometheus counters on :15020, and that ordinary captured traffic a -> b
still works afterwards.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from prometheus_client.parser import text_string_to_metric_families

from agent import netns
from agent.identity.ca import CA_KEY_FILE, CertificateAuthority
from agent.identity.spiffe import SpiffeId
from agent.identity.svid import Svid, generate_key, utcnow
from agent.identity.tls import client_context
from agent.sim.harness import AgentNode, Cluster, cluster_nodes
from agent.sim.topology import Pod, Testbed

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="netns tier needs root")

TD = "cluster.local"
SA_A = SpiffeId(TD, "shop", "sa-a")
SA_B = SpiffeId(TD, "shop", "sa-b")
SA_X = SpiffeId(TD, "shop", "sa-x")
IO_TIMEOUT = 5.0
RECORD_TIMEOUT = 8.0
RELOAD_TIMEOUT = 10.0


# -- the testbed ---------------------------------------------------------------------


@dataclass
class Mesh:
    tb: Testbed
    cluster: Cluster
    n1: AgentNode
    n2: AgentNode
    a: Pod
    b: Pod
    ca: CertificateAuthority


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    with cluster_nodes("node1", "node2") as (cluster, (n1, n2)):
        a = n1.add_pod("a", "shop", "sa-a")
        b = n2.add_pod("b", "shop", "sa-b")
        n1.enroll_namespace("shop")
        # the agents load the CA from here; create it first so both share it
        ca = CertificateAuthority.load_or_generate(cluster.ca_dir)
        n2.serve(b, 8080)
        n1.start_agent()
        n2.start_agent()
        yield Mesh(cluster.tb, cluster, n1, n2, a, b, ca)


@pytest.fixture(autouse=True)
def _policies_restored(mesh: Mesh) -> Iterator[None]:
    """Whatever a test does to the policies is undone after it."""
    saved = list(mesh.cluster.policies)
    yield
    if mesh.cluster.policies != saved:
        mesh.cluster.policies[:] = saved
        mesh.cluster.write_configs()
        _wait_policies(mesh, {_key(p) for p in saved})


# -- certificates ------------------------------------------------------------------


def svid_from(
    ca: CertificateAuthority,
    ident: SpiffeId,
    ttl: timedelta | None = None,
    trust: CertificateAuthority | None = None,
) -> Svid:
    """A client SVID signed by `ca`; the client trusts `trust`'s roots (default: ca's)."""
    key = generate_key()
    leaf = ca.issue(key.public_key(), ident, ttl)
    return Svid(ident, key, (leaf,), (trust or ca).roots, utcnow())


def forged_svid(
    mesh: Mesh, sans: list[x509.GeneralName], not_after: datetime | None = None
) -> Svid:
    """A leaf signed by the mesh CA key with arbitrary SANs (what a compromised or
    careless signer could produce): chain-valid, identity not necessarily."""
    ca_key = serialization.load_pem_private_key(
        (Path(mesh.cluster.ca_dir) / CA_KEY_FILE).read_bytes(), None
    )
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = generate_key()
    now = datetime.now(UTC)
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(mesh.ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(not_after or now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    return Svid(SA_X, key, (leaf,), mesh.ca.roots, utcnow())


# -- the HBONE client ----------------------------------------------------------------


def tcp_from(pod: Pod, dst: tuple[str, int]) -> socket.socket:
    with netns.entered(pod.netns_path):
        s = socket.socket(socket.AF_INET6 if ":" in dst[0] else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(IO_TIMEOUT)
    try:
        s.connect(dst)
    except OSError:
        s.close()
        raise
    return s


class TlsRefused(Exception):
    """The server ended the connection during or right after the handshake."""


def tls_from(pod: Pod, dst_ip: str, svid: Svid) -> ssl.SSLSocket:
    raw = tcp_from(pod, (dst_ip, 15008))
    ctx = client_context(svid)
    try:
        tls = ctx.wrap_socket(raw, server_hostname=None)  # no SNI, as ztunnel
    except BaseException:
        raw.close()
        raise
    tls.settimeout(IO_TIMEOUT)
    return tls


def _code_name(code: int) -> str:
    try:
        return h2.errors.ErrorCodes(code).name
    except ValueError:
        return str(code)


class H2Client:
    """A minimal blocking HTTP/2 client: send what the test says, record what comes."""

    def __init__(self, sock: ssl.SSLSocket | socket.socket, validate: bool = True) -> None:
        self.sock = sock
        self.local = sock.getsockname()
        cfg = h2.config.H2Configuration(
            client_side=True,
            header_encoding="utf-8",
            validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
        )
        self.h2 = h2.connection.H2Connection(config=cfg)
        self.responses: dict[int, dict[str, str]] = {}
        self.data: dict[int, bytearray] = defaultdict(bytearray)
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.remote_settings_seen = False
        self.eof = False
        self.error: BaseException | None = None
        self.h2.initiate_connection()
        self.flush()

    @property
    def src(self) -> str:
        return f"{self.local[0]}:{self.local[1]}"

    def flush(self) -> None:
        out = self.h2.data_to_send()
        if out:
            self.sock.sendall(out)

    def pump(self, done: Callable[[], bool], timeout: float = IO_TIMEOUT) -> bool:
        """Read and process until done() or the connection ends or timeout."""
        deadline = time.monotonic() + timeout
        while not done():
            if self.eof or self.error is not None:
                return done()
            left = deadline - time.monotonic()
            if left <= 0:
                return done()
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                return done()
            except (ssl.SSLError, OSError) as e:
                self.error = e
                return done()
            if not data:
                self.eof = True
                return done()
            try:
                events = self.h2.receive_data(data)
            except h2.exceptions.ProtocolError as e:
                self.error = e
                return done()
            for ev in events:
                self._event(ev)
            with contextlib.suppress(OSError):
                self.flush()
        return True

    def _event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.ResponseReceived):
            self.responses[ev.stream_id] = {str(k): str(v) for k, v in ev.headers}
        elif isinstance(ev, h2.events.DataReceived):
            self.data[ev.stream_id] += ev.data
            with contextlib.suppress(h2.exceptions.StreamClosedError, h2.exceptions.ProtocolError):
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            self.ended.add(ev.stream_id)
        elif isinstance(ev, h2.events.StreamReset):
            self.resets[ev.stream_id] = int(ev.error_code)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = ev
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            self.remote_settings_seen = True

    @property
    def gone(self) -> bool:
        return self.eof or self.error is not None or self.goaway is not None

    def ready(self) -> None:
        assert self.pump(lambda: self.remote_settings_seen), self.why()

    def request(self, headers: list[tuple[str, str]], flush: bool = True) -> int:
        sid: int = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, headers)
        if flush:
            self.flush()
        return sid

    def answer(self, sid: int, timeout: float = IO_TIMEOUT) -> str:
        """':status' of the response, 'reset:<code>', or 'closed:<why>'."""
        self.pump(lambda: sid in self.responses or sid in self.resets or self.gone, timeout)
        if sid in self.responses:
            return self.responses[sid].get(":status", "")
        if sid in self.resets:
            return f"reset:{_code_name(self.resets[sid])}"
        return f"closed:{self.why()}"

    def why(self) -> str:
        if self.goaway is not None:
            code = _code_name(int(self.goaway.error_code or 0))
            return f"goaway {code} {self.goaway.additional_data!r}"
        if self.error is not None:
            return f"{type(self.error).__name__}: {self.error}"
        return "eof" if self.eof else "no answer (timeout)"

    def send(self, sid: int, data: bytes) -> None:
        self.h2.send_data(sid, data)
        self.flush()

    def read_exactly(self, sid: int, n: int, timeout: float = IO_TIMEOUT) -> bytes:
        self.pump(lambda: len(self.data[sid]) >= n or sid in self.ended or self.gone, timeout)
        got = bytes(self.data[sid][:n])
        del self.data[sid][:n]
        return got

    def read_line(self, sid: int, timeout: float = IO_TIMEOUT) -> bytes:
        self.pump(lambda: b"\n" in self.data[sid] or sid in self.ended or self.gone, timeout)
        line, _, rest = bytes(self.data[sid]).partition(b"\n")
        self.data[sid][:] = rest
        return line

    def finish(self, sid: int) -> None:
        """End our side of a 200 stream and wait for the app's end: a clean close."""
        self.h2.end_stream(sid)
        self.flush()
        assert self.pump(lambda: sid in self.ended), self.why()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.h2.close_connection()
            self.flush()
        with contextlib.suppress(OSError):
            self.sock.close()


@contextlib.contextmanager
def hbone(mesh: Mesh, svid: Svid, validate: bool = True) -> Iterator[H2Client]:
    tls = tls_from(mesh.a, mesh.b.ip4, svid)
    c = H2Client(tls, validate)
    try:
        yield c
    finally:
        c.close()


def connect_headers(authority: str) -> list[tuple[str, str]]:
    return [
        (":method", "CONNECT"),
        (":authority", authority),
        ("traceparent", f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01"),
    ]


# -- what the destination agent recorded ---------------------------------------------


def records_from(
    node: AgentNode, src: str, n: int = 1, timeout: float = RECORD_TIMEOUT
) -> list[dict[str, Any]]:
    """The destination's closed inbound records whose peer is src, once there are n."""
    deadline = time.monotonic() + timeout
    while True:
        got = [
            c
            for c in node.status()["connections"]["closed"]
            if c["src"] == src and c["direction"] == "inbound"
        ]
        if len(got) >= n or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def metrics(node: AgentNode) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with (
        netns.entered(node.node.netns_path),
        urllib.request.urlopen("http://127.0.0.1:15020/metrics", timeout=5) as r,
    ):
        text = r.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def count(
    m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return sum(
        v
        for (n, lab), v in m.items()
        if n == name and all(dict(lab).get(k) == want for k, want in labels.items())
    )


class Counters:
    """Deltas of the destination's istio_tcp_connections_* counters around a case."""

    DST: ClassVar[dict[str, str]] = {
        "reporter": "destination",
        "destination_workload": "b",
        "destination_workload_namespace": "shop",
    }

    def __init__(self, node: AgentNode) -> None:
        self.node = node
        self.before = metrics(node)

    def delta(self, name: str, **labels: str) -> float:
        after = metrics(self.node)
        lab = {**self.DST, **labels}
        return count(after, name, **lab) - count(self.before, name, **lab)

    def closed(self, flag: str) -> float:
        return self.delta("istio_tcp_connections_closed_total", response_flags=flag)

    def opened(self) -> float:
        return self.delta("istio_tcp_connections_opened_total")


def assert_mesh_still_works(mesh: Mesh) -> None:
    assert mesh.n2.admin("/healthz") == "ok\n"
    assert mesh.n2.agent is not None and mesh.n2.agent.poll() is None, mesh.n2.log_tail()
    r = mesh.n1.connect(mesh.a, mesh.b, nbytes=1 << 16)
    assert r["ok"], (r, mesh.n2.log_tail())
    assert r["server_saw_peer"][0] == mesh.a.ip4


# -- policies -----------------------------------------------------------------------


def _key(doc: dict[str, Any]) -> str:
    return f"{doc['metadata']['namespace']}/{doc['metadata']['name']}"


def _wait_policies(mesh: Mesh, keys: set[str]) -> None:
    deadline = time.monotonic() + RELOAD_TIMEOUT
    for n in (mesh.n1, mesh.n2):
        while True:
            have = {p["key"] for p in n.status()["policies"]["authorizationPolicies"]}
            if have == keys:
                break
            assert time.monotonic() < deadline, (have, keys, n.log_tail())
            time.sleep(0.2)


def set_policies(mesh: Mesh, docs: list[dict[str, Any]]) -> None:
    mesh.cluster.policies[:] = docs
    mesh.cluster.write_configs()
    _wait_policies(mesh, {_key(d) for d in docs if d.get("kind") == "AuthorizationPolicy"})


# -- cases --------------------------------------------------------------------------


def test_valid_connect_gets_200_and_echoes_then_closed_port_gets_503(mesh: Mesh) -> None:
    m = Counters(mesh.n2)
    with hbone(mesh, svid_from(mesh.ca, SA_A)) as c:
        c.ready()
        assert isinstance(c.sock, ssl.SSLSocket)
        assert c.sock.version() == "TLSv1.3"
        assert c.sock.selected_alpn_protocol() == "h2"
        server = x509.load_der_x509_certificate(c.sock.getpeercert(binary_form=True) or b"")
        uris = server.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.UniformResourceIdentifier)
        assert uris == [SA_B.uri], "the destination presents the pod's own identity"

        sid = c.request(connect_headers(f"{mesh.b.ip4}:8080"))
        assert c.answer(sid) == "200"
        hello = c.read_line(sid)
        assert mesh.a.ip4 in hello.decode(), hello  # the app sees a's IP
        payload = os.urandom(200_000)
        c.send(sid, payload)
        assert c.read_exactly(sid, len(payload), timeout=10) == payload

        sid2 = c.request(connect_headers(f"{mesh.b.ip4}:9999"))
        assert c.answer(sid2, timeout=15) == "503", mesh.n2.log_tail(30)  # see below: 10 s
        assert sid2 in c.ended, "a non-200 answer ends the stream"
        # the first stream is unaffected by the second one's failure
        c.send(sid, b"again")
        assert c.read_exactly(sid, 5) == b"again"
        src = c.src
        c.finish(sid)
    recs = records_from(mesh.n2, src, 2)
    by_port = {r["dst"]: r for r in recs}
    ok, uf = by_port[f"{mesh.b.ip4}:8080"], by_port[f"{mesh.b.ip4}:9999"]
    assert ok["response_flag"] == "-" and ok["error"] is None, ok
    assert ok["src_identity"] == SA_A.uri and ok["dst_identity"] == SA_B.uri
    assert ok["security"] == "mutual_tls" and ok["path"] == "hbone"
    assert ok["bytes_received"] >= len(payload) and ok["bytes_sent"] >= len(payload)
    assert uf["response_flag"] == "UF", uf
    assert m.closed("UF") == 1
    assert m.closed("-") >= 1
    assert m.opened() >= 2
    assert_mesh_still_works(mesh)


@pytest.mark.parametrize(
    ("name", "headers"),
    [
        ("authority of the source pod", lambda a, b: connect_headers(f"{a}:8080")),
        ("authority of an unknown IP", lambda a, b: connect_headers("10.99.99.99:8080")),
        ("authority of a hostname", lambda a, b: connect_headers("b.shop.svc:8080")),
        ("missing :authority", lambda a, b: [(":method", "CONNECT")]),
        (
            "GET instead of CONNECT",
            lambda a, b: [
                (":method", "GET"),
                (":authority", f"{b}:8080"),
                (":scheme", "https"),
                (":path", "/"),
            ],
        ),
        (
            "CONNECT with :path",
            lambda a, b: [(":method", "CONNECT"), (":authority", f"{b}:8080"), (":path", "/")],
        ),
        (
            "CONNECT with :scheme",
            lambda a, b: [
                (":method", "CONNECT"),
                (":authority", f"{b}:8080"),
                (":scheme", "https"),
            ],
        ),
    ],
)
def test_bad_requests_are_refused(
    mesh: Mesh, name: str, headers: Callable[[str, str], list[tuple[str, str]]]
) -> None:
    """A request the destination must not serve: never a 200.  Two outcomes,
    depending on who catches it:
    - the agent's check_request: 400 on the stream;
    - h2's inbound validation (what HTTP/2 itself forbids: CONNECT without
      :authority or with :path/:scheme): RST_STREAM PROTOCOL_ERROR, a stream
      error as RFC 9113 §8.1.1 asks (unpatched h2 ended the whole connection).
    Either way the same connection still serves a good request."""
    m = Counters(mesh.n2)
    with hbone(mesh, svid_from(mesh.ca, SA_A), validate=False) as c:
        c.ready()
        sid = c.request(headers(mesh.a.ip4, mesh.b.ip4))
        got = c.answer(sid)
        assert got in ("400", "reset:PROTOCOL_ERROR"), (name, got)
        src = c.src
        if got == "400":
            assert sid in c.ended
        sid2 = c.request(connect_headers(f"{mesh.b.ip4}:8080"))
        assert c.answer(sid2) == "200", c.why()
        assert mesh.a.ip4 in c.read_line(sid2).decode()
        c.finish(sid2)
    recs = records_from(mesh.n2, src, 2 if got == "400" else 1)
    bad = [r for r in recs if (r["error"] or "").startswith("bad request")]
    good = [r for r in recs if r not in bad]
    assert good and good[0]["response_flag"] == "-" and good[0]["error"] is None, good
    if got == "400":
        assert len(bad) == 1, recs
        assert bad[0]["response_flag"] == "-", bad
        assert bad[0]["src_identity"] == SA_A.uri
        assert m.closed("-") == 2
    else:
        assert bad == [], "refused inside h2: no record of its own"
        assert m.closed("-") == 1
    assert_mesh_still_works(mesh)


def test_which_malformed_requests_h2_refuses_before_the_agent(mesh: Mesh) -> None:
    """Pin the split between h2's inbound validation (stream error) and the
    agent's check_request (400), so a change in either is noticed."""
    cases = {
        "missing :authority": [(":method", "CONNECT")],
        "CONNECT with :path": [
            (":method", "CONNECT"),
            (":authority", f"{mesh.b.ip4}:8080"),
            (":path", "/"),
        ],
        "duplicate :authority": [
            (":method", "CONNECT"),
            (":authority", f"{mesh.b.ip4}:8080"),
            (":authority", f"{mesh.b.ip4}:8080"),
        ],
        "duplicate :method": [
            (":method", "CONNECT"),
            (":method", "CONNECT"),
            (":authority", f"{mesh.b.ip4}:8080"),
        ],
        "uppercase header name": [*connect_headers(f"{mesh.b.ip4}:8080"), ("X-Up", "1")],
        "GET instead of CONNECT": [
            (":method", "GET"),
            (":authority", f"{mesh.b.ip4}:8080"),
            (":scheme", "https"),
            (":path", "/"),
        ],
        "wrong authority": connect_headers("10.99.99.99:8080"),
        "authority with a path": connect_headers(f"{mesh.b.ip4}:8080/x"),
        "IPv6 authority on an IPv4 connection": connect_headers(f"[{mesh.b.ip6}]:8080"),
    }
    got: dict[str, str] = {}
    for name, hs in cases.items():
        with hbone(mesh, svid_from(mesh.ca, SA_A), validate=False) as c:
            c.ready()
            got[name] = c.answer(c.request(hs))
    reset = "reset:PROTOCOL_ERROR"
    assert got == {
        "missing :authority": reset,
        "CONNECT with :path": reset,
        "duplicate :authority": reset,
        "duplicate :method": reset,
        "uppercase header name": reset,
        "GET instead of CONNECT": "400",
        "wrong authority": "400",
        "authority with a path": "400",
        "IPv6 authority on an IPv4 connection": "400",
    }, got
    assert_mesh_still_works(mesh)


def _expect_tls_refused(mesh: Mesh, svid: Svid) -> tuple[str, str]:
    """Handshake with svid; the server must end the connection.  Returns (how
    the client saw it, client src)."""
    try:
        tls = tls_from(mesh.a, mesh.b.ip4, svid)
    except (ssl.SSLError, OSError) as e:  # refused inside the handshake
        pytest.fail(f"TLS 1.3: the client finishes before the server checks it, got {e!r}")
    src = "{}:{}".format(*tls.getsockname())
    try:
        c = H2Client(tls)  # writes the preface
    except (ssl.SSLError, OSError) as e:
        # a server that refuses at once (its TLS on the socket, not behind
        # the event loop's) has sent its alert and closed before this write
        tls.close()
        return repr(e), src
    try:
        # TLS 1.3: the server checks the client certificate after the client's
        # handshake is done; its refusal shows on the first read.
        c.pump(lambda: False, timeout=IO_TIMEOUT)
        assert c.gone and not c.responses, c.why()
        return c.why(), src
    finally:
        c.close()


def test_client_cert_from_another_trust_domain_ca_fails_tls(mesh: Mesh, tmp_path: Path) -> None:
    m = Counters(mesh.n2)
    evil = CertificateAuthority.load_or_generate(tmp_path / "evil", "evil.local")
    svid = svid_from(evil, SpiffeId("evil.local", "shop", "sa-a"), trust=mesh.ca)
    how, src = _expect_tls_refused(mesh, svid)
    assert "unknown ca" in how.lower() or "eof" in how.lower() or "reset" in how.lower(), how
    rec = records_from(mesh.n2, src)
    assert len(rec) == 1 and rec[0]["response_flag"] == "TLS_FAILURE", rec
    assert "TLS handshake failed" in rec[0]["error"]
    assert m.closed("TLS_FAILURE") == 1
    assert_mesh_still_works(mesh)


def test_client_cert_from_other_ca_with_our_trust_domain_fails_tls(
    mesh: Mesh, tmp_path: Path
) -> None:
    """Same SPIFFE ID as a real workload, wrong signer: the chain decides."""
    m = Counters(mesh.n2)
    other = CertificateAuthority.load_or_generate(tmp_path / "other", TD)
    how, src = _expect_tls_refused(mesh, svid_from(other, SA_A, trust=mesh.ca))
    rec = records_from(mesh.n2, src)
    assert len(rec) == 1 and rec[0]["response_flag"] == "TLS_FAILURE", (how, rec)
    assert m.closed("TLS_FAILURE") == 1
    assert_mesh_still_works(mesh)


def test_expired_client_cert_fails_tls(mesh: Mesh) -> None:
    """ca.py's clock cannot move the mesh CA into the past (it verifies its own
    root against that clock), so: a 1 s TTL, then wait it out."""
    m = Counters(mesh.n2)
    svid = svid_from(mesh.ca, SA_A, ttl=timedelta(seconds=1))
    time.sleep(max(0.0, (svid.not_after - datetime.now(UTC)).total_seconds()) + 1.2)
    how, src = _expect_tls_refused(mesh, svid)
    assert "expired" in how.lower() or "eof" in how.lower() or "reset" in how.lower(), how
    rec = records_from(mesh.n2, src)
    assert len(rec) == 1 and rec[0]["response_flag"] == "TLS_FAILURE", rec
    assert m.closed("TLS_FAILURE") == 1
    assert_mesh_still_works(mesh)


@pytest.mark.parametrize(
    "sans",
    [
        [x509.DNSName("a.shop.svc.cluster.local")],
        [x509.UniformResourceIdentifier("https://a.shop.example/")],
        [x509.UniformResourceIdentifier(SA_A.uri), x509.UniformResourceIdentifier(SA_X.uri)],
    ],
    ids=["dns-san", "non-spiffe-uri", "two-spiffe-ids"],
)
def test_mesh_signed_cert_without_one_spiffe_id_is_refused(
    mesh: Mesh, sans: list[x509.GeneralName]
) -> None:
    m = Counters(mesh.n2)
    with hbone(mesh, forged_svid(mesh, sans)) as c:
        c.pump(lambda: c.remote_settings_seen)  # handshake itself succeeds (chain is valid)
        sid = None
        with contextlib.suppress(OSError, h2.exceptions.ProtocolError):
            sid = c.request(connect_headers(f"{mesh.b.ip4}:8080"))
        if sid is not None:
            got = c.answer(sid)
            assert got.startswith("closed:") or got == "401", got
        c.pump(lambda: False, timeout=2)
        assert c.gone, "the server must close a connection whose peer has no identity"
        src = c.src
    rec = records_from(mesh.n2, src)
    assert rec and rec[0]["response_flag"] == "TLS_FAILURE", rec
    assert "client certificate refused" in rec[0]["error"]
    assert m.closed("TLS_FAILURE") >= 1
    assert_mesh_still_works(mesh)


def test_mesh_signed_cert_for_foreign_trust_domain_is_refused(mesh: Mesh) -> None:
    foreign = SpiffeId("evil.local", "shop", "sa-a")
    with hbone(mesh, svid_from(mesh.ca, foreign)) as c:
        try:
            c.pump(lambda: c.remote_settings_seen)
            got = c.answer(c.request(connect_headers(f"{mesh.b.ip4}:8080")))
        except (ssl.SSLError, OSError) as e:  # the server hung up first: refused
            got = f"closed:{e!r}"
    assert got != "200", "a peer outside the trust domain got a stream"


def test_authorization_uses_the_certificate_identity(mesh: Mesh) -> None:
    allow_a = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "only-sa-a", "namespace": "shop"},
        "spec": {
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": [SA_A.principal]}}]}],
        },
    }
    set_policies(mesh, [allow_a])
    try:
        m = Counters(mesh.n2)
        # baggage claims to be workload "a": the certificate, not the headers, decides
        claim = [
            *connect_headers(f"{mesh.b.ip4}:8080"),
            ("baggage", "k8s.namespace.name=shop,k8s.deployment.name=a,service.name=a"),
        ]
        with hbone(mesh, svid_from(mesh.ca, SA_X)) as c:
            c.ready()
            sid = c.request(claim)
            assert c.answer(sid) == "401"
            assert sid in c.ended
            x_src = c.src
        with hbone(mesh, svid_from(mesh.ca, SA_A)) as c:
            c.ready()
            sid = c.request(claim)
            assert c.answer(sid) == "200"
            assert mesh.a.ip4 in c.read_line(sid).decode()
            c.finish(sid)
            a_src = c.src
        denied = records_from(mesh.n2, x_src)
        assert len(denied) == 1 and denied[0]["response_flag"] == "DENY", denied
        assert denied[0]["src_identity"] == SA_X.uri
        assert "shop/only-sa-a" in denied[0]["error"] or "ALLOW" in denied[0]["error"]
        allowed = records_from(mesh.n2, a_src)
        assert len(allowed) == 1 and allowed[0]["response_flag"] == "-", allowed
        assert m.closed("DENY") == 1
        assert (
            m.delta(
                "istio_tcp_connections_closed_total",
                response_flags="DENY",
                source_principal=SA_X.uri,
            )
            == 1
        )
        assert_mesh_still_works(mesh)  # a is sa-a: allowed through the capture too
    finally:
        set_policies(mesh, [])


def test_plaintext_http2_to_hbone_port_is_a_tls_failure(mesh: Mesh) -> None:
    m = Counters(mesh.n2)
    s = tcp_from(mesh.a, (mesh.b.ip4, 15008))
    try:
        src = "{}:{}".format(*s.getsockname())
        c = H2Client(s)  # sends the HTTP/2 preface and SETTINGS in clear
        try:
            c.request(connect_headers(f"{mesh.b.ip4}:8080"))
        except OSError:
            pass  # the server already refused and reset: nothing to pump
        else:
            c.pump(lambda: False, timeout=IO_TIMEOUT)
            assert c.gone and not c.responses, c.why()
    finally:
        s.close()
    rec = records_from(mesh.n2, src)
    assert len(rec) == 1 and rec[0]["response_flag"] == "TLS_FAILURE", rec
    assert m.closed("TLS_FAILURE") == 1
    assert_mesh_still_works(mesh)


def test_oversized_header_list_is_refused_and_others_unaffected(mesh: Mesh) -> None:
    """The agent advertises SETTINGS_MAX_HEADER_LIST_SIZE 16 KiB; a 64 KiB header
    value is refused.  Observed: h2 raises DenialOfServiceError, the agent sends
    GOAWAY (ENHANCE_YOUR_CALM) and closes the whole connection — a connection
    error, not a stream refusal; other connections are unaffected."""
    with hbone(mesh, svid_from(mesh.ca, SA_A)) as bystander:
        bystander.ready()
        keep = bystander.request(connect_headers(f"{mesh.b.ip4}:8080"))
        assert bystander.answer(keep) == "200"
        bystander.read_line(keep)

        with hbone(mesh, svid_from(mesh.ca, SA_A), validate=False) as c:
            c.ready()
            assert c.h2.remote_settings.max_header_list_size == 16 * 1024
            sid = c.request([*connect_headers(f"{mesh.b.ip4}:8080"), ("x-big", "v" * (64 * 1024))])
            got = c.answer(sid)
            assert got != "200", got
            assert got.startswith("closed:goaway ENHANCE_YOUR_CALM") or got in (
                "reset:REFUSED_STREAM",
                "431",
                "reset:PROTOCOL_ERROR",
            ), got

        bystander.send(keep, b"still here")
        assert bystander.read_exactly(keep, 10) == b"still here"
    assert_mesh_still_works(mesh)


def _flood(c: H2Client, authority: str, n: int) -> list[int]:
    """n HEADERS frames in one write (the server may hang up halfway through)."""
    sids = [c.request(connect_headers(authority), flush=False) for _ in range(n)]
    try:
        c.flush()
    except OSError as e:
        c.error = e
    return sids


def test_stream_flood_respects_max_concurrent_streams(mesh: Mesh) -> None:
    """150 CONNECTs in one write, before the server's SETTINGS could be read:
    at most 100 are served and the rest refused (RST_STREAM REFUSED_STREAM;
    unpatched h2 instead dropped the whole connection, losing every request in
    the same read); the agent stays healthy; new connections work."""
    m = Counters(mesh.n2)
    with hbone(mesh, svid_from(mesh.ca, SA_A)) as c:
        sids = _flood(c, f"{mesh.b.ip4}:8080", 150)
        c.pump(lambda: all(s in c.responses or s in c.resets for s in sids) or c.gone, timeout=20)
        ok = [s for s in sids if c.responses.get(s, {}).get(":status") == "200"]
        refused = [s for s in sids if c.resets.get(s) == h2.errors.ErrorCodes.REFUSED_STREAM]
        assert len(ok) <= 100, len(ok)
        assert len(ok) + len(refused) == 150 or c.gone, c.why()
        if c.goaway is not None:
            assert c.goaway.error_code in (
                h2.errors.ErrorCodes.PROTOCOL_ERROR,
                h2.errors.ErrorCodes.REFUSED_STREAM,
            ), c.why()
    assert m.delta("istio_tcp_connections_opened_total") == len(ok)
    # every stream's record ends once the connection's end reaches the loop
    # serving it (another thread than the admin's with agent.tunnelLoops)
    deadline = time.monotonic() + 5
    while [x for x in mesh.n2.status()["connections"]["open"] if x["src"] == c.src]:
        assert time.monotonic() < deadline, "the flood's stream records stay open"
        time.sleep(0.2)
    with hbone(mesh, svid_from(mesh.ca, SA_A)) as fresh:
        fresh.ready()
        sid = fresh.request(connect_headers(f"{mesh.b.ip4}:8080"))
        assert fresh.answer(sid) == "200"
        fresh.finish(sid)
    assert_mesh_still_works(mesh)


def test_flood_after_settings_is_capped_at_100(mesh: Mesh) -> None:
    """A client that honours SETTINGS can have exactly 100 streams open."""
    with hbone(mesh, svid_from(mesh.ca, SA_A)) as c:
        c.ready()
        sids = _flood(c, f"{mesh.b.ip4}:8080", 100)
        c.pump(lambda: all(s in c.responses for s in sids) or c.gone, timeout=20)
        assert sum(c.responses.get(s, {}).get(":status") == "200" for s in sids) == 100, c.why()
        with pytest.raises(h2.exceptions.TooManyStreamsError):
            c.request(connect_headers(f"{mesh.b.ip4}:8080"))
        # every stream is live: echo on the first and the last
        for s in (sids[0], sids[-1]):
            c.read_line(s)
            c.send(s, b"x" * 10)
            assert c.read_exactly(s, 10) == b"x" * 10
    assert_mesh_still_works(mesh)


def test_stream_over_the_limit_is_refused_not_the_connection(mesh: Mesh) -> None:
    with hbone(mesh, svid_from(mesh.ca, SA_A)) as c:
        c.ready()
        sids = _flood(c, f"{mesh.b.ip4}:8080", 100)
        c.pump(lambda: all(s in c.responses for s in sids) or c.gone, timeout=20)
        assert all(c.responses.get(s, {}).get(":status") == "200" for s in sids), c.why()
        # a misbehaving (or racing) client ignores the limit
        rs = c.h2.remote_settings
        rs[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] = 1000
        rs.acknowledge()
        extra = c.request(connect_headers(f"{mesh.b.ip4}:8080"))
        got = c.answer(extra)
        assert got == "reset:REFUSED_STREAM", got
        c.read_line(sids[0])
        c.send(sids[0], b"alive")
        assert c.read_exactly(sids[0], 5) == b"alive", c.why()


def test_client_gone_during_slow_delivery_leaks_nothing(mesh: Mesh) -> None:
    """The app is slow to accept (its accept queue is full), the client gives
    up and closes; when the app finally accepts, the agent must close that
    delivered connection rather than keep it (and its record) open."""
    port = 7000
    with netns.entered(mesh.b.netns_path):
        lsn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        filler = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    accepted: list[socket.socket] = []
    try:
        lsn.bind((mesh.b.ip4, port))
        lsn.listen(0)  # one queued connection, further SYNs are dropped
        filler.settimeout(IO_TIMEOUT)
        filler.connect((mesh.b.ip4, port))
        time.sleep(0.3)
        with hbone(mesh, svid_from(mesh.ca, SA_A)) as c:
            c.ready()
            sid = c.request(connect_headers(f"{mesh.b.ip4}:{port}"))
            assert c.answer(sid, timeout=0.5).startswith("closed:"), "the app has not accepted"
            src = c.src
        time.sleep(0.3)  # the agent sees the connection go
        lsn.settimeout(0.2)
        deadline = time.monotonic() + 6  # SYN retransmits at 1 s, 3 s
        while time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                conn, peer = lsn.accept()
                conn.settimeout(5)
                accepted.append(conn)
                if peer[0] == mesh.a.ip4:
                    break
        delivered = [x for x in accepted if x.getpeername()[0] == mesh.a.ip4]
        assert delivered, "the agent's delivery never reached the app"
        try:
            tail = delivered[0].recv(100)
        except OSError:
            tail = b""
        assert tail == b"", "nothing may be relayed to the app"
        deadline = time.monotonic() + 5
        while [x for x in mesh.n2.status()["connections"]["open"] if x["src"] == src]:
            assert time.monotonic() < deadline, "the inbound record stays open"
            time.sleep(0.2)
    finally:
        for x in (lsn, filler, *accepted):
            x.close()


def test_closed_port_is_refused_promptly(mesh: Mesh) -> None:
    with hbone(mesh, svid_from(mesh.ca, SA_A)) as c:
        c.ready()
        t0 = time.monotonic()
        sid = c.request(connect_headers(f"{mesh.b.ip4}:9999"))
        got = c.answer(sid, timeout=15)
        took = time.monotonic() - t0
    assert got == "503"
    assert took < 2.0, f"503 took {took:.1f} s"


def test_garbage_after_tls_handshake_closes_the_connection(mesh: Mesh) -> None:
    tls = tls_from(mesh.a, mesh.b.ip4, svid_from(mesh.ca, SA_A))
    try:
        tls.sendall(os.urandom(4096))
        tls.settimeout(IO_TIMEOUT)
        end = time.monotonic() + IO_TIMEOUT
        closed = False
        while time.monotonic() < end:
            try:
                if not tls.recv(65536):
                    closed = True
                    break
            except (ssl.SSLError, OSError):
                closed = True
                break
        assert closed, "the agent must close a connection that is not HTTP/2"
    finally:
        tls.close()
    assert_mesh_still_works(mesh)


def test_many_bad_connections_leave_the_agent_healthy(mesh: Mesh) -> None:
    """A burst of every kind of bad connection at once; then normal service."""
    good = svid_from(mesh.ca, SA_A)
    socks: list[socket.socket] = []
    try:
        for i in range(30):
            s = tcp_from(mesh.a, (mesh.b.ip4, 15008))
            s.sendall(os.urandom(64) if i % 3 else b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            socks.append(s)
        for _ in range(10):
            t = tls_from(mesh.a, mesh.b.ip4, good)
            t.sendall(os.urandom(256))
            socks.append(t)
        for _ in range(10):  # half-open: connected, never speaks
            socks.append(tcp_from(mesh.a, (mesh.b.ip4, 15008)))
        assert_mesh_still_works(mesh)
    finally:
        for s in socks:
            s.close()
    assert_mesh_still_works(mesh)
