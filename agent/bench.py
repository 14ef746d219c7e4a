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

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.sim.harness import PY, AgentNode, Cluster, proc_cpu, proc_rss_mib
from agent.sim.topology import Node, Pod, Testbed, random_prefix
from agent.tunnel import limits, tlssock

IPERF_PORT = 5201
PARALLEL_STREAMS = 8  # bench tunnel: many connections at once (more than one core)
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
    return _t_sockperf(an.tb, client, server, server.ip4, SOCKPERF_PORT, seconds)


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
        return sum(proc_cpu(pid) for pid in self.pids.values())

    def cpu_each(self) -> dict[str, float]:
        return {name: proc_cpu(pid) for name, pid in self.pids.items()}

    def rss_mib(self) -> dict[str, float]:
        return {name: proc_rss_mib(pid) for name, pid in self.pids.items()}


def _sockperf_server(tb: Testbed, server: Pod, attempts: int = 4) -> subprocess.Popen[Any]:
    """`sockperf sr` listening in ``server``.  The previous run's server may
    have closed its side first, leaving the port in TIME_WAIT, and sockperf
    then exits at bind (once in ~20 rows here): it binds with SO_REUSEADDR,
    and a server that still exits before listening is retried a few times,
    its own error shown if it never comes up."""
    why = ""
    argv = ["sockperf", "sr", "--tcp", "--uc-reuseaddr", "-i", server.ip4]
    for i in range(attempts):
        with tempfile.TemporaryFile() as out:  # not a pipe: nobody drains it while it runs
            srv = tb.spawn(
                server,
                [*argv, "-p", str(SOCKPERF_PORT)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            try:
                _wait_listening(srv, SOCKPERF_PORT)
                return srv
            except RuntimeError as e:
                _kill(srv)
                out.seek(0)
                why = f"{e}: {out.read().decode(errors='replace').strip()[-300:]}"
        time.sleep(0.5 * (i + 1))
    raise RuntimeError(f"sockperf server did not start in {attempts} attempts: {why}")


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
    tb: Testbed, client: Pod, server: Pod, host: str, port: int, seconds: float, streams: int = 1
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
            ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J"],
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
    srv = _sockperf_server(tb, server)
    try:
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
    each0 = procs.cpu_each() if procs else {}
    many = guarded(
        f"iperf3 -P {PARALLEL_STREAMS}",
        lambda: _t_iperf(
            tb,
            client,
            server,
            host,
            ports.get(IPERF_PORT, IPERF_PORT),
            seconds,
            PARALLEL_STREAMS,
        ),
    )
    if many is not None:
        row["parallel_gbit_s"] = round(many["bits_per_second"] / 1e9, 2)
        if procs and many["bytes"]:
            used = {k: v - each0[k] for k, v in procs.cpu_each().items()}
            row["parallel_cpu_s_per_gb"] = round(sum(used.values()) / (many["bytes"] / 1e9), 3)
            # the busiest relaying process's cores: above 1.0 it used more than one
            row["parallel_max_cores"] = round(max(used.values()) / seconds, 2)
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
    cpu0 = procs.cpu() if procs else 0.0
    cps = guarded(
        "cps",
        lambda: _t_cps(tb, client, server, host, ports.get(CPS_PORT, CPS_PORT), min(seconds, 2.0)),
    )
    if cps is not None:
        row["conn_per_s"] = round(cps["conn_per_s"])
        if procs and cps["ok"]:  # the relaying processes' CPU per new connection
            row["cpu_ms_per_conn"] = round((procs.cpu() - cpu0) / cps["ok"] * 1000, 3)
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


def _stop_stunnel(tb: Testbed, pids: dict[str, int]) -> None:
    """Kill the pair _start_stunnel spawned (the testbed would at its close)."""
    for p in tb._spawned:
        if p.proc.pid in pids.values():
            _kill(p.proc)


def _agents(*nodes: AgentNode) -> _Procs:
    return _Procs({an.node.name: an.agent.pid for an in nodes if an.agent is not None})


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    """Environment for the agents started inside (they inherit it)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


_CODE_LINE = re.compile(r"agent code at (\S+);")


def _agent_code(an: AgentNode) -> str:
    """The agent package the node's running agent imported (its start log)."""
    found = _CODE_LINE.findall(an.log_tail(200_000))
    if not found:
        raise RuntimeError(f"{an.node.name}: the agent's log does not say which code it runs")
    return str(found[-1])


_SETUP_LINES = {
    "malloc": re.compile(r"malloc: (.+)$", re.M),
    "hbone_tls": re.compile(r"HBONE TLS: (\S+)", re.M),
    "event_loop": re.compile(r"event loop: (\S+)", re.M),
}


def _agent_setup(an: AgentNode) -> dict[str, str]:
    """What the running agent says it set up (its start log): the malloc
    thresholds, the HBONE TLS path and the event loop, so a report shows
    that each row ran what its variant asked for."""
    tail = an.log_tail(200_000)
    out = {}
    for key, rx in _SETUP_LINES.items():
        found = rx.findall(tail)
        out[key] = found[-1].strip() if found else "?"
    return out


def _variant_env(env: dict[str, str]) -> dict[str, str]:
    """A variant naming another tree (PYTHONPATH) also gets PYTHONSAFEPATH:
    `python -m agent.cli` otherwise puts the working directory first on
    sys.path, and run from a checkout the agent imports that checkout, not
    the tree asked for (an A/B of one version with itself)."""
    return {**env, "PYTHONSAFEPATH": "1"} if "PYTHONPATH" in env else env


def variant_code(env: dict[str, str]) -> str | None:
    """The agent package a variant's environment names (PYTHONPATH's first
    tree), None when it names none."""
    if "PYTHONPATH" not in env:
        return None
    return str((Path(env["PYTHONPATH"].split(os.pathsep)[0]) / "agent").resolve())


def _check_variant_code(name: str, env: dict[str, str], *nodes: AgentNode) -> str:
    """The code each restarted agent runs: the PYTHONPATH tree's when one is named."""
    want = variant_code(env)
    got = ""
    for an in nodes:
        got = _agent_code(an)
        if want is not None and got != want:
            raise RuntimeError(
                f"variant {name}: the agent on {an.node.name} runs {got}, not {want} "
                f"(PYTHONPATH={env['PYTHONPATH']})"
            )
    return got


def run_tunnel(
    seconds: float,
    cross_only: bool = False,
    variants: dict[str, dict[str, str]] | None = None,
    variants_first: bool = False,
) -> dict[str, Any]:
    """One run.  ``variants``: more cross-node tether rows, each with both agents
    restarted under extra environment (e.g. TETHER_LOOP, or PYTHONPATH naming
    another tree of the agent: an A/B of two versions in one run);
    ``variants_first`` measures them before the code as it is."""
    results: dict[str, dict[str, Any]] = {}
    config: dict[str, Any] = {}
    t0 = time.monotonic()
    load0 = os.getloadavg()
    cpu0 = cpu_times()
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
            if not cross_only:
                results["direct, same-node (no mesh)"] = _measure_path(
                    tb, c, e, e.ip4, seconds, None
                )
            pids, confs = _start_stunnel(tb, Path(tmp), n1.node, n2.node, d)
            stun = _Procs(pids)
            results["stunnel pair, cross-node"] = _measure_path(
                tb, c, d, n1.node.gateway4, seconds, stun
            )
            _stop_stunnel(tb, pids)  # done with stunnel: free the cores for the agents
            config["stunnel"] = confs

            # The tether cross-node rows, the code as it is first; with
            # variants_first the variants go first (a later row fares better
            # on latency in an A/A run: alternate the order across runs).
            rows: list[tuple[str, str, dict[str, str] | None]] = [
                ("tether cross-node (HBONE)", "", None)
            ]
            rows += [
                (f"tether cross-node [{n}]", n, _variant_env(v))
                for n, v in (variants or {}).items()
            ]
            order = rows[1:] + rows[:1] if variants_first else rows
            config["cross_row_order"] = [r[0] for r in order]
            measured: dict[str, dict[str, Any]] = {}
            for i, (label, name, env) in enumerate(order):
                if i:
                    n1.stop_agent()
                    n2.stop_agent()
                with _env(env or {}):
                    n1.start_agent()
                    n2.start_agent()
                if env is None:
                    config["agent_code"] = _agent_code(n1)
                else:
                    config[f"agent_code [{name}]"] = _check_variant_code(name, env, n1, n2)
                config[f"agent_setup [{name or 'as is'}]"] = [_agent_setup(n) for n in (n1, n2)]
                measured[label] = _measure_path(
                    tb, a, b, b.ip4, seconds, _agents(n1, n2), diagnose=logs
                )
            for label, _, _ in rows:  # the table's order: as it is, then variants
                results[label] = measured[label]
            if order[-1][2] is not None:  # the same-node rows run the code as it is
                n1.stop_agent()
                n2.stop_agent()
                n1.start_agent()
                n2.start_agent()
            if not cross_only:
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
        # The baseline spends no relay CPU or memory: these compare to the stunnel pair,
        # and so do the targets (throughput, conn/s, latency added over direct).
        if row.get("p50_us") is not None and base.get("p50_us") is not None:
            row["p50_added_us"] = round(row["p50_us"] - base["p50_us"], 1)
        for key, ratio in (
            ("parallel_gbit_s", "parallel_x_stunnel"),
            ("parallel_cpu_s_per_gb", "parallel_cpu_x_stunnel"),
            ("throughput_gbit_s", "throughput_x_stunnel"),
            ("conn_per_s", "conn_x_stunnel"),
            ("p50_added_us", "p50_added_x_stunnel"),
            ("p99_us", "p99_x_stunnel"),
            ("cpu_s_per_gb", "cpu_x_stunnel"),
            ("rss_mib_total", "rss_x_stunnel"),
            ("vcpu_at_1k_rps", "vcpu_x_stunnel"),
        ):
            if row.get(key) is not None and ref.get(key):
                row[ratio] = round(row[key] / ref[key], 2)
    return {
        "seconds": seconds,
        "wall_s": round(time.monotonic() - t0, 1),
        "loadavg": [round(x, 2) for x in (*load0, *os.getloadavg())],
        "cpu_shares": cpu_shares(cpu0, cpu_times()),
        "variants": variants or {},
        "tools": {
            "throughput": "iperf3 -J, 1 stream",
            "parallel": f"iperf3 -J -P {PARALLEL_STREAMS}: Gbit/s, CPU s/GB and the busiest "
            "relaying process's cores (more than 1.0: it used more than one core)",
            "latency": "sockperf pp --tcp -m 1024 --full-rtt",
            "vcpu_at_1k_rps": f"relaying processes' CPU s per s while sockperf pp "
            f"--mps {RATE_MPS} -m 1024 runs (Istio publishes "
            "~0.06 vCPU per ztunnel at 1000 req/s, 1 KB)",
            "conn_per_s": "python stdlib client, 1 connection at a time: connect, "
            "1 byte each way, close (server closes first)",
            "cpu_ms_per_conn": "the relaying processes' CPU ms per new connection "
            "during the conn/s measurement",
        },
        "config": config,
        "results": results,
    }


# -- tether bench h2 ----------------------------------------------------------------

H2_BYTES = 256 * 1024 * 1024
H2_PROFILE_BYTES = 64 * 1024 * 1024
H2_FRAMES = (16 * 1024, 256 * 1024, 1024 * 1024)


def _h2_pair(frame: int, cls: Any = None) -> tuple[Any, Any, int]:
    """Client and server H2Connection (or ``cls``), settings as the tunnel's
    (agent.tunnel.h2conn), with ``frame`` as both sides' max frame size, and
    one CONNECT stream open."""
    import h2.config
    import h2.connection
    import h2.settings

    from agent.tunnel import h2conn

    conns = []
    for client in (True, False):
        h = (cls or h2.connection.H2Connection)(
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


H2_MESSAGE = 1024  # the vCPU@1k workload's message size
H2_MESSAGES = 20_000


def _h2_messages(fast: bool, n: int = H2_MESSAGES) -> dict[str, float]:
    """1 KiB request/response ping-pong on one stream through the agent's own
    h2 connection class (agent.tunnel.h2conn), each DataReceived acknowledged
    as the tunnel does, with its DATA fast path on or off; CPU µs per message
    (one DATA frame sent and received, with its share of WINDOW_UPDATEs)."""
    import h2.events

    from agent.tunnel import h2conn

    saved = h2conn.FAST_DATA
    h2conn.FAST_DATA = fast
    try:
        cl, sv, sid = _h2_pair(h2conn.MAX_FRAME, h2conn._H2Connection)
        msg = os.urandom(H2_MESSAGE)
        got = bytearray()
        t = time.thread_time()
        for i in range(n):
            a, b = (cl, sv) if i % 2 == 0 else (sv, cl)
            a.send_data(sid, msg)
            for ev in b.receive_data(b"".join(a.chunks_to_send())):
                if isinstance(ev, h2.events.DataReceived):
                    got += ev.data
                    b.acknowledge_received_data(ev.flow_controlled_length, sid)
            a.receive_data(b"".join(b.chunks_to_send()))
        cpu = time.thread_time() - t
    finally:
        h2conn.FAST_DATA = saved
    if bytes(got) != msg * n:
        raise RuntimeError("h2 messages: the bytes received are not the bytes sent")
    return {"us_per_message": round(cpu / n * 1e6, 2)}


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


def _tls_pair_contexts(options: int = 0) -> list[Any]:
    """[client, server] ssl.SSLContext: TLS 1.3 only, mutual, ECDSA P-256 leaves
    from one CA (the tunnel's settings, so AES-256-GCM); `options` OR-ed in."""
    import ssl

    with tempfile.TemporaryDirectory(prefix="tether-bench-tls-") as tmp:
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
            ctx.options |= options
            ctxs.append(ctx)
    return ctxs


def _tls_transfer(nbytes: int, chunk_size: int = 256 * 1024) -> dict[str, Any]:
    """The reference: the same bytes through a TLS 1.3 pair (memory BIOs, ECDSA P-256,
    the tunnel's TLS settings, so AES-256-GCM), encrypt + decrypt, no HTTP/2."""
    import ssl

    ctxs = _tls_pair_contexts()
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


# -- tether bench ktls ----------------------------------------------------------------
#
# Whether this node's kernel, OpenSSL and Python turn on kernel TLS, and what
# it saves: the same TLS 1.3 stream over loopback with OpenSSL's socket BIO,
# without and with SSL_OP_ENABLE_KTLS, in one run.  The event loop's TLS
# (asyncio's and uvloop's SSLProtocol) runs OpenSSL over memory BIOs, where
# OpenSSL cannot hand the keys to the kernel: kTLS needs TLS on the socket.


def tls_stat() -> dict[str, int]:
    """/proc/net/tls_stat (present once the tls module is loaded), else {}."""
    try:
        text = Path("/proc/net/tls_stat").read_text()
    except OSError:
        return {}
    return {k: int(v) for k, v in (ln.split() for ln in text.splitlines() if ln.strip())}


def _ktls_transfer(options: int, seconds: float, chunk_size: int = 256 * 1024) -> dict[str, Any]:
    """Send for `seconds` from a client thread to a server thread over loopback
    TLS 1.3 (socket BIOs); SHA-256 of what was sent and what arrived.  CPU is
    the two threads' time inside send and receive (TLS, TCP, and the kernel's
    encryption under kTLS), the hashing left out."""
    import hashlib
    import socket
    import threading

    cctx, sctx = _tls_pair_contexts(options)
    ls = socket.create_server(("127.0.0.1", 0))
    got: dict[str, Any] = {}

    def serve() -> None:
        s, _ = ls.accept()
        with sctx.wrap_socket(s, server_side=True) as t:
            got["server_ulp"] = tlssock.kernel_ulp(t)
            h, n, buf = hashlib.sha256(), 0, bytearray(1 << 20)
            view, cpu = memoryview(buf), 0.0
            while True:
                c0 = time.thread_time()
                r = t.recv_into(buf)
                cpu += time.thread_time() - c0
                if not r:
                    break
                h.update(view[:r])
                n += r
            got["received"], got["sha"], got["cpu"] = n, h.hexdigest(), cpu

    before = tls_stat()
    th = threading.Thread(target=serve, daemon=True)
    th.start()
    chunk = os.urandom(chunk_size)
    h, sent, cpu = hashlib.sha256(), 0, 0.0
    with cctx.wrap_socket(socket.create_connection(ls.getsockname(), timeout=60)) as c:
        client_ulp = tlssock.kernel_ulp(c)
        cipher = c.cipher()
        t0 = time.monotonic()  # after the handshake (seconds of it in a TCG guest)
        while sent == 0 or time.monotonic() - t0 < seconds:
            c0 = time.thread_time()
            c.sendall(chunk)
            cpu += time.thread_time() - c0
            h.update(chunk)
            sent += len(chunk)
        # FIN, then wait for the server's close: closing now, with the
        # server's session tickets unread, would send a RST and cut the tail
        c.shutdown(socket.SHUT_WR)
        while c.recv(1 << 16):
            pass
    th.join(60)
    ls.close()
    wall = time.monotonic() - t0
    cpu += got.get("cpu", 0.0)
    after = tls_stat()
    gb = sent / 1e9
    return {
        "cipher": f"{cipher[1]} {cipher[0]}" if cipher else "?",
        "client_ulp": client_ulp or "-",
        "server_ulp": got.get("server_ulp") or "-",
        "tls_stat": {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)},
        "bytes": sent,
        "intact": got.get("received") == sent and got.get("sha") == h.hexdigest(),
        "mb_s": round(sent / wall / 1e6),
        "cpu_s_per_gb": round(cpu / gb, 2) if gb else None,
    }


TLS_PATH_BYTES = 256 << 20


async def loopback_tcp_pair() -> tuple[Any, Any]:
    """(accepted, connected): both ends of one TCP connection on 127.0.0.1,
    non-blocking, made on the running loop."""
    import asyncio
    import socket

    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as ls:
        ls.setblocking(False)
        c = socket.socket()
        c.setblocking(False)
        accepted = loop.create_task(loop.sock_accept(ls))
        await loop.sock_connect(c, ls.getsockname())
        s, _ = await accepted
    s.setblocking(False)
    return s, c


def _tls_path_transfer(path: str, nbytes: int = TLS_PATH_BYTES) -> dict[str, Any]:
    """`nbytes` one way between two HBONE TLS transports of one path ("loop":
    the event loop's SSLProtocol; "socket": agent/tunnel/tlssock.py; "c":
    the same with the records moved by agent/tunnel/_tlscore.c) over
    loopback, both ends in this process on the agent's loop, mesh mTLS
    contexts.  CPU is the process's (both ends: encrypt and decrypt) without
    the receiver's hashing; SHA-256 and length checked."""
    import asyncio
    import hashlib
    import resource

    from agent import eventloop
    from agent.identity.ca import CertificateAuthority
    from agent.identity.embedded import EmbeddedCA
    from agent.identity.manager import CertificateManager
    from agent.identity.spiffe import SpiffeId

    class End(asyncio.Protocol):
        def __init__(self) -> None:
            self.n, self.h, self.hashing = 0, hashlib.sha256(), 0.0
            self.done = asyncio.get_running_loop().create_future()
            self.resumed: asyncio.Future[None] | None = None
            self.transport: Any = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            t = time.thread_time()
            self.h.update(data)
            self.hashing += time.thread_time() - t
            self.n += len(data)
            if self.n >= nbytes and not self.done.done():
                self.done.set_result(None)

        def pause_writing(self) -> None:
            self.resumed = asyncio.get_running_loop().create_future()

        def resume_writing(self) -> None:
            if self.resumed is not None and not self.resumed.done():
                self.resumed.set_result(None)

    async def main() -> dict[str, Any]:
        mgr = CertificateManager(EmbeddedCA(CertificateAuthority.generate("cluster.local")))
        web, db = SpiffeId("cluster.local", "b", "web"), SpiffeId("cluster.local", "a", "db")
        sctx, cctx = await mgr.ssl_context_server(web), await mgr.ssl_context_client(db)
        loop = asyncio.get_running_loop()
        s, c = await loopback_tcp_pair()
        server, client = End(), End()
        if path in ("socket", "c"):
            connect = tlssock.connect if path == "socket" else tlssock.connect_core
            await asyncio.gather(
                connect(loop, server, s, sctx, server_side=True, timeout=30),
                connect(loop, client, c, cctx, server_side=False, timeout=30),
            )
        else:
            await asyncio.gather(
                loop.connect_accepted_socket(lambda: server, s, ssl=sctx),
                loop.create_connection(lambda: client, sock=c, ssl=cctx, server_hostname=""),
            )
        chunk, sent, want = os.urandom(256 * 1024), 0, hashlib.sha256()
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
        while sent < nbytes:
            client.transport.write(chunk)
            want.update(chunk)
            sent += len(chunk)
            if client.resumed is not None and not client.resumed.done():
                await client.resumed
        await asyncio.wait_for(server.done, 600)
        wall = time.monotonic() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime) - server.hashing
        client.transport.close()
        server.transport.close()
        await mgr.close()
        return {
            "mb_s": round(sent / wall / 1e6),
            "cpu_s_per_gb": round(cpu / (sent / 1e9), 2),
            "intact": server.n == sent and server.h.hexdigest() == want.hexdigest(),
            "path": tlssock.established(client.transport, "client"),
        }

    return eventloop.run(main())


def run_tls_paths(runs: int = 3) -> dict[str, Any]:
    """The agent's two HBONE TLS paths, alternating, `runs` each; medians."""
    from agent import eventloop

    rows: dict[str, list[dict[str, Any]]] = {"loop": [], "socket": []}
    if tlssock.core_available():
        rows["c"] = []
    for _ in range(runs):
        for path in rows:
            rows[path].append(_tls_path_transfer(path))
    out: dict[str, Any] = {"loop_impl": eventloop.loop_factory()[0], "runs": runs}
    for path, rs in rows.items():
        out[path] = {
            "mb_s": statistics.median(r["mb_s"] for r in rs),
            "cpu_s_per_gb": statistics.median(r["cpu_s_per_gb"] for r in rs),
            "intact": all(r["intact"] for r in rs),
            "path": rs[0]["path"],
            "each": [(r["mb_s"], r["cpu_s_per_gb"]) for r in rs],
        }
    for path in rows:
        if path != "loop":
            out[f"{path}_cpu_ratio"] = round(
                out[path]["cpu_s_per_gb"] / out["loop"]["cpu_s_per_gb"], 2
            )
            out[f"{path}_mb_s_ratio"] = round(out[path]["mb_s"] / out["loop"]["mb_s"], 2)
    return out


def run_ktls(seconds: float) -> dict[str, Any]:
    import platform
    import ssl

    user = _ktls_transfer(0, seconds)
    ktls = _ktls_transfer(tlssock.SSL_OP_ENABLE_KTLS, seconds)
    return {
        "paths": run_tls_paths(),
        "kernel": platform.release(),
        "openssl": ssl.OPENSSL_VERSION,
        "python": platform.python_version(),
        "tls_module_loaded": Path("/sys/module/tls").exists(),
        "user_space": user,
        "ktls_requested": ktls,
        "ktls_tx": ktls["client_ulp"] == "tls",
        "cpu_ratio": (
            round(ktls["cpu_s_per_gb"] / user["cpu_s_per_gb"], 2)
            if ktls["cpu_s_per_gb"] and user["cpu_s_per_gb"]
            else None
        ),
    }


def _print_ktls(r: dict[str, Any], seconds: float) -> None:
    print(
        f"tether bench ktls: kernel {r['kernel']}, {r['openssl']}, Python {r['python']}, "
        f"tls module {'loaded' if r['tls_module_loaded'] else 'not loaded'}"
    )
    print(f"one TLS stream over loopback, socket BIOs, {seconds:g} s each, client -> server\n")
    print(f"{'path':52} {'ULP c/s':>9} {'MB/s':>6} {'CPU s/GB':>9} {'intact':>7}  tls_stat delta")
    for name, key in (("user-space TLS", "user_space"), ("SSL_OP_ENABLE_KTLS", "ktls_requested")):
        x = r[key]
        print(
            f"{name + ' (' + x['cipher'] + ')':52} {x['client_ulp'] + '/' + x['server_ulp']:>9} "
            f"{x['mb_s']:>6} {x['cpu_s_per_gb']!s:>9} {x['intact']!s:>7}  {x['tls_stat'] or '-'}"
        )
    if r["ktls_tx"]:
        print(f"\nkernel TLS on the sending side; CPU per GB {r['cpu_ratio']}x user-space TLS")
    else:
        print("\nno kernel TLS: the tls module is absent here, or OpenSSL was built without it")
    p = r["paths"]
    print(
        f"\nthe agent's HBONE TLS paths ({p['loop_impl']} loop), {TLS_PATH_BYTES >> 20} MiB "
        f"one way, both ends in one process, medians of {p['runs']} alternating runs:"
    )
    head = f"{'TETHER_TLS':12} {'path':10} {'MB/s':>6} {'CPU s/GB':>9} {'intact':>7}"
    print(f"{head}  each (MB/s, s/GB)")
    for name in ("loop", "socket", "c"):
        if name not in p:
            print(f"{name:12} (not built: pip install -e . with gcc, python3-dev, libssl-dev)")
            continue
        x = p[name]
        print(
            f"{name:12} {x['path']:10} {x['mb_s']:>6} {x['cpu_s_per_gb']:>9} "
            f"{x['intact']!s:>7}  {x['each']}"
        )
    for name in ("socket", "c"):
        if name in p:
            print(
                f"{name} / loop: CPU per GB {p[name + '_cpu_ratio']}x, "
                f"MB/s {p[name + '_mb_s_ratio']}x"
            )


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
    fast, slow = [], []
    for _ in range(3):  # alternating, medians
        slow.append(_h2_messages(False)["us_per_message"])
        fast.append(_h2_messages(True)["us_per_message"])
    messages = {
        "message_bytes": H2_MESSAGE,
        "messages": H2_MESSAGES,
        "h2_us": statistics.median(slow),
        "fast_path_us": statistics.median(fast),
        "gain": round(statistics.median(s / f for s, f in zip(slow, fast, strict=True)), 2),
    }
    return {
        "messages": messages,
        "bytes": H2_BYTES,
        "profile_bytes": H2_PROFILE_BYTES,
        "h2": h2.__version__,
        "hyperframe": hyperframe.__version__,
        "frames": rows,
        "tls_reference": _tls_transfer(H2_BYTES),
    }


# -- tether bench profile ------------------------------------------------------------
#
# Where the tunnel's CPU goes: iperf3 through the cross-node HBONE path while
# py-spy samples both agents (native frames included), every sample assigned
# to one bucket by its innermost recognised frame.

PROFILE_RATE = 250  # samples/s per agent
_SYSCALLS = frozenset(
    ("send", "recv", "sendmsg", "recvmsg", "sendto", "recvfrom", "write", "read", "writev")
)
_PY_BUCKETS = (  # by the frame's file, as py-spy prints it (relative to sys.path)
    ("h2/hyperframe/hpack framing", ("h2/", "hyperframe/", "hpack/")),
    ("asyncio TLS glue (sslproto)", ("asyncio/sslproto.py",)),
    ("event loop (asyncio, selectors)", ("asyncio/", "selectors.py")),
    ("tether relay (agent/tunnel)", ("agent/tunnel/",)),
)


def _bucket(stack: str) -> str | None:
    """The bucket of one sampled stack (None: idle, a thread waiting).  The
    innermost frame that says something decides: native frames by library
    (an unnamed libc address under Python code is memcpy/memmove of bytes
    slicing and joining: the named libc calls are syscalls), Python frames
    by file; interpreter frames are skipped over."""
    if "acquire_lock" in stack or stack.endswith(
        ("epoll_wait (libc.so.6)", "epoll_pwait (libc.so.6)")
    ):
        return None
    py = [f for f in stack.split(";") if ".py:" in f]
    if py and py[-1].startswith("_worker (concurrent/futures/thread.py"):
        return None  # an idle executor thread waiting for work
    for frame in reversed(stack.split(";")):
        name, _, where = frame.partition(" (")
        if "libcrypto" in where:
            return "TLS crypto (libcrypto)"
        if "libssl" in where or "_ssl." in where or where.startswith("ssl.py"):
            return "TLS records (libssl, _ssl, ssl.py)"
        if where.startswith("libc.so"):
            if name in _SYSCALLS or name.startswith("__libc_"):
                return "syscalls (send/recv)"
            if name.startswith("0x") or "mem" in name:
                return "copies (libc memcpy/memmove)"
            continue
        for bucket, keys in _PY_BUCKETS:
            if where.startswith(keys):
                return bucket
        if "uvloop" in where or where.startswith("loop.cpython"):
            return "event loop (uvloop: libuv and its TLS glue)"
    return "other (interpreter, GC, ...)"


def _collapsed_buckets(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        b = _bucket(stack)
        if b is not None:
            counts[b] = counts.get(b, 0) + int(n)
    return counts


@contextlib.contextmanager
def two_nodes() -> Iterator[tuple[Testbed, AgentNode, AgentNode, Pod, Pod]]:
    """Two simulated nodes with a client pod `a` on node1 and a server pod `b`
    on node2, both in the enrolled namespace `mesh`; no agent started yet."""
    with Testbed() as tb:
        cluster = Cluster(tb)
        try:
            n1 = AgentNode(tb, "node1", cluster=cluster)
            n2 = AgentNode(tb, "node2", cluster=cluster)
            a = n1.add_pod("a", "mesh", "client")
            b = n2.add_pod("b", "mesh", "server")
            n1.enroll_namespace("mesh")
            yield tb, n1, n2, a, b
        finally:
            cluster.close()


def run_profile(seconds: float, out_dir: str, workload: str = "throughput") -> dict[str, Any]:
    """``workload``: throughput (iperf3, one stream), connections (the
    connect-per-request client of `bench tunnel`) or messages (sockperf's 1 KiB
    ping-pong at RATE_MPS, the vCPU@1k measure); CPU is per GB, per 1,000
    connections or per 1,000 messages (a request and its reply each way)."""
    pyspy = shutil.which("py-spy") or str(Path(PY).parent / "py-spy")
    if not Path(pyspy).exists():
        raise RuntimeError("py-spy not installed (pip install py-spy)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"seconds": seconds, "workload": workload, "agents": {}}
    with two_nodes() as (tb, n1, n2, a, b):
        n1.start_agent()
        n2.start_agent()
        agents = {"sender (node1)": n1, "receiver (node2)": n2}
        procs = _agents(n1, n2)
        spies: dict[str, tuple[subprocess.Popen[Any], Path]] = {}
        for role, an in agents.items():
            assert an.agent is not None
            tag = an.node.name
            raw = out / f"{tag}.txt"
            spies[role] = (
                subprocess.Popen(
                    [
                        pyspy,
                        "record",
                        "--native",
                        "--format",
                        "raw",
                        "-r",
                        str(PROFILE_RATE),
                        "-d",
                        str(int(seconds) + 2),
                        "-o",
                        str(raw),
                        "--pid",
                        str(an.agent.pid),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                ),
                raw,
            )
        time.sleep(1.0)
        cpu0 = {r: proc_cpu(an.agent.pid) for r, an in agents.items() if an.agent}
        if workload == "connections":
            cps = _t_cps(tb, a, b, b.ip4, CPS_PORT, seconds)
            ip = {"bytes": cps["ok"] * 1e6, "bits_per_second": 0.0}  # "GB" = 1,000 conns
            report["conn_per_s"] = round(cps["conn_per_s"])
        elif workload == "messages":
            t = max(2, round(seconds))
            rc, text, wall = _sockperf_pp(
                tb, a, b, b.ip4, SOCKPERF_PORT, ["--mps", str(RATE_MPS), "-t", str(t)], t + 20
            )
            if rc != 0:
                raise RuntimeError(f"sockperf --mps: {text[-500:]}")
            ip = {"bytes": RATE_MPS * wall * 1e6, "bits_per_second": 0.0}  # "GB" = 1,000 msgs
            report["messages_per_s"] = RATE_MPS
        else:
            ip = _t_iperf(tb, a, b, b.ip4, IPERF_PORT, seconds)
        cpu = {r: proc_cpu(an.agent.pid) - cpu0[r] for r, an in agents.items() if an.agent}
        for p, _ in spies.values():
            p.wait(seconds + 30)
        del procs
    gb = ip["bytes"] / 1e9
    report["throughput_gbit_s"] = round(ip["bits_per_second"] / 1e9, 2)
    for role, (_, raw) in spies.items():
        counts = _collapsed_buckets(raw)
        total = sum(counts.values()) or 1
        cpu_gb = cpu[role] / gb
        report["agents"][role] = {
            "cpu_s_per_gb": round(cpu_gb, 3),
            "samples": total,
            "raw": str(raw),
            "buckets": {
                k: {"pct": round(100 * v / total, 1), "cpu_s_per_gb": round(cpu_gb * v / total, 3)}
                for k, v in sorted(counts.items(), key=lambda kv: -kv[1])
            },
        }
    return report


def _print_profile(report: dict[str, Any]) -> None:
    if report.get("workload") == "connections":
        print(
            f"tether bench profile --workload connections: {report['conn_per_s']} new "
            f"connections/s cross-node over HBONE; figures are CPU s per 1,000 connections "
            f"(shown as s/GB)\n"
        )
    elif report.get("workload") == "messages":
        print(
            f"tether bench profile --workload messages: sockperf ping-pong, 1 KiB at "
            f"{report['messages_per_s']}/s cross-node over HBONE; figures are CPU s per 1,000 "
            f"messages (shown as s/GB)\n"
        )
    else:
        print(
            f"tether bench profile: iperf3 single stream cross-node over HBONE, "
            f"{report['seconds']:g} s, {report['throughput_gbit_s']} Gbit/s; py-spy --native "
            f"{PROFILE_RATE}/s per agent, each sample in the bucket of its innermost known frame\n"
        )
    for role, r in report["agents"].items():
        print(f"{role}: {r['cpu_s_per_gb']} CPU s/GB ({r['samples']} samples, {r['raw']})")
        for k, v in r["buckets"].items():
            print(f"  {k:42} {v['pct']:>5} %  {v['cpu_s_per_gb']:>6} s/GB")


# -- tether bench memory -------------------------------------------------------------
#
# The agent's resident memory at rest with 10 enrolled pods, and what 1,000 open
# connections (cross-node HBONE streams, held open by a stdlib client) add to it.

MEM_PODS = 10
MEM_CONNS = 1000
MEM_PORT = 7100
_HOLD_SCRIPT = r"""
import resource, socket, sys
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
if mode == "serve":
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(4096)
    print("ready", flush=True)
    held = []
    while True:
        c, _ = s.accept()
        if c.recv(1):
            c.sendall(b"y")
        held.append(c)
n = int(sys.argv[4])
held = []
for _ in range(n):
    c = socket.create_connection((host, port), timeout=10)
    c.sendall(b"x")
    if c.recv(1) != b"y":
        raise SystemExit("no reply")
    held.append(c)
print("open", flush=True)
sys.stdin.read()
"""


def _settle_rss(pid: int, wait: float = 3.0) -> float:
    time.sleep(wait)
    return proc_rss_mib(pid)


def _rss_after_trim(an: AgentNode) -> float | None:
    """RSS once the agent logged its trim after start; None if it did not
    within limits.STARTUP_TRIM_S + 20 s (reported as missing, not guessed)."""
    assert an.agent is not None
    deadline = time.monotonic() + limits.STARTUP_TRIM_S + 20
    while time.monotonic() < deadline:
        if "memory after start:" in an.log_tail(400):
            return _settle_rss(an.agent.pid, 1.0)
        time.sleep(0.5)
    return None


def run_memory(pods: int = MEM_PODS, conns: int = MEM_CONNS) -> dict[str, Any]:
    report: dict[str, Any] = {"pods": pods, "connections": conns}
    with two_nodes() as (tb, n1, n2, client, server):
        for i in range(1, pods):
            n1.add_pod(f"p{i}", "mesh", "idle")
        n1.start_agent()
        n2.start_agent()
        assert n1.agent is not None and n2.agent is not None
        m = re.search(r"agent ready: (\d+) pods enrolled", n1.log_tail(400))
        report["enrolled_node1"] = int(m.group(1)) if m else None
        report["rss_rest_mib"] = _settle_rss(n1.agent.pid)
        report["rss_rest_server_node_mib"] = proc_rss_mib(n2.agent.pid)
        # and once the agent has returned its start's freed heap (it
        # logs that STARTUP_TRIM_S after ready): the figure at rest
        report["rss_rest_trimmed_mib"] = _rss_after_trim(n1)
        srv = tb.spawn(
            server,
            [PY, "-c", _HOLD_SCRIPT, "serve", "0.0.0.0", str(MEM_PORT)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert srv.stdout is not None
            if b"ready" not in srv.stdout.readline():
                raise RuntimeError("holding server did not start")
            cli = tb.spawn(
                client,
                [PY, "-c", _HOLD_SCRIPT, "connect", server.ip4, str(MEM_PORT), str(conns)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            assert cli.stdout is not None and cli.stdin is not None
            t = time.monotonic()
            line = cli.stdout.readline()
            if b"open" not in line:
                raise RuntimeError(
                    f"holding client: {cli.stderr.read().decode()[-500:] if cli.stderr else ''}"
                )
            report["open_s"] = round(time.monotonic() - t, 2)
            report["rss_open_mib"] = _settle_rss(n1.agent.pid, 2.0)
            report["rss_open_server_node_mib"] = proc_rss_mib(n2.agent.pid)
            cli.stdin.close()
            cli.wait(30)
        finally:
            _kill(srv)
    per = 1000 / conns
    report["client_agent_mib_per_1k"] = round(
        (report["rss_open_mib"] - report["rss_rest_mib"]) * per, 1
    )
    report["server_agent_mib_per_1k"] = round(
        (report["rss_open_server_node_mib"] - report["rss_rest_server_node_mib"]) * per, 1
    )
    return report


async def _loop_gap(work: Any) -> tuple[float, float]:
    """(seconds `work()` took, the event loop's worst gap meanwhile, seen by
    a task that sleeps 1 ms at a time)."""
    worst, done = 0.0, False

    async def tick() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst, last = max(worst, now - last), now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    await work()
    took = time.perf_counter() - t0
    done = True
    await ticker
    return took, worst


async def _first_and_next(row: dict[str, float], key: str, calls: list[Any]) -> None:
    """Awaits each of `calls` in turn under _loop_gap; row[key_first_ms] is
    the first (the worker's start with it), row[key_next_ms] the mean of the
    rest, row[key_loop_gap_ms] the loop's worst gap throughout."""
    first = 0.0

    async def work() -> None:
        nonlocal first
        t0 = time.perf_counter()
        await calls[0]()
        first = time.perf_counter() - t0
        for call in calls[1:]:
            await call()

    took, gap = await _loop_gap(work)
    row[f"{key}_first_ms"] = first * 1e3
    row[f"{key}_next_ms"] = (took - first) / (len(calls) - 1) * 1e3
    row[f"{key}_loop_gap_ms"] = gap * 1e3


def run_workers(runs: int = 3, pods: int = MEM_PODS) -> dict[str, Any]:
    """What the two worker processes cost, against the same work done in the
    agent's process on its event loop (as before the workers), in one run:
    `pods` fresh netns get the delivery routing (podnet), `pods` identities
    a certificate from the local CA (issuer).  Medians of `runs`."""
    from agent import netns as nsmod
    from agent.datapath import podnet
    from agent.identity.ca import CertificateAuthority
    from agent.identity.embedded import EmbeddedCA, WorkerCA
    from agent.identity.spiffe import SpiffeId

    prefix = random_prefix("tw")
    names = [f"{prefix}-p{i}" for i in range(pods)]
    ids = [SpiffeId("cluster.local", "bench", f"sa{i}") for i in range(pods)]
    rows: list[dict[str, float]] = []
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix=f"tether-{prefix}-") as tmp:
        paths = [str(nsmod.create_netns(n)) for n in names]
        try:
            for n in names:
                subprocess.run(["ip", "-n", n, "link", "set", "lo", "up"], check=True)
            ca_dir = f"{tmp}/ca"
            WorkerCA(ca_dir, "cluster.local").check()
            embedded = EmbeddedCA(CertificateAuthority.load(ca_dir, "cluster.local"))

            async def one() -> dict[str, float]:
                row: dict[str, float] = {}
                w = podnet.Worker()
                prepares = [functools.partial(w.call, "prepare", p) for p in paths]
                await _first_and_next(row, "podnet", prepares)
                row["podnet_worker_rss_mib"] = proc_rss_mib(w._proc.pid) if w._proc else 0
                for p in paths:
                    await w.call("unprepare", p)

                async def routing_in_process() -> None:
                    # as Datapath.enroll did: pyroute2 on a thread (it runs a
                    # loop of its own), the event loop blocked until it ended
                    for p in paths:
                        with concurrent.futures.ThreadPoolExecutor(1) as ex:
                            ex.submit(podnet._prepare, p).result()
                        await asyncio.sleep(0)

                took, gap = await _loop_gap(routing_in_process)
                row["podnet_in_process_ms"] = took / pods * 1e3
                row["podnet_in_process_loop_gap_ms"] = gap * 1e3
                for p in paths:
                    await w.call("unprepare", p)
                await w.aclose()

                local = WorkerCA(ca_dir, "cluster.local")
                fetches = [functools.partial(local.fetch, i) for i in ids]
                await _first_and_next(row, "issuer", fetches)
                proc = local.worker._proc
                row["issuer_worker_rss_mib"] = proc_rss_mib(proc.pid) if proc else 0
                await local.aclose()

                async def issue_in_process() -> None:
                    for i in ids:
                        await embedded.fetch(i)
                        await asyncio.sleep(0)

                took, gap = await _loop_gap(issue_in_process)
                row["issuer_in_process_ms"] = took / pods * 1e3
                row["issuer_in_process_loop_gap_ms"] = gap * 1e3
                return row

            for _ in range(runs):
                rows.append(asyncio.run(one()))
        finally:
            for n in names:
                nsmod.delete_netns(n)
    med = {k: round(statistics.median(r[k] for r in rows), 1) for k in rows[0]}
    return {
        "pods": pods,
        "runs": runs,
        "loadavg": [round(x, 2) for x in (*load0, *os.getloadavg())],
        "median": med,
        "per_run": [{k: round(v, 1) for k, v in r.items()} for r in rows],
    }


def _format_memory(r: dict[str, Any]) -> str:
    return (
        f"tether bench memory: agent RSS, node1 with {r['pods']} pods in the mesh "
        f"({r['enrolled_node1']} enrolled)\n"
        f"  at rest: node1 {r['rss_rest_mib']} MiB, node2 (1 pod) "
        f"{r['rss_rest_server_node_mib']} MiB\n"
        f"  at rest after the agent's trim after start: node1 "
        f"{r.get('rss_rest_trimmed_mib') or 'n/a (no trim logged)'} MiB\n"
        f"  with {r['connections']} open cross-node HBONE connections (opened in "
        f"{r['open_s']} s): node1 {r['rss_open_mib']} MiB, node2 "
        f"{r['rss_open_server_node_mib']} MiB\n"
        f"  per 1,000 open connections: client side +{r['client_agent_mib_per_1k']} MiB, "
        f"server side +{r['server_agent_mib_per_1k']} MiB"
    )


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
    runs = report.get("runs", 1)
    print(
        f"tether bench tunnel: two simulated nodes, {report['seconds']:g} s per measurement, "
        f"{runs} run(s){', medians' if runs > 1 else ''} ({report['wall_s']} s in all)"
    )
    loads = report.get("loadavg_runs") or [report.get("loadavg")]
    print("  load average (1/5/15 min) at start and end of each run: " + "; ".join(map(str, loads)))
    shares = report.get("cpu_shares_runs") or [report.get("cpu_shares")]
    if any(shares):
        print(
            "  the machine's CPU time in each run (/proc/stat, % of all cores): "
            + "; ".join(
                ", ".join(f"{k} {v}" for k, v in sh.items()) if sh else "-" for sh in shares
            )
        )
    if report.get("busy"):
        print(f"  under load: {report['busy']} busy-loop process(es) spinning throughout (--busy)")
    for what, tool in report["tools"].items():
        print(f"  {what}: {tool}")
    for name, env in report.get("variants", {}).items():
        print(f"  variant [{name}]: agents started with {env}")
    setups = {k: v for k, v in report.get("config", {}).items() if k.startswith("agent_setup")}
    for key, per_node in setups.items():
        said = {tuple(sorted(d.items())) for d in per_node}
        shown = "; ".join(", ".join(f"{k}: {v}" for k, v in t) for t in sorted(said))
        print(f"  {key[len('agent_setup ') :]} agents said: {shown}")
    print(
        "  x = ratio to direct; x st = ratio to the stunnel pair (same run); CPU and RSS are "
        "of the relaying processes (both agents, or both stunnels); +p50 = p50 added over "
        "direct\n"
    )

    def v(r: dict[str, Any], k: str) -> str:
        x = r.get(k)
        return "-" if x is None else f"{x:g}" if isinstance(x, float) else str(x)

    print(
        f"{'path':34} {'Gbit/s':>7} {'x st':>5} {'p50 us':>7} {'+p50':>6} {'x st':>5} "
        f"{'p99 us':>7} {'x st':>5} {'conn/s':>7} {'x st':>5} {'CPU s/GB':>8} {'x st':>5} "
        f"{'vCPU@1k':>7} {'x st':>5} {'RSS MiB':>8} {'x st':>5}"
    )
    for name, r in report["results"].items():
        print(
            f"{name:34} {v(r, 'throughput_gbit_s'):>7} {v(r, 'throughput_x_stunnel'):>5} "
            f"{v(r, 'p50_us'):>7} {v(r, 'p50_added_us'):>6} {v(r, 'p50_added_x_stunnel'):>5} "
            f"{v(r, 'p99_us'):>7} {v(r, 'p99_x_stunnel'):>5} "
            f"{v(r, 'conn_per_s'):>7} {v(r, 'conn_x_stunnel'):>5} "
            f"{v(r, 'cpu_s_per_gb'):>8} {v(r, 'cpu_x_stunnel'):>5} "
            f"{v(r, 'vcpu_at_1k_rps'):>7} {v(r, 'vcpu_x_stunnel'):>5} "
            f"{v(r, 'rss_mib_total'):>8} {v(r, 'rss_x_stunnel'):>5}"
        )
    print(
        f"\n{PARALLEL_STREAMS} streams at once (iperf3 -P {PARALLEL_STREAMS}):\n"
        f"{'path':34} {'Gbit/s':>7} {'x st':>5} {'CPU s/GB':>8} {'x st':>5} {'max cores':>9}"
    )
    for name, r in report["results"].items():
        print(
            f"{name:34} {v(r, 'parallel_gbit_s'):>7} {v(r, 'parallel_x_stunnel'):>5} "
            f"{v(r, 'parallel_cpu_s_per_gb'):>8} {v(r, 'parallel_cpu_x_stunnel'):>5} "
            f"{v(r, 'parallel_max_cores'):>9}"
        )
    for name, r in report["results"].items():
        if r.get("rss_mib"):
            print(f"  RSS {name}: " + ", ".join(f"{k} {m} MiB" for k, m in r["rss_mib"].items()))
        for tool, err in r.get("errors", {}).items():
            print(f"  ERROR {name} / {tool}: {err}")
    for name, r in report["results"].items():
        if not name.startswith("tether cross-node"):
            continue
        marks = []
        for key, op, bound in TARGETS:
            x = r.get(key)
            ok = x is not None and (x >= bound if op == ">=" else x <= bound)
            marks.append(f"{key} {v(r, key)} (target {op} {bound:g}: {'met' if ok else 'MISSED'})")
        print(f"  targets, {name}: " + "; ".join(marks))


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
    m = report.get("messages")
    if m:
        print(
            f"\n{m['message_bytes']} B messages, one stream, ping-pong through the agent's h2 "
            f"connection (agent.tunnel.h2conn), every DATA acked: CPU µs per message, "
            f"median of 3\n  h2 as shipped {m['h2_us']}  DATA fast path {m['fast_path_us']}  "
            f"gain {m['gain']}x"
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


_CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def cpu_times() -> dict[str, int]:
    """The machine's CPU time so far, all cores (/proc/stat's first line, ticks)."""
    with open("/proc/stat") as f:
        values = f.readline().split()[1:]
    return {k: int(v) for k, v in zip(_CPU_FIELDS, values, strict=False)}


def cpu_shares(before: dict[str, int], after: dict[str, int]) -> dict[str, float]:
    """% of all cores' time between two cpu_times() spent busy, idle, and
    stolen by the hypervisor (steal: time this VM's vCPUs wanted and did
    not get, one cause of run-to-run spread no load average shows)."""
    d = {k: after.get(k, 0) - before.get(k, 0) for k in _CPU_FIELDS}
    total = sum(d.values())
    if total <= 0:
        return {"busy": 0.0, "idle": 0.0, "steal": 0.0}
    idle = d["idle"] + d["iowait"]
    return {
        "busy": round(100 * (total - idle - d["steal"]) / total, 1),
        "idle": round(100 * idle / total, 1),
        "steal": round(100 * d["steal"] / total, 1),
    }


def median_runs(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several runs: each number the median over the runs that have
    it (ratios are taken within each run first, then their median)."""
    out = dict(reports[-1])
    out["runs"] = len(reports)
    out["per_run"] = [r["results"] for r in reports]
    out["wall_s"] = round(sum(r["wall_s"] for r in reports), 1)
    out["loadavg_runs"] = [r["loadavg"] for r in reports]
    out["cpu_shares_runs"] = [r.get("cpu_shares") for r in reports]
    out["row_order_runs"] = [r.get("config", {}).get("cross_row_order") for r in reports]
    results: dict[str, dict[str, Any]] = {}
    for name in reports[0]["results"]:
        rows = [r["results"][name] for r in reports if name in r["results"]]
        row: dict[str, Any] = {}
        for key in {k for r in rows for k in r}:
            vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
            if vals:
                row[key] = round(statistics.median(vals), 3)
            elif key == "rss_mib":
                row[key] = {
                    k: statistics.median(r[key][k] for r in rows if k in r.get(key, {}))
                    for k in rows[-1].get(key, {})
                }
            elif key == "errors":
                row[key] = {k: v for r in rows for k, v in r.get("errors", {}).items()}
        results[name] = row
    out["results"] = results
    return out


# target: (ratio key, comparison, bound)
TARGETS = (
    ("throughput_x_stunnel", ">=", 1.0),
    ("cpu_x_stunnel", "<=", 1.0),
    ("conn_x_stunnel", ">=", 5.0),
    ("vcpu_x_stunnel", "<=", 1.3),
    ("p50_added_x_stunnel", "<=", 1.0),
)


@contextlib.contextmanager
def busy_loops(n: int) -> Iterator[None]:
    """``n`` processes spinning on the CPU for the duration: a reproducible
    "under load" (the issue's targets hold on a quiet machine and again with
    the other core busy)."""
    procs = [
        subprocess.Popen([PY, "-c", "while True: pass"], stdin=subprocess.DEVNULL) for _ in range(n)
    ]
    try:
        yield
    finally:
        for p in procs:
            _kill(p)


def main(
    what: str,
    seconds: float = 3.0,
    json_out: bool = False,
    out_dir: str = "profile",
    runs: int = 1,
    cross_only: bool = False,
    variants: dict[str, dict[str, str]] | None = None,
    workload: str = "throughput",
    connections: int = MEM_CONNS,
    busy: int = 0,
) -> int:
    if what == "workers":
        print(json.dumps(run_workers(max(runs, 3)), indent=1))
        return 0
    if what == "memory":
        mreport = run_memory(conns=connections)
        print(json.dumps(mreport, indent=1) if json_out else _format_memory(mreport))
        return 0
    if what == "tunnel":
        reports = []
        with busy_loops(busy):
            for i in range(runs):
                # every second run measures the variants first: row position
                # alone moved latency by 13-27 % in an A/A run (README)
                reports.append(
                    run_tunnel(
                        seconds, cross_only=cross_only, variants=variants, variants_first=i % 2 == 1
                    )
                )
                if runs > 1 and not json_out:
                    last = reports[-1]
                    print(f"run {i + 1}/{runs}: {last['wall_s']} s, load {last['loadavg']}")
        report = median_runs(reports) if runs > 1 else reports[0]
        report["busy"] = busy
        if json_out:
            print(json.dumps(report, indent=1))
        else:
            _print_tunnel(report)
        return 0
    if what == "profile":
        report = run_profile(seconds, out_dir, workload)
        if json_out:
            print(json.dumps(report, indent=1))
        else:
            _print_profile(report)
        return 0
    if what == "ktls":
        kreport = run_ktls(seconds)
        if json_out:
            print(json.dumps(kreport, indent=1))
        else:
            _print_ktls(kreport, seconds)
        intact = [kreport[k]["intact"] for k in ("user_space", "ktls_requested")]
        intact += [kreport["paths"][k]["intact"] for k in ("loop", "socket")]
        return 0 if all(intact) else 1
    if what == "datapath":
        report = run(seconds)
    elif what == "h2":
        report = run_h2()
    else:
        raise SystemExit(f"unknown benchmark {what!r}")
    if json_out:
        print(json.dumps(report, indent=1))
    elif what == "datapath":
        _print_datapath(report, seconds)
    else:
        _print_h2(report)
    return 0
