"""tether on a real Kubernetes node, installed and used as a user would.

One node (tests/node/node.py), shared by the tests below, which run in file
order and depend on each other: install (kubectl apply -k), workloads in an
ambient namespace, capture checks, probes, label off/on, pod recreation,
resources at rest, uninstall (+ cleanup DaemonSet), host restored.
Measurements are printed and appended to $TETHER_NODE_REPORT (default
/tmp/tether-node-report.json).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from tests.node.node import NODE_IP, OVERLAY, REPO, Node

NS = "shop"
AGENT_NS = "tether-system"
REDIRECTION = "ambient.istio.io/redirection"
APP_IMAGE = "localhost/tether-app:0.1.0"
REPORT: dict[str, Any] = {}


def _report(key: str, value: Any) -> None:
    REPORT[key] = value
    print(f"[node tier] {key} = {value}")
    path = Path(os.environ.get("TETHER_NODE_REPORT", "/tmp/tether-node-report.json"))
    path.write_text(json.dumps(REPORT, indent=1))


def wait_for(fn: Any, what: str, timeout: float = 60, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
            if last:
                return last
        except Exception as e:
            last = e
        time.sleep(interval)
    raise TimeoutError(f"{what}: not after {timeout}s (last: {last!r})")


def pods(node: Node, ns: str, selector: str = "") -> list[dict[str, Any]]:
    args = ["get", "pods", "-n", ns]
    if selector:
        args += ["-l", selector]
    return list(node.kubectl_json(*args)["items"])


def ready(p: dict[str, Any]) -> bool:
    conds = {c["type"]: c["status"] for c in p.get("status", {}).get("conditions", [])}
    return p.get("status", {}).get("phase") == "Running" and conds.get("Ready") == "True"


def captured(p: dict[str, Any]) -> bool:
    return p["metadata"].get("annotations", {}).get(REDIRECTION) == "enabled"


def restarts(p: dict[str, Any]) -> int:
    return sum(c.get("restartCount", 0) for c in p["status"].get("containerStatuses", []))


def agent_pod(node: Node) -> dict[str, Any]:
    ps = [
        p
        for p in pods(node, AGENT_NS, "app.kubernetes.io/name=tether-agent")
        if not p["metadata"].get("deletionTimestamp")
    ]
    assert len(ps) == 1, [p["metadata"]["name"] for p in ps]
    return ps[0]


def agent_get(node: Node, path: str) -> Any:
    """GET on the agent's admin port (127.0.0.1:15000), from inside its pod."""
    name = agent_pod(node)["metadata"]["name"]
    out = node.kubectl(
        "exec",
        "-n",
        AGENT_NS,
        name,
        "-c",
        "agent",
        "--",
        "python3",
        "-c",
        f"import urllib.request as u; print(u.urlopen('http://127.0.0.1:15000{path}').read().decode())",
    )
    return json.loads(out)


