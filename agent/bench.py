"""`tether bench datapath`: same-node pod-to-pod throughput and request/response
latency, direct vs captured (relayed by the agent) vs captured with sk_msg.

(Over 600 lines: three benchmarks, datapath, tunnel and h2, that share the
peers, the process accounting and the report format; never imported by the
agent itself.)

Real C peers do the measuring (iperf3 for single-stream throughput, sockperf
ping-pong with 1 KiB messages for round-trip latency), so the only Python in
the path is the agent under test.  Every number is also given as a ratio to
the direct baseline measured in the same run: these machines are noisy, and
ratios survive that better than absolute numbers.  A benchmark, never a test:
nothing here asserts a speed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.sim.harness import PY, AgentNode, Cluster
from agent.sim.topology import Node, Pod, Testbed

IPERF_PORT = 5201
SOCKPERF_PORT = 11111


def _iperf(an: AgentNode, client: Pod, server: Pod, seconds: float) -> float:
    srv = an.tb.spawn(
        server,
        ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    try:
        p = an.tb.spawn(
            client,
            ["iperf3", "-c", server.ip4, "-p", str(IPERF_PORT), "-t", str(seconds), "-J"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        raw, _ = p.communicate(timeout=seconds + 30)
        data = json.loads(raw)
        if "error" in data:
            raise RuntimeError(f"iperf3: {data['error']}")
        return float(data["end"]["sum_received"]["bits_per_second"])
    finally:
        srv.kill()
        srv.wait(5)


_PCT = re.compile(r"percentile (\d+\.\d+) =\s+([\d.]+)")


def _sockperf(an: AgentNode, client: Pod, server: Pod, seconds: float) -> dict[str, float]:
    srv = an.tb.spawn(
        server,
        ["sockperf", "sr", "--tcp", "-i", server.ip4, "-p", str(SOCKPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    try:
        p = an.tb.spawn(
            client,
            [
                "sockperf",
                "pp",
                "--tcp",
                "-i",
                server.ip4,
                "-p",
                str(SOCKPERF_PORT),
                "-m",
                "1024",
                "-t",
                str(int(seconds)),
                "--full-rtt",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        raw, _ = p.communicate(timeout=seconds + 30)
        text = raw.decode(errors="replace")
        pct = {float(k): float(v) for k, v in _PCT.findall(text)}
        if 50.0 not in pct:
            raise RuntimeError(f"sockperf gave no percentiles:\n{text[-800:]}")
        return {"p50_us": pct[50.0], "p99_us": pct[99.0]}
    finally:
        srv.kill()
        srv.wait(5)


def _agent_cpu(an: AgentNode) -> float:
    """CPU seconds (user+system) the agent process has used so far."""
    assert an.agent is not None
    fields = Path(f"/proc/{an.agent.pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / float(os.sysconf("SC_CLK_TCK"))


def _agent_rss_mib(an: AgentNode) -> float:
    assert an.agent is not None
    for line in Path(f"/proc/{an.agent.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def measure(an: AgentNode, client: Pod, server: Pod, seconds: float) -> dict[str, Any]:
    cpu0 = _agent_cpu(an) if an.agent else 0.0
    bps = _iperf(an, client, server, seconds)
    row: dict[str, Any] = {"throughput_gbit_s": round(bps / 1e9, 2)}
    row.update(_sockperf(an, client, server, seconds))
    if an.agent:
        cpu = _agent_cpu(an) - cpu0
        gbytes = bps / 8 * seconds / 1e9
        row["agent_cpu_s_per_gb"] = round(cpu / gbytes, 3) if gbytes else None
        row["agent_rss_mib"] = round(_agent_rss_mib(an), 1)
    return row


def run(seconds: float) -> dict[str, Any]:
    results: dict[str, dict[str, Any]] = {}
    with Testbed() as tb:
        for sk_msg in (False, True):
            an = AgentNode(tb, "node1" if not sk_msg else "node2", sk_msg=sk_msg)
            try:
                n = "2" if sk_msg else ""
                a, b = an.add_pod("a" + n, "mesh"), an.add_pod("b" + n, "mesh")
                c, d = an.add_pod("c" + n, "plain"), an.add_pod("d" + n, "plain")
                an.enroll_namespace("mesh")
                if not sk_msg:
                    results["direct (no mesh)"] = measure(an, c, d, seconds)
                an.start_agent()
                name = "captured + sk_msg" if sk_msg else "captured, relayed"
                results[name] = measure(an, a, b, seconds)
                if not sk_msg:
                    results["captured outbound only"] = measure(an, a, d, seconds)
            finally:
                an.close()
    base = results["direct (no mesh)"]
    for row in results.values():
        row["throughput_ratio"] = round(row["throughput_gbit_s"] / base["throughput_gbit_s"], 3)
        row["p50_ratio"] = round(row["p50_us"] / base["p50_us"], 2)
        row["p99_ratio"] = round(row["p99_us"] / base["p99_us"], 2)
    return {"seconds": seconds, "results": results}


# -- tether bench tunnel ---------------------------------------------------------
#
# Two simulated nodes in one run.  Every path is measured with the same C tools
# (iperf3, sockperf) plus a small connect-per-request client (_CPS_SCRIPT), and
# every number is also given as a ratio to the direct pod-to-pod baseline.

CPS_PORT = 7000
CPS_CAP = 20000  # connections per measurement: stays well inside the ephemeral port range
STUNNEL_PORT_OFFSET = 10000  # node-to-node port of each relayed service (5201 -> 15201)
STUNNEL_CIPHERSUITES = "TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256"

# New connections per second: a bounded, single-threaded stdlib client and server
# (run with `python -c`, so nothing of the agent is imported into the pods).
# One connection at a time: connect, send 1 byte, read the 1-byte reply, close;
# the server closes first, so TIME_WAIT lands on the server side.
_CPS_SCRIPT = r"""
import json, socket, sys, time
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "serve":
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(1024)
    print("ready", flush=True)
    while True:
        c, _ = s.accept()
        try:
            c.settimeout(5)
            if c.recv(1):
                c.sendall(b"y")
        except OSError:
            pass
        c.close()
seconds, cap = float(sys.argv[4]), int(sys.argv[5])
ok = err = 0
first = None
lat = []
t0 = time.monotonic()
end = t0 + seconds
while ok + err < cap and time.monotonic() < end:
    t = time.perf_counter()
    c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        c.settimeout(5)
        c.connect((host, port))
        c.sendall(b"x")
        if c.recv(1) != b"y":
            raise ConnectionError("no reply")
        ok += 1
        lat.append(time.perf_counter() - t)
    except OSError as e:
        err += 1
        first = first or repr(e)
        if err >= 20:
            break
    finally:
        c.close()
el = time.monotonic() - t0
lat.sort()
print(json.dumps({"ok": ok, "errors": err, "first_error": first, "seconds": el,
                  "conn_per_s": ok / el if el else 0.0,
                  "p50_us": lat[len(lat) // 2] * 1e6 if lat else None}))
"""


class _Procs:
    """The processes whose CPU and memory a path costs: the agents, or the stunnel pair."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    def cpu(self) -> float:
        return sum(_proc_cpu(pid) for pid in self.pids.values())

    def rss_mib(self) -> dict[str, float]:
        return {name: _proc_rss_mib(pid) for name, pid in self.pids.items()}


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user+system, all threads) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))


def _proc_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def _wait_listening(p: subprocess.Popen[Any], port: int, timeout: float = 10.0) -> None:
    """Wait until a TCP socket listens on ``port`` in ``p``'s netns (/proc/PID/net/tcp{,6})."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"{p.args!r} exited with {p.returncode} before listening")
        for table in ("tcp", "tcp6"):
            for line in Path(f"/proc/{p.pid}/net/{table}").read_text().splitlines()[1:]:
                f = line.split()
                if f[1].endswith(f":{port:04X}") and f[3] == "0A":
                    return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout:g}s")


def _agent_messages(an: AgentNode, n: int = 8) -> str:
    """The last lines of an agent's log that are not access-log records."""
    lines = [ln for ln in an.log_tail(2000).splitlines() if "tether.access" not in ln]
    return f"[{an.node.name} agent log]\n" + "\n".join(lines[-n:])


def _kill(p: subprocess.Popen[Any]) -> None:
    if p.poll() is None:
        p.kill()
    p.wait(5)


def _t_iperf(
    tb: Testbed, client: Pod, server: Pod, host: str, port: int, seconds: float
) -> dict[str, float]:
    srv = tb.spawn(
        server,
        ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(srv, IPERF_PORT)
        p = tb.spawn(
            client,
            ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-J"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            raw, _ = p.communicate(timeout=seconds + 20)
        except subprocess.TimeoutExpired:
            _kill(p)
            raise RuntimeError("iperf3 did not finish in time") from None
        data = json.loads(raw)
        if "error" in data:
            raise RuntimeError(f"iperf3: {data['error']}")
        recv = data["end"]["sum_received"]
        return {"bits_per_second": float(recv["bits_per_second"]), "bytes": float(recv["bytes"])}
    finally:
        _kill(srv)


def _sockperf_pp(
    tb: Testbed, client: Pod, server: Pod, host: str, port: int, args: list[str], timeout: float
) -> tuple[int, str, float]:
    """`sockperf sr` in server, `sockperf pp --tcp -m 1024 ARGS` from client;
    (exit code, output, wall seconds of the client run)."""
    srv = tb.spawn(
        server,
        ["sockperf", "sr", "--tcp", "-i", server.ip4, "-p", str(SOCKPERF_PORT)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_listening(srv, SOCKPERF_PORT)
        p = tb.spawn(
            client,
            ["sockperf", "pp", "--tcp", "-i", host, "-p", str(port), "-m", "1024", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        t0 = time.monotonic()
        try:
            raw, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill(p)
            raise RuntimeError(f"sockperf pp {' '.join(args)} did not finish in time") from None
        return p.returncode, raw.decode(errors="replace"), time.monotonic() - t0
    finally:
        _kill(srv)


def _t_sockperf(
    tb: Testbed, client: Pod, server: Pod, host: str, port: int, seconds: float
) -> dict[str, float]:
    _, text, _ = _sockperf_pp(
        tb,
        client,
        server,
        host,
        port,
        ["-t", str(max(1, round(seconds))), "--full-rtt"],
        seconds + 20,
    )
    pct = {float(k): float(v) for k, v in _PCT.findall(text)}
    if 50.0 not in pct or 99.0 not in pct:
        raise RuntimeError(f"sockperf gave no percentiles:\n{text[-800:]}")
    return {"p50_us": pct[50.0], "p99_us": pct[99.0]}


RATE_MPS = 1000  # Istio's published ztunnel figure: ~0.06 vCPU at 1000 req/s, 1 KB


def _t_rate_cpu(
    tb: Testbed, client: Pod, server: Pod, host: str, port: int, seconds: float, procs: _Procs
) -> dict[str, float]:
    """CPU of the relaying processes while sockperf ping-pongs 1 KiB messages
    at a fixed 1000 per second over one connection: vCPU = CPU s / wall s."""
    t = max(2, round(seconds))
    cpu0 = procs.cpu()
    rc, text, wall = _sockperf_pp(
        tb, client, server, host, port, ["--mps", str(RATE_MPS), "-t", str(t)], t + 20
    )
    cpu = procs.cpu() - cpu0
    if rc != 0:
        raise RuntimeError(f"sockperf --mps: {text[-500:]}")
    return {"vcpu": cpu / wall}


def _t_cps(
    tb: Testbed, client: Pod, server: Pod, host: str, port: int, seconds: float
) -> dict[str, Any]:
    srv = tb.spawn(
        server,
        [PY, "-c", _CPS_SCRIPT, "serve", "0.0.0.0", str(CPS_PORT)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert srv.stdout is not None
        if b"ready" not in srv.stdout.readline():
            raise RuntimeError("connection-rate server did not start")
        p = tb.spawn(
            client,
            [PY, "-c", _CPS_SCRIPT, "connect", host, str(port), str(seconds), str(CPS_CAP)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            out, err = p.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            _kill(p)
            raise RuntimeError("connection-rate client did not finish in time") from None
        try:
            res: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise RuntimeError(f"connection-rate client: {err.decode()[-500:]}") from None
        if not res["ok"]:
            raise RuntimeError(f"no connection succeeded: {res['first_error']}")
        return res
    finally:
        _kill(srv)


def _measure_path(
    tb: Testbed,
    client: Pod,
    server: Pod,
    host: str,
    seconds: float,
    procs: _Procs | None,
    ports: dict[int, int] | None = None,
    diagnose: Any = None,
) -> dict[str, Any]:
    """iperf3, sockperf and the connection-rate client from ``client`` to ``host``
    (servers in ``server``); ``ports`` maps a server port to the one to dial.
    A failing tool is recorded as an error in the row; the others still run."""
    ports = ports or {}
    row: dict[str, Any] = {"errors": {}}

    def guarded(name: str, fn: Any) -> Any:
        try:
            return fn()
        except Exception as e:
            msg = f"{type(e).__name__}: {e}"
            if diagnose is not None:
                msg += "\n" + str(diagnose())
            row["errors"][name] = msg
            return None

    cpu0 = procs.cpu() if procs else 0.0
    ip = guarded(
        "iperf3",
        lambda: _t_iperf(tb, client, server, host, ports.get(IPERF_PORT, IPERF_PORT), seconds),
    )
    if ip is not None:
        row["throughput_gbit_s"] = round(ip["bits_per_second"] / 1e9, 2)
        if procs:
            cpu = procs.cpu() - cpu0
            row["cpu_s"] = round(cpu, 2)
            row["cpu_s_per_gb"] = round(cpu / (ip["bytes"] / 1e9), 3) if ip["bytes"] else None
    sp = guarded(
        "sockperf",
        lambda: _t_sockperf(
            tb, client, server, host, ports.get(SOCKPERF_PORT, SOCKPERF_PORT), seconds
        ),
    )
    if sp is not None:
        row.update(sp)
    if procs:
        rate = guarded(
            "rate-cpu",
            lambda: _t_rate_cpu(
                tb, client, server, host, ports.get(SOCKPERF_PORT, SOCKPERF_PORT), seconds, procs
            ),
        )
        if rate is not None:
            row["vcpu_at_1k_rps"] = round(rate["vcpu"], 3)
    cps = guarded(
        "cps",
        lambda: _t_cps(tb, client, server, host, ports.get(CPS_PORT, CPS_PORT), min(seconds, 2.0)),
    )
    if cps is not None:
        row["conn_per_s"] = round(cps["conn_per_s"])
        row["conn_p50_us"] = round(cps["p50_us"], 1) if cps["p50_us"] else None
        if cps["errors"]:
            row["errors"]["cps"] = f"{cps['errors']} failed, first: {cps['first_error']}"
    if procs:
        rss = procs.rss_mib()
        row["rss_mib"] = rss
        row["rss_mib_total"] = round(sum(rss.values()), 1)
    if not row["errors"]:
        del row["errors"]
    return row


def _stunnel_certs(d: Path) -> None:
    """A CA and one ECDSA P-256 leaf per node (client node1, server node2), like SVIDs."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("bench-ca"))
        .issuer_name(name("bench-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for who, ip in (("node1", "10.99.0.1"), ("node2", "10.99.0.2")):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(who))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.UniformResourceIdentifier(f"spiffe://cluster.local/ns/bench/sa/{who}"),
                        x509.IPAddress(ipaddress.ip_address(ip)),
                    ]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        (d / f"{who}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        kp = d / f"{who}.key"
        kp.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        kp.chmod(0o600)


def _stunnel_confs(d: Path, n1: Node, n2: Node, server: Pod) -> dict[str, str]:
    """Client side on node1 (listens on node1's pod gateway, dials node2's fabric IP),
    server side on node2 (listens on its fabric IP, forwards to the server pod)."""
    common = [
        "foreground = yes",
        "pid =",
        "syslog = no",
        "debug = 4",
        f"CAfile = {d / 'ca.pem'}",
        "verifyChain = yes",
        "sslVersionMin = TLSv1.3",
        "sslVersionMax = TLSv1.3",
        f"ciphersuites = {STUNNEL_CIPHERSUITES}",
        "sessionResume = no",
        "socket = l:TCP_NODELAY=1",
        "socket = r:TCP_NODELAY=1",
    ]
    cli = [
        *common,
        f"cert = {d / 'node1.pem'}",
        f"key = {d / 'node1.key'}",
        "client = yes",
        f"checkIP = {n2.fabric_ip4}",
    ]
    srv = [*common, f"cert = {d / 'node2.pem'}", f"key = {d / 'node2.key'}", "options = NO_TICKET"]
    for port in (IPERF_PORT, SOCKPERF_PORT, CPS_PORT):
        relay = port + STUNNEL_PORT_OFFSET
        cli += [
            f"[p{port}]",
            f"accept = {n1.gateway4}:{port}",
            f"connect = {n2.fabric_ip4}:{relay}",
        ]
        srv += [f"[p{port}]", f"accept = {n2.fabric_ip4}:{relay}", f"connect = {server.ip4}:{port}"]
    return {"client": "\n".join(cli) + "\n", "server": "\n".join(srv) + "\n"}


def _start_stunnel(
    tb: Testbed, d: Path, n1: Node, n2: Node, server: Pod
) -> tuple[dict[str, int], dict[str, str]]:
    """The stunnel pair, spawned through the testbed (killed on close) in each node's
    netns (the kubelet role: node netns, a cgroup of its own)."""
    _stunnel_certs(d)
    confs = _stunnel_confs(d, n1, n2, server)
    binary = shutil.which("stunnel4") or shutil.which("stunnel")
    if binary is None:
        raise RuntimeError("stunnel not installed (apt-get install stunnel4)")
    pids: dict[str, int] = {}
    for side, node in (("server", n2), ("client", n1)):
        path = d / f"{side}.conf"
        path.write_text(confs[side])
        log = (d / f"{side}.log").open("w")
        p = tb.spawn(node.kubelet, [binary, str(path)], stdout=log, stderr=log)
        log.close()
        try:
            for port in (IPERF_PORT, SOCKPERF_PORT, CPS_PORT):
                _wait_listening(p, port + (STUNNEL_PORT_OFFSET if side == "server" else 0))
        except RuntimeError as e:
            raise RuntimeError(
                f"stunnel {side}: {e}; log:\n" + (d / f"{side}.log").read_text()[-800:]
            ) from None
        pids[f"stunnel-{side}"] = p.pid
    return pids, confs


def _agents(*nodes: AgentNode) -> _Procs:
    return _Procs({an.node.name: an.agent.pid for an in nodes if an.agent is not None})


def run_tunnel(seconds: float) -> dict[str, Any]:
    results: dict[str, dict[str, Any]] = {}
    config: dict[str, Any] = {}
    t0 = time.monotonic()
    with Testbed() as tb, tempfile.TemporaryDirectory(prefix=f"tether-{tb.prefix}-tls-") as tmp:
        cluster = Cluster(tb)
        try:
            n1 = AgentNode(tb, "node1", cluster=cluster)
            n2 = AgentNode(tb, "node2", cluster=cluster)
            a = n1.add_pod("a", "mesh", "client")
            s = n1.add_pod("s", "mesh", "server")  # same-node server
            b = n2.add_pod("b", "mesh", "server")  # cross-node server
            c = n1.add_pod("c", "plain", "client")
            d = n2.add_pod("d", "plain", "server")
            e = n1.add_pod("e", "plain", "server")  # same-node reference, no mesh
            n1.enroll_namespace("mesh")

            def logs() -> str:
                return "\n".join(_agent_messages(an) for an in (n1, n2))

            # No agent runs yet: the baseline and the C relay see an idle machine.
            results["direct, cross-node (no mesh)"] = _measure_path(tb, c, d, d.ip4, seconds, None)
            results["direct, same-node (no mesh)"] = _measure_path(tb, c, e, e.ip4, seconds, None)
            pids, confs = _start_stunnel(tb, Path(tmp), n1.node, n2.node, d)
            stun = _Procs(pids)
            results["stunnel pair, cross-node"] = _measure_path(
                tb, c, d, n1.node.gateway4, seconds, stun
            )
            for p in tb._spawned:  # done with stunnel: free the cores for the agents
                if p.proc.pid in pids.values():
                    _kill(p.proc)
            config["stunnel"] = confs

            n1.start_agent()
            n2.start_agent()
            results["tether cross-node (HBONE)"] = _measure_path(
                tb, a, b, b.ip4, seconds, _agents(n1, n2), diagnose=logs
            )
            results["tether same-node"] = _measure_path(
                tb, a, s, s.ip4, seconds, _agents(n1), diagnose=logs
            )
            n1.stop_agent()
            n1.sk_msg = True
            n1.start_agent()
            results["tether same-node + sk_msg"] = _measure_path(
                tb, a, s, s.ip4, seconds, _agents(n1), diagnose=logs
            )
        finally:
            cluster.close()
    base = results["direct, cross-node (no mesh)"]
    ref = results["stunnel pair, cross-node"]
    for row in results.values():
        for key, ratio in (
            ("throughput_gbit_s", "throughput_ratio"),
            ("p50_us", "p50_ratio"),
            ("p99_us", "p99_ratio"),
            ("conn_per_s", "conn_ratio"),
        ):
            if row.get(key) and base.get(key):
                row[ratio] = round(row[key] / base[key], 3 if key == "throughput_gbit_s" else 2)
        # The baseline spends no relay CPU or memory: these compare to the stunnel pair.
        for key, ratio in (
            ("cpu_s_per_gb", "cpu_x_stunnel"),
            ("rss_mib_total", "rss_x_stunnel"),
            ("vcpu_at_1k_rps", "vcpu_x_stunnel"),
        ):
            if row.get(key) is not None and ref.get(key):
                row[ratio] = round(row[key] / ref[key], 2)
    return {
        "seconds": seconds,
        "wall_s": round(time.monotonic() - t0, 1),
        "tools": {
            "throughput": "iperf3 -J, 1 stream",
            "latency": "sockperf pp --tcp -m 1024 --full-rtt",
            "vcpu_at_1k_rps": f"relaying processes' CPU s per s while sockperf pp "
            f"--mps {RATE_MPS} -m 1024 runs (Istio publishes "
            "~0.06 vCPU per ztunnel at 1000 req/s, 1 KB)",
            "conn_per_s": "python stdlib client, 1 connection at a time: connect, "
            "1 byte each way, close (server closes first)",
        },
        "config": config,
        "results": results,
    }


# -- tether bench h2 ----------------------------------------------------------------

H2_BYTES = 256 * 1024 * 1024
H2_PROFILE_BYTES = 64 * 1024 * 1024
H2_FRAMES = (16 * 1024, 256 * 1024, 1024 * 1024)


def _h2_pair(frame: int) -> tuple[Any, Any, int]:
    """Client and server H2Connection, settings as the tunnel's (agent.tunnel.h2conn),
    with ``frame`` as both sides' max frame size, and one CONNECT stream open."""
    import h2.config
    import h2.connection
    import h2.settings

    from agent.tunnel import h2conn

    conns = []
    for client in (True, False):
        h = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=client, header_encoding="utf-8", validate_inbound_headers=True
            )
        )
        h.initiate_connection()
        h.update_settings(
            {
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: h2conn.STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: frame,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: h2conn.MAX_STREAMS,
            }
        )
        h.increment_flow_control_window(h2conn.CONN_WINDOW - 65535)
        conns.append(h)
    cl, sv = conns

    def pump() -> None:
        for _ in range(4):
            sv.receive_data(cl.data_to_send())
            cl.receive_data(sv.data_to_send())

    pump()
    sid = cl.get_next_available_stream_id()
    cl.send_headers(sid, [(":method", "CONNECT"), (":authority", "10.10.2.2:8080")])
    pump()
    sv.send_headers(sid, [(":status", "200")])
    pump()
    assert cl.max_outbound_frame_size == frame, cl.max_outbound_frame_size
    return cl, sv, sid


def _h2_transfer(frame: int, nbytes: int) -> dict[str, float]:
    """Push ``nbytes`` client -> server in DATA frames of ``frame`` bytes, the server
    acknowledging every DataReceived as the tunnel does; CPU time per side."""
    import h2.events

    cl, sv, sid = _h2_pair(frame)
    chunk = os.urandom(frame)
    sent = received = 0
    t_send = t_recv = 0.0
    clock = time.thread_time
    while received < nbytes:
        t = clock()
        while sent < nbytes and cl.local_flow_control_window(sid) >= frame:
            cl.send_data(sid, chunk)
            sent += frame
        wire = cl.data_to_send()
        t1 = clock()
        for ev in sv.receive_data(wire):
            if isinstance(ev, h2.events.DataReceived):
                assert ev.data is not None
                received += len(ev.data)
                sv.acknowledge_received_data(ev.flow_controlled_length or 0, sid)
        back = sv.data_to_send()
        t2 = clock()
        cl.receive_data(back)
        t3 = clock()
        t_send += (t1 - t) + (t3 - t2)
        t_recv += t2 - t1
    mb = received / 1e6
    return {
        "send_mb_s": round(mb / t_send),
        "recv_mb_s": round(mb / t_recv),
        "pair_mb_s": round(mb / (t_send + t_recv)),
    }


def _h2_repr_share(frame: int, nbytes: int) -> dict[str, float]:
    """cProfile the transfer: share of all profiled time under `__repr__` (outermost
    `__repr__` calls only, so nested ones are not counted twice)."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(_h2_transfer, frame, nbytes)
    st = pstats.Stats(prof)
    raw: dict[Any, Any] = st.stats  # type: ignore[attr-defined]
    total: float = st.total_tt  # type: ignore[attr-defined]
    in_repr = 0.0
    for func, (_cc, _nc, _tt, _ct, callers) in raw.items():
        if func[2] != "__repr__":
            continue
        for caller, edge in callers.items():
            if caller[2] != "__repr__":
                in_repr += edge[3]
    return {"repr_pct": round(100 * in_repr / total, 1)}


def _tls_transfer(nbytes: int, chunk_size: int = 256 * 1024) -> dict[str, Any]:
    """The reference: the same bytes through a TLS 1.3 pair (memory BIOs, ECDSA P-256,
    the tunnel's TLS settings, so AES-256-GCM), encrypt + decrypt, no HTTP/2."""
    import ssl

    with tempfile.TemporaryDirectory(prefix="tether-bench-h2-") as tmp:
        d = Path(tmp)
        _stunnel_certs(d)
        ctxs = []
        for proto, who in ((ssl.PROTOCOL_TLS_CLIENT, "node1"), (ssl.PROTOCOL_TLS_SERVER, "node2")):
            ctx = ssl.SSLContext(proto)
            ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_3
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(d / "ca.pem")
            ctx.load_cert_chain(d / f"{who}.pem", d / f"{who}.key")
            ctxs.append(ctx)
    bios = [ssl.MemoryBIO() for _ in range(4)]  # c_in, c_out, s_in, s_out
    cl = ctxs[0].wrap_bio(bios[0], bios[1], server_side=False)
    sv = ctxs[1].wrap_bio(bios[2], bios[3], server_side=True)
    for _ in range(10):  # handshake
        for obj in (cl, sv):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())
    cipher = cl.cipher()
    chunk = os.urandom(chunk_size)
    received = 0
    t_send = t_recv = 0.0
    clock = time.thread_time
    while received < nbytes:
        t = clock()
        cl.write(chunk)
        wire = bios[1].read()
        t1 = clock()
        bios[2].write(wire)
        while True:
            try:
                received += len(sv.read(1 << 20))
            except ssl.SSLWantReadError:
                break
        t2 = clock()
        t_send += t1 - t
        t_recv += t2 - t1
    mb = received / 1e6
    return {
        "send_mb_s": round(mb / t_send),
        "recv_mb_s": round(mb / t_recv),
        "pair_mb_s": round(mb / (t_send + t_recv)),
        "cipher": cipher[0] if cipher else "?",
    }


@contextlib.contextmanager
def data_body_repr(fn: Any) -> Iterator[None]:
    """Run with hyperframe's DataFrame._body_repr set to `fn`.  The agent's
    h2conn patches it at import, so "as is" must put hyperframe's own back
    (h2conn keeps it) rather than save whatever is installed now."""
    import hyperframe.frame

    saved = hyperframe.frame.DataFrame._body_repr
    hyperframe.frame.DataFrame._body_repr = fn  # type: ignore[method-assign]
    try:
        yield
    finally:
        hyperframe.frame.DataFrame._body_repr = saved  # type: ignore[method-assign]


def run_h2() -> dict[str, Any]:
    """h2's cost per MB on the tunnel's hot path, with hyperframe's DataFrame
    repr as shipped (it hex-encodes the whole payload for a debug string) and
    with the agent's O(1) replacement (agent.tunnel.h2conn.data_body_repr)."""
    import h2
    import hyperframe

    from agent.tunnel import h2conn

    rows: dict[str, dict[str, Any]] = {}
    for frame in H2_FRAMES:
        with data_body_repr(h2conn.HYPERFRAME_DATA_BODY_REPR):
            row: dict[str, Any] = dict(_h2_transfer(frame, H2_BYTES))
            row.update(_h2_repr_share(frame, H2_PROFILE_BYTES))
        with data_body_repr(h2conn.data_body_repr):
            cheap = _h2_transfer(frame, H2_BYTES)
        row.update({f"{k}_cheap_repr": v for k, v in cheap.items()})
        row["gain_cheap_repr"] = round(cheap["pair_mb_s"] / row["pair_mb_s"], 2)
        rows[f"{frame // 1024} KiB"] = row
    return {
        "bytes": H2_BYTES,
        "profile_bytes": H2_PROFILE_BYTES,
        "h2": h2.__version__,
        "hyperframe": hyperframe.__version__,
        "frames": rows,
        "tls_reference": _tls_transfer(H2_BYTES),
    }


# -- command line -------------------------------------------------------------------


def _print_datapath(report: dict[str, Any], seconds: float) -> None:
    print(f"tether bench datapath: same node, pod to pod, {seconds:g} s per measurement")
    print("iperf3 single stream; sockperf TCP ping-pong 1 KiB, full round trip\n")
    print(
        f"{'path':26} {'Gbit/s':>8} {'x direct':>9} {'p50 us':>8} {'x':>6} {'p99 us':>8} "
        f"{'x':>6} {'agent CPU s/GB':>15} {'agent RSS MiB':>14}"
    )
    for name, r in report["results"].items():
        print(
            f"{name:26} {r['throughput_gbit_s']:>8} {r['throughput_ratio']:>9} "
            f"{r['p50_us']:>8} {r['p50_ratio']:>6} {r['p99_us']:>8} {r['p99_ratio']:>6} "
            f"{r.get('agent_cpu_s_per_gb', '-')!s:>15} {r.get('agent_rss_mib', '-')!s:>14}"
        )


def _print_tunnel(report: dict[str, Any]) -> None:
    print(
        f"tether bench tunnel: two simulated nodes, {report['seconds']:g} s per measurement "
        f"({report['wall_s']} s in all)"
    )
    for what, tool in report["tools"].items():
        print(f"  {what}: {tool}")
    print(
        "  x = ratio to direct; CPU and RSS are of the relaying processes (both agents, or "
        "both stunnels), x st = ratio to the stunnel pair\n"
    )

    def v(r: dict[str, Any], k: str) -> str:
        x = r.get(k)
        return "-" if x is None else str(x)

    print(
        f"{'path':28} {'Gbit/s':>7} {'x':>6} {'p50 us':>7} {'x':>5} {'p99 us':>7} {'x':>5} "
        f"{'conn/s':>7} {'x':>5} {'CPU s/GB':>8} {'x st':>5} {'vCPU@1k':>7} {'x st':>5} "
        f"{'RSS MiB':>8} {'x st':>5}"
    )
    for name, r in report["results"].items():
        print(
            f"{name:28} {v(r, 'throughput_gbit_s'):>7} {v(r, 'throughput_ratio'):>6} "
            f"{v(r, 'p50_us'):>7} {v(r, 'p50_ratio'):>5} {v(r, 'p99_us'):>7} "
            f"{v(r, 'p99_ratio'):>5} {v(r, 'conn_per_s'):>7} {v(r, 'conn_ratio'):>5} "
            f"{v(r, 'cpu_s_per_gb'):>8} {v(r, 'cpu_x_stunnel'):>5} "
            f"{v(r, 'vcpu_at_1k_rps'):>7} {v(r, 'vcpu_x_stunnel'):>5} "
            f"{v(r, 'rss_mib_total'):>8} {v(r, 'rss_x_stunnel'):>5}"
        )
    for name, r in report["results"].items():
        if r.get("rss_mib"):
            print(f"  RSS {name}: " + ", ".join(f"{k} {m} MiB" for k, m in r["rss_mib"].items()))
        for tool, err in r.get("errors", {}).items():
            print(f"  ERROR {name} / {tool}: {err}")


def _print_h2(report: dict[str, Any]) -> None:
    print(
        f"tether bench h2: {report['bytes'] >> 20} MiB client -> server through two in-memory "
        f"h2 {report['h2']} H2Connections (hyperframe {report['hyperframe']}),"
    )
    print(
        "tunnel settings (4 MiB stream / 16 MiB connection window), server acks every "
        "DATA frame; MB/s per core (CPU time)\n"
    )
    print(
        f"{'frame':>8} {'send':>7} {'recv':>7} {'pair':>7} {'repr %':>7} | cheap DataFrame "
        f"repr: {'send':>6} {'recv':>6} {'pair':>6} {'gain':>5}"
    )
    for name, r in report["frames"].items():
        print(
            f"{name:>8} {r['send_mb_s']:>7} {r['recv_mb_s']:>7} {r['pair_mb_s']:>7} "
            f"{r['repr_pct']:>7} | {'':>18} {r['send_mb_s_cheap_repr']:>6} "
            f"{r['recv_mb_s_cheap_repr']:>6} {r['pair_mb_s_cheap_repr']:>6} "
            f"{r['gain_cheap_repr']:>5}"
        )
    t = report["tls_reference"]
    print(
        f"\nreference, TLS 1.3 alone ({t['cipher']}, 256 KiB writes, memory BIOs): "
        f"send {t['send_mb_s']}, recv {t['recv_mb_s']}, pair {t['pair_mb_s']} MB/s per core"
    )
    print(
        "repr % = share of cProfile time inside h2's eager repr(frame) (outermost "
        "__repr__ calls); gain = pair MB/s with DataFrame._body_repr made O(1) / as is"
    )


def main(what: str, seconds: float = 3.0, json_out: bool = False) -> int:
    if what == "datapath":
        report = run(seconds)
    elif what == "tunnel":
        report = run_tunnel(seconds)
    elif what == "h2":
        report = run_h2()
    else:
        raise SystemExit(f"unknown benchmark {what!r}")
    if json_out:
        print(json.dumps(report, indent=1))
    elif what == "datapath":
        _print_datapath(report, seconds)
    elif what == "tunnel":
        _print_tunnel(report)
    else:
        _print_h2(report)
    return 0