WORKLOADS = f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: echo, namespace: {NS}}}
spec:
  replicas: 2
  selector: {{matchLabels: {{app: echo}}}}
  template:
    metadata: {{labels: {{app: echo}}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
        - name: echo
          image: {APP_IMAGE}
          imagePullPolicy: Never
          command: [python3, /app/echo.py, serve]
          ports: [{{containerPort: 8080}}, {{containerPort: 9000}}]
          readinessProbe:
            httpGet: {{path: /healthz, port: 8080}}
            periodSeconds: 2
          livenessProbe:
            httpGet: {{path: /healthz, port: 8080}}
            periodSeconds: 2
            failureThreshold: 3
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {NS}, labels: {{app: client}}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: client
      image: {APP_IMAGE}
      imagePullPolicy: Never
      command: [sleep, infinity]
"""


# --------------------------------------------------------------------------- install


def test_install(node: Node) -> None:
    """README "Install", with the test overlay: CRDs, CA root, apply -k, Ready."""
    from agent.identity.ca import CertificateAuthority

    for f in sorted((REPO / "tests" / "k8s" / "crds").glob("*.yaml")):
        node.kubectl("apply", "-f", str(f))
    node.kubectl("apply", "-f", str(REPO / "daemonset" / "namespace.yaml"))
    root = Path(node.cluster.workdir) / "tether-ca-root"  # type: ignore[union-attr]
    CertificateAuthority.generate("cluster.local").save(str(root))
    node.kubectl(
        "-n",
        AGENT_NS,
        "create",
        "secret",
        "generic",
        "tether-ca-root",
        f"--from-file={root / 'ca-key.pem'}",
        f"--from-file={root / 'ca-cert.pem'}",
    )
    node.kubectl(
        "-n",
        AGENT_NS,
        "create",
        "configmap",
        "tether-ca-root-cert",
        f"--from-file=root-cert.pem={root / 'root-cert.pem'}",
    )
    t0 = time.monotonic()
    node.kubectl("apply", "-k", str(OVERLAY))
    try:
        node.kubectl(
            "-n", AGENT_NS, "rollout", "status", "deploy/tether-ca", "--timeout=180s", timeout=200
        )
        node.kubectl(
            "-n", AGENT_NS, "rollout", "status", "ds/tether-agent", "--timeout=300s", timeout=320
        )
    except Exception:
        print(node.kubectl("get", "pods", "-A", "-o", "wide", check=False))
        print(node.kubectl("-n", AGENT_NS, "describe", "pods", check=False)[-6000:])
        print(
            node.kubectl(
                "-n", AGENT_NS, "logs", "ds/tether-agent", "-c", "agent", "--tail=60", check=False
            )
        )
        print(node.log_tail("kubelet", 60))
        raise
    _report("apply_to_agent_ready_s", round(time.monotonic() - t0, 1))
    p = agent_pod(node)
    assert ready(p) and restarts(p) == 0, p["status"]


# --------------------------------------------------------------------------- workloads


def test_workloads_captured(node: Node) -> None:
    node.kubectl("create", "namespace", NS)
    node.kubectl("label", "namespace", NS, "istio.io/dataplane-mode=ambient")
    t0 = time.monotonic()
    node.kubectl("apply", "-f", "-", input=WORKLOADS)
    wait_for(
        lambda: len(pods(node, NS)) == 3 and all(ready(p) for p in pods(node, NS)),
        "echo and client pods Ready",
        120,
    )
    _report("apply_to_workloads_ready_s", round(time.monotonic() - t0, 1))
    wait_for(lambda: all(captured(p) for p in pods(node, NS)), "pods annotated", 60)
    _report("workloads_ready_to_captured_s", round(time.monotonic() - t0, 1))
    for p in pods(node, NS):
        assert restarts(p) == 0, (p["metadata"]["name"], p["status"])
    dump = agent_get(node, "/config_dump")
    text = json.dumps(dump)
    for p in pods(node, NS):
        assert p["status"]["podIP"] in text, f"{p['metadata']['name']} not in /config_dump"
    # the image built agent/tunnel/_tlscore.c and the agent runs HBONE on it,
    # with the relay's malloc thresholds (README, "The C TLS path and the heap")
    _report("agent_hbone_tls", dump["hbone_tls"])
    assert dump["hbone_tls"] == "c", dump["hbone_tls"]
    assert dump["malloc"].startswith("tuned"), dump["malloc"]


def _echo_ips(node: Node) -> list[str]:
    return [p["status"]["podIP"] for p in pods(node, NS, "app=echo")]


def test_connection_identities_and_source_ip(node: Node) -> None:
    client = next(p for p in pods(node, NS, "app=client"))
    client_ip = client["status"]["podIP"]
    server_ip = _echo_ips(node)[0]
    out = node.kubectl(
        "exec",
        "-n",
        NS,
        "client",
        "--",
        "python3",
        "/app/echo.py",
        "get",
        f"http://{server_ip}:8080/hello",
    )
    body = json.loads(out)
    # Source IP kept: the server sees the client pod's address, not the node's.
    assert body["peer"].rsplit(":", 1)[0] == client_ip, body
    out = node.kubectl(
        "exec",
        "-n",
        NS,
        "client",
        "--",
        "python3",
        "/app/echo.py",
        "tcp",
        server_ip,
        "9000",
        "ping",
    )
    assert out.splitlines()[0].startswith(f"peer {client_ip}:"), out
    assert "ping" in out
    want_src = f"spiffe://cluster.local/ns/{NS}/sa/default"

    def seen() -> list[dict[str, Any]]:
        conns = agent_get(node, "/connections")
        items = conns.get("open", []) + conns.get("closed", [])
        return [
            c
            for c in items
            if isinstance(c, dict)
            and str(c.get("dst", "")).startswith(server_ip)
            and c.get("src_identity") == want_src
            and c.get("dst_identity") == want_src
        ]

    conns = wait_for(seen, "connection with both identities at the agent", 20)
    _report("connection_record", conns[0])


def test_probes_keep_passing(node: Node) -> None:
    """Kubelet probes (from the node's address, the kubelet's cgroup) keep
    succeeding for enrolled pods: count them at the server over ~5 periods."""
    name = pods(node, NS, "app=echo")[0]["metadata"]["name"]

    def count() -> int:
        out = node.kubectl(
            "exec",
            "-n",
            NS,
            name,
            "--",
            "python3",
            "/app/echo.py",
            "get",
            "http://127.0.0.1:8080/probes",
        )
        return int(json.loads(out).get(NODE_IP, 0))

    c0 = count()
    time.sleep(10)
    c1 = count()
    _report("probe_successes_in_10s", c1 - c0)
    assert c1 - c0 >= 4, (c0, c1)  # 2 probes (readiness + liveness) every 2 s
    for p in pods(node, NS, "app=echo"):
        assert ready(p) and restarts(p) == 0, p["status"]


def test_label_off_on(node: Node) -> None:
    node.kubectl("label", "namespace", NS, "istio.io/dataplane-mode-")
    wait_for(lambda: not any(captured(p) for p in pods(node, NS)), "annotations removed", 60)
    t0 = time.monotonic()
    node.kubectl("label", "namespace", NS, "istio.io/dataplane-mode=ambient")
    wait_for(
        lambda: all(captured(p) for p in pods(node, NS)), "pods captured again", 60, interval=0.05
    )
    _report("label_to_capture_s", round(time.monotonic() - t0, 2))
    for p in pods(node, NS):
        assert restarts(p) == 0 and ready(p), p["status"]


def test_pod_recreated_is_captured(node: Node) -> None:
    old = pods(node, NS, "app=echo")[0]["metadata"]["name"]
    node.kubectl("delete", "pod", "-n", NS, old, "--wait=true")
    t0 = time.monotonic()
    wait_for(
        lambda: (
            len(
                [
                    p
                    for p in pods(node, NS, "app=echo")
                    if ready(p) and captured(p) and p["metadata"]["name"] != old
                ]
            )
            == 2
        ),
        "replacement pod Ready and captured",
        90,
    )
    _report("recreated_pod_ready_and_captured_s", round(time.monotonic() - t0, 1))
    test_connection_identities_and_source_ip(node)


MEMORY = ("/sys/fs/cgroup/memory",)


def _pod_cgroup(controller_dirs: tuple[str, ...], pod_uid: str) -> Path:
    """The pod's cgroup under the first v1 controller mount that has it (the
    kubelet spells the uid with - or _ depending on the cgroup driver)."""
    for base in controller_dirs:
        for name in (pod_uid, pod_uid.replace("-", "_")):
            hits = list(Path(base).glob(f"kubepods/**/pod{name}"))
            if hits:
                return hits[0]
    raise FileNotFoundError(f"{'/'.join(controller_dirs)} cgroup of pod {pod_uid}")


def _cgroup_stat(pod_uid: str) -> tuple[float, int]:
    """(cpu seconds, memory bytes) of the pod's cgroup (v1 controllers)."""
    cpu_dir = _pod_cgroup(("/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpuacct"), pod_uid)
    cpu = int((cpu_dir / "cpuacct.usage").read_text()) / 1e9
    rss = 0
    for ln in (_pod_cgroup(MEMORY, pod_uid) / "memory.stat").read_text().splitlines():
        k, v = ln.split()
        if k == "total_rss":
            rss = int(v)
    return cpu, rss


def _pod_processes(pod_uid: str) -> list[dict[str, Any]]:
    """Each process in the pod's memory cgroup: what the cgroup's total_rss
    is made of (anonymous, file-backed and shared pages, threads)."""
    out = []
    for procs in _pod_cgroup(MEMORY, pod_uid).glob("**/cgroup.procs"):
        for pid in procs.read_text().split():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            fields = dict(ln.split(":", 1) for ln in status.splitlines() if ":" in ln)

            def mib(key: str, f: dict[str, str] = fields) -> float:
                return round(int(f.get(key, "0 kB").split()[0]) / 1024, 1)

            out.append(
                {
                    "cmd": cmd[:80],
                    "rss_mib": mib("VmRSS"),
                    "anon_mib": mib("RssAnon"),
                    "file_mib": mib("RssFile"),
                    "threads": int(fields.get("Threads", "0")),
                    "mappings": _mappings(pid),
                }
            )
    return out


def _mappings(pid: str) -> dict[str, Any]:
    """Where a process's resident memory is, from /proc/PID/smaps: resident
    MiB per kind of mapping ([heap], unnamed anonymous by size class, [stack],
    each file), biggest first.  Unnamed anonymous mappings are glibc's mmap'd
    blocks and per-thread arenas (64 MiB reservations), CPython's obmalloc
    arenas and native libraries' own allocations."""
    kinds: dict[str, float] = {}
    name = ""
    size_kib = 0
    try:
        lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    except OSError:
        return {}
    for ln in lines:
        head = ln.split()
        if not head:
            continue
        if "-" in head[0] and not head[0].endswith(":"):
            lo, hi = (int(x, 16) for x in head[0].split("-"))
            size_kib = (hi - lo) // 1024
            name = head[5] if len(head) > 5 else ""
        elif head[0] == "Rss:":
            if not name:
                cls = next(c for c in (256, 1024, 8192, 65536, 1 << 40) if size_kib <= c)
                name = f"[anon <= {cls // 1024} MiB mapping]" if cls < 1 << 40 else "[anon, larger]"
            kinds[name] = kinds.get(name, 0.0) + int(head[1]) / 1024
    top = sorted(kinds.items(), key=lambda kv: -kv[1])[:12]
    return {k: round(v, 1) for k, v in top if v >= 0.5}


AGENT_INVENTORY: list[Any] = []


def test_agent_at_rest(node: Node) -> None:
    from agent.datapath import inventory

    inv = inventory.from_pins("/sys/fs/bpf/tether")
    _report("agent_kernel_objects", inv.counts())
    assert inv.links and inv.progs and inv.maps
    AGENT_INVENTORY.append(inv)
    uid = agent_pod(node)["metadata"]["uid"]
    cpu0, _ = _cgroup_stat(uid)
    time.sleep(20)
    cpu1, rss = _cgroup_stat(uid)
    _report("agent_rss_mib", round(rss / 2**20, 1))
    procs = _pod_processes(uid)
    _report("agent_pod_processes", procs)
    assert any("agent.cli" in p["cmd"] or "tether" in p["cmd"] for p in procs), procs
    _report("agent_cpu_at_rest_pct", round((cpu1 - cpu0) / 20 * 100, 2))
    name = agent_pod(node)["metadata"]["name"]
    log = node.kubectl("-n", AGENT_NS, "logs", name, "-c", "agent")
    trims = [ln for ln in log.splitlines() if "memory after start" in ln]
    _report("agent_memory_after_start", trims)
    assert len(trims) == 1, "the agent should return its start's freed heap once, 15 s after ready"


LIVE_CLIENT = """
import socket, sys, time
s = socket.create_connection((sys.argv[1], 9000), timeout=10)
f = s.makefile("rwb")
f.readline()
ok, end = 0, time.time() + float(sys.argv[2])
while time.time() < end:
    f.write(b"x\\n"); f.flush()
    line = f.readline()
    if line != b"x\\n":
        print("BROKEN after", ok, repr(line)); sys.exit(1)
    ok += 1
    time.sleep(0.2)
print("OK", ok)
"""


def test_rolling_update_keeps_connections(node: Node) -> None:
    """Stretch: a new image rolls the DaemonSet with a surge; a TCP connection
    open through the old agent keeps working across the handoff."""
    import subprocess

    node.ctr("images", "tag", "--force", "localhost/tether:0.1.0", "localhost/tether:0.1.1")
    old = agent_pod(node)["metadata"]["name"]
    server_ip = _echo_ips(node)[0]
    assert node.cluster is not None
    live = subprocess.Popen(
        [
            str(node.bin / "kubectl"),
            f"--kubeconfig={node.cluster.admin_kubeconfig()}",
            "exec",
            "-n",
            NS,
            "client",
            "--",
            "python3",
            "-c",
            LIVE_CLIENT,
            server_ip,
            "110",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(5)
    t0 = time.monotonic()
    node.kubectl(
        "-n",
        AGENT_NS,
        "set",
        "image",
        "ds/tether-agent",
        "agent=localhost/tether:0.1.1",
        "mount-bpffs=localhost/tether:0.1.1",
    )
    node.kubectl(
        "-n", AGENT_NS, "rollout", "status", "ds/tether-agent", "--timeout=240s", timeout=260
    )
    wait_for(lambda: agent_pod(node)["metadata"]["name"] != old, "old agent pod gone", 120)
    _report("rolling_update_s", round(time.monotonic() - t0, 1))
    new = agent_pod(node)
    assert ready(new) and restarts(new) == 0
    out, _ = live.communicate(timeout=200)
    _report("live_connection_across_update", out.strip()[-300:])
    assert live.returncode == 0 and out.strip().splitlines()[-1].startswith("OK"), out
    for p in pods(node, NS):
        assert captured(p) and ready(p) and restarts(p) == 0, p["status"]
    test_connection_identities_and_source_ip(node)


def test_agent_pod_deleted_successor_starts(node: Node) -> None:
    """`kubectl delete pod` of the agent: no surge, no handoff; the old pod's
    cgroup is freed and the kernel severs the links pinned on it.  Its
    successor once crash-looped here on BPF_LINK_UPDATE (ENOLINK); it must
    start, adopt the pods and leave only its own cgroup's agent links."""
    old = agent_pod(node)["metadata"]["name"]
    t0 = time.monotonic()
    node.kubectl("-n", AGENT_NS, "delete", "pod", old, "--wait=true", timeout=120)

    def successor() -> dict[str, Any] | None:
        ps = pods(node, AGENT_NS, "app.kubernetes.io/name=tether-agent")
        new = [p for p in ps if p["metadata"]["name"] != old]
        return new[0] if new and ready(new[0]) else None

    try:
        new = wait_for(successor, "successor agent Ready", 180, interval=1.0)
    except TimeoutError:
        print(node.kubectl("-n", AGENT_NS, "get", "pods", "-o", "wide", check=False))
        print(
            node.kubectl(
                "-n", AGENT_NS, "logs", "ds/tether-agent", "-c", "agent", "--tail=40", check=False
            )
        )
        raise
    _report("agent_pod_deleted_to_successor_ready_s", round(time.monotonic() - t0, 1))
    assert restarts(new) == 0, new["status"]
    for p in pods(node, NS):
        assert captured(p) and ready(p), p["status"]
    test_connection_identities_and_source_ip(node)
    agent_links = {
        p.name
        for p in Path("/sys/fs/bpf/tether/links").iterdir()
        if p.name.partition("-")[0] in ("sockopt", "agentops", "nsprobe")
    }
    assert len({n.partition("-")[2] for n in agent_links}) == 1, agent_links


# --------------------------------------------------------------------------- waypoint

WAYPOINT = f"""
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: waypoint, namespace: {NS}}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
---
apiVersion: v1
kind: Service
metadata:
  name: echo
  namespace: {NS}
  labels: {{istio.io/use-waypoint: waypoint}}
spec:
  selector: {{app: echo}}
  ports: [{{name: http, port: 80, targetPort: 8080}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-admin, namespace: {NS}}}
spec:
  targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}}]
  action: DENY
  rules: [{{to: [{{operation: {{paths: ["/admin*"]}}}}]}}]
"""

STATUS_OF = """
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=10) as r:
        print(r.status, r.headers.get("server", ""))
except urllib.error.HTTPError as e:
    print(e.code, e.headers.get("server", ""))
"""


def _status_from_client(node: Node, url: str) -> tuple[int, str]:
    out = node.kubectl("exec", "-n", NS, "client", "--", "python3", "-c", STATUS_OF, url)
    code, _, server = out.strip().partition(" ")
    return int(code), server


def test_waypoint_pod_applies_l7_policy(node: Node) -> None:
    """An istio-waypoint Gateway becomes a Deployment (the agent's deployer,
    the Lease holder) whose pod runs Envoy from the tether image, fed xDS and
    its SVID by the node agent over the hostPath socket; a Service with
    istio.io/use-waypoint sends the client's requests through it, and an L7
    AuthorizationPolicy on the Gateway refuses /admin with 403."""
    t0 = time.monotonic()
    node.kubectl("apply", "-f", "-", input=WAYPOINT)
    try:
        # The agent's deployer creates the Deployment after it sees the
        # Gateway; `rollout status` fails at once on a Deployment that does
        # not exist yet (a cold CI run lost that race).
        wait_for(
            lambda: node.kubectl("-n", NS, "get", "deploy/waypoint", "-o", "name", check=False),
            f"the deployer's Deployment {NS}/waypoint",
            timeout=60,
        )
        node.kubectl(
            "-n", NS, "rollout", "status", "deploy/waypoint", "--timeout=180s", timeout=200
        )
    except Exception:
        print(node.kubectl("-n", NS, "get", "gateway", "waypoint", "-o", "yaml", check=False))
        print(
            node.kubectl(
                "-n",
                NS,
                "describe",
                "pods",
                "-l",
                "gateway.networking.k8s.io/gateway-name=waypoint",
                check=False,
            )[-4000:]
        )
        print(
            node.kubectl(
                "-n", AGENT_NS, "logs", "ds/tether-agent", "-c", "agent", "--tail=60", check=False
            )
        )
        raise
    _report("gateway_to_waypoint_ready_s", round(time.monotonic() - t0, 1))
    wp = pods(node, NS, "gateway.networking.k8s.io/gateway-name=waypoint")
    assert len(wp) == 1 and ready(wp[0]) and restarts(wp[0]) == 0, wp
    assert not captured(wp[0]), wp[0]["metadata"]  # Envoy does HBONE itself
    gw = node.kubectl_json("-n", NS, "get", "gateway", "waypoint")
    conds = {c["type"]: c for c in gw.get("status", {}).get("conditions", [])}
    assert conds.get("Programmed", {}).get("status") == "True", gw.get("status")
    vip = node.kubectl_json("-n", NS, "get", "service", "echo")["spec"]["clusterIP"]

    # there is no kube-proxy on this node: only the mesh can reach the VIP
    def served() -> tuple[int, str] | None:
        got = _status_from_client(node, f"http://{vip}/hello")
        return got if got[0] == 200 else None

    _, server = wait_for(served, "GET / through the waypoint", 90, interval=1.0)
    _report("gateway_to_first_l7_response_s", round(time.monotonic() - t0, 1))
    assert server == "envoy", server  # the response came back through Envoy
    assert _status_from_client(node, f"http://{vip}/admin/users")[0] == 403
    assert _status_from_client(node, f"http://{vip}/items")[0] == 200
    # the client's agent sent it to the waypoint, with both identities
    conns = agent_get(node, "/connections")
    to_wp = [
        c
        for c in conns.get("open", []) + conns.get("closed", [])
        if isinstance(c, dict) and c.get("dst") == f"{vip}:80"
    ]
    assert to_wp, conns
    rec = to_wp[-1]
    _report("waypoint_connection_record", rec)
    assert rec.get("path") == "waypoint", rec
    assert rec.get("dst_identity") == f"spiffe://cluster.local/ns/{NS}/sa/waypoint", rec
    assert rec.get("src_identity") == f"spiffe://cluster.local/ns/{NS}/sa/default", rec


HEADERS_PROBE = """
import json, sys
from agent.datapath.loader import BuildOptions, Programs
p = Programs(BuildOptions(pin_dir=sys.argv[1]))
print(json.dumps({"headers": p.image_headers, "progs": sorted(p.prog_fds)}))
p.close()
"""


def test_image_headers_compile_in_the_agent_pod(node: Node) -> None:
    """A node with no headers for its kernel, played inside the real agent
    container: a private mount namespace with an empty tmpfs over the node's
    /lib/modules.  The compile child must find the image's Debian headers
    (daemonset/image/kernel-headers.sh) and load every program."""
    from agent.datapath.loader import IMAGE_HEADERS, BuildOptions
    from agent.sim.topology import random_prefix

    name = agent_pod(node)["metadata"]["name"]
    pin = f"/sys/fs/bpf/{random_prefix('tn')}-hdr"
    script = 'mount -t tmpfs tether-test /lib/modules && exec python3 -c "$0" "$1"'
    try:
        out = node.kubectl(
            "exec", "-n", AGENT_NS, name, "-c", "agent", "--",
            "unshare", "--mount", "--propagation", "private", "sh", "-c", script,
            HEADERS_PROBE, pin,
            timeout=300,
        )  # fmt: skip
    finally:
        shutil.rmtree(pin, ignore_errors=True)  # the maps BCC pinned there
    got = json.loads(out.strip().splitlines()[-1])
    _report("image_headers_probe", got)
    assert got["headers"] == IMAGE_HEADERS, got
    assert got["progs"] == sorted(p.name for p in BuildOptions().programs()), got


# --------------------------------------------------------------------------- uninstall


def test_uninstall_leaves_nothing(node: Node) -> None:
    """README "Uninstall": unenroll, delete the agent, cleanup DaemonSet, delete -k."""
    from agent.datapath import inventory

    node.kubectl("label", "namespace", NS, "istio.io/dataplane-mode-")
    wait_for(lambda: not any(captured(p) for p in pods(node, NS)), "unenrolled", 60)
    node.kubectl("-n", AGENT_NS, "delete", "ds", "tether-agent", "--wait=true", timeout=400)
    cleanup = (
        (REPO / "daemonset" / "cleanup.yaml")
        .read_text()
        .replace("image: tether\n", "image: localhost/tether:0.1.0\n")
        .replace("imagePullPolicy: IfNotPresent", "imagePullPolicy: Never")
    )
    node.kubectl("apply", "-f", "-", input=cleanup)
    node.kubectl(
        "-n", AGENT_NS, "rollout", "status", "ds/tether-cleanup", "--timeout=120s", timeout=150
    )
    report = node.kubectl("-n", AGENT_NS, "logs", "ds/tether-cleanup", "-c", "cleanup")
    _report("cleanup_report", report.strip()[-2000:])
    node.kubectl("delete", "-f", "-", input=cleanup)
    # README step 4; the DaemonSet is already gone (step 2)
    node.kubectl("delete", "-k", str(OVERLAY), "--ignore-not-found", "--wait=true", timeout=300)
    node.kubectl("delete", "namespace", NS, "--wait=true", timeout=120)
    # Nothing of what the agent held is left in the kernel: every link, program
    # and map seen under its pins while it ran is gone (by id, so other tether
    # tests running on this machine do not count), and so are the pins.
    assert not Path("/sys/fs/bpf/tether").exists(), list(Path("/sys/fs/bpf/tether").rglob("*"))
    left = inventory.remaining(AGENT_INVENTORY[0], "/sys/fs/bpf/tether")
    _report("kernel_objects_left", left)
    assert not any(left.values()), left
    ids = {p["id"] for p in json.loads(os.popen("bpftool -j prog show").read() or "[]")}
    assert not ids & AGENT_INVENTORY[0].progs


def test_zz_host_restored(node: Node) -> None:
    """Teardown: kubelet, containerd, state, CNI, cgroups, mounts, sysctls,
    iptables chains; the host snapshot before == after."""
    t0 = time.monotonic()
    diff = node.teardown()
    _report("teardown_s", round(time.monotonic() - t0, 1))
    _report("node_timings", node.timings)
    assert diff == {}, json.dumps(diff, indent=1)


@pytest.fixture(autouse=True)
def _stop_after_failure(request: pytest.FixtureRequest) -> None:
    """Later tests depend on earlier ones: skip the rest after a failure
    (the host teardown still runs through the fixture)."""
    if (
        getattr(request.session, "_node_failed", False)
        and request.node.name != "test_zz_host_restored"
    ):
        pytest.skip("an earlier node-tier test failed")
