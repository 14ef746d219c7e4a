"""A simulated node with a real tether agent on it: the demo, the netns tests
and the benchmarks all drive the agent through this one harness.

The agent runs as its own process (`tether run --config FILE`) inside the
node's netns and the node's agent cgroup, exactly as it would on a node;
the harness only writes its local file, reads its admin endpoint and runs
traffic from pod processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from agent import netns
from agent.datapath import inventory
from agent.datapath.datapath import cleanup
from agent.model import format_authority
from agent.sim.topology import Node, NodeRole, Pod, Testbed

PY = sys.executable
# How long an agent may take to answer /ready: BPF compile plus startup.  60 s
# on a real machine; kernel VMs under TCG (vagrant/kernels/guest.sh) and
# Vagrant guests compile about 12x slower and raise it.
READY_TIMEOUT = float(os.environ.get("TETHER_READY_TIMEOUT", "60"))
DATAPLANE_MODE = "istio.io/dataplane-mode"


class Cluster:
    """What every node's agent is told about the mesh: namespaces, all
    workloads, services, policies and the shared CA (local mode)."""

    def __init__(self, tb: Testbed) -> None:
        self.tb = tb
        self.nodes: list[AgentNode] = []
        self.namespaces: dict[str, dict[str, str]] = {}
        self.services: list[dict[str, Any]] = []
        self.policies: list[dict[str, Any]] = []
        self.waypoints: list[dict[str, Any]] = []  # the local file's `waypoints:`
        self._tmp = tempfile.TemporaryDirectory(prefix=f"tether-{tb.prefix}-ca-")
        self.ca_dir = self._tmp.name
        self.mtls = True
        self.cert_ttl: float | None = None

    def add_waypoint(self, name: str, namespace: str, pod: Pod, node: str) -> None:
        """A waypoint the agent on ``node`` runs (Envoy in ``pod``'s netns)."""
        self.waypoints.append(
            {
                "name": name,
                "namespace": namespace,
                "addresses": [pod.ip4],
                "node": node,
                "serviceAccount": name,
                "netns": str(pod.netns_path),
                "cgroup": str(pod.cgroup_path),
            }
        )

    def write_configs(self) -> None:
        for n in self.nodes:
            n.write_config()

    def close(self) -> None:
        for n in self.nodes:
            n.close()
        self._tmp.cleanup()


class AgentNode:
    """One node of a Testbed, its pods, and a tether agent enrolling them."""

    def __init__(
        self, tb: Testbed, name: str = "node1", sk_msg: bool = False, cluster: Cluster | None = None
    ) -> None:
        self.tb = tb
        self.node: Node = tb.add_node(name)
        self.sk_msg = sk_msg
        self.cluster = cluster or Cluster(tb)
        self.cluster.nodes.append(self)
        self.pods: list[Pod] = []
        self.namespaces = self.cluster.namespaces
        self.pod_labels: dict[str, dict[str, str]] = {}
        self.extra: dict[str, dict[str, Any]] = {}
        self.agent_settings: dict[str, Any] = {}  # more of the local file's `agent:`
        self._tmp = tempfile.TemporaryDirectory(prefix=f"tether-{tb.prefix}-")
        self.dir = Path(self._tmp.name)
        self.config_path = self.dir / f"{name}.yaml"
        self.log_path = self.dir / "agent.log"
        self.pin_dir = f"/sys/fs/bpf/{tb.prefix}-{name}"
        self.state_dir = f"/run/{tb.prefix}-{name}"
        self.agent: subprocess.Popen[Any] | None = None
        self._servers: list[subprocess.Popen[Any]] = []

    # -- topology and config -----------------------------------------------

    def add_pod(
        self,
        name: str,
        namespace: str = "default",
        service_account: str = "default",
        labels: dict[str, str] | None = None,
        **extra: Any,
    ) -> Pod:
        p = self.node.add_pod(name, namespace=namespace, service_account=service_account)
        self.pods.append(p)
        self.namespaces.setdefault(namespace, {})
        self.pod_labels[name] = labels or {}
        self.extra[name] = extra
        return p

    def enroll_namespace(self, namespace: str, on: bool = True) -> None:
        labels = self.namespaces.setdefault(namespace, {})
        if on:
            labels[DATAPLANE_MODE] = "ambient"
        else:
            labels.pop(DATAPLANE_MODE, None)

    def _workload(self, p: Pod, local: bool) -> dict[str, Any]:
        w: dict[str, Any] = {
            "name": p.name,
            "namespace": p.namespace,
            "serviceAccount": p.service_account,
            "node": p.node,
            "addresses": [p.ip4, p.ip6],
            "labels": self.pod_labels[p.name],
        }
        if local:
            w.update(netns=str(p.netns_path), cgroup=str(p.cgroup_path))
        w.update(self.extra[p.name])
        return w

    def config(self) -> dict[str, Any]:
        c = self.cluster
        return {
            "node": self.node.name,
            "agent": {
                "pinDir": self.pin_dir,
                "stateDir": self.state_dir,
                "cgroup": str(self.node.agent.cgroup_path),
                "kubeletCgroups": [str(self.node.kubelet.cgroup_path)],
                "skMsg": self.sk_msg,
                **self.agent_settings,
            },
            "namespaces": [{"name": n, "labels": lab} for n, lab in self.namespaces.items()],
            "identity": ({"caDir": c.ca_dir, "certTTL": c.cert_ttl} if c.mtls else {}),
            "workloads": [n._workload(p, n is self) for n in c.nodes for p in n.pods],
            "services": c.services,
            "policies": c.policies,
            "waypoints": c.waypoints,
        }

    def write_config(self) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(self.config(), sort_keys=False))
        tmp.replace(self.config_path)

    # -- processes -----------------------------------------------------------

    def serve(self, pod: Pod, port: int = 8080, *args: str) -> subprocess.Popen[Any]:
        """An echo server in the pod (agent.sim.peer serve); returns once listening."""
        p = self.tb.spawn(
            pod,
            [PY, "-m", "agent.sim.peer", "serve", "--port", str(port), *args],
            stdout=subprocess.PIPE,
        )
        assert p.stdout is not None
        line = p.stdout.readline()
        if b"ready" not in line:
            raise RuntimeError(f"server in {pod.name} did not start: {line!r}")
        self._servers.append(p)
        return p

    def serve_http(
        self, pod: Pod, port: int = 8080, name: str | None = None, *args: str
    ) -> subprocess.Popen[Any]:
        """An HTTP server in the pod answering ``name`` (default: the pod's name)."""
        p = self.tb.spawn(
            pod,
            [
                PY,
                "-m",
                "agent.sim.peer",
                "http-serve",
                "--port",
                str(port),
                "--name",
                name or pod.name,
                *args,
            ],
            stdout=subprocess.PIPE,
        )
        assert p.stdout is not None
        line = p.stdout.readline()
        if b"ready" not in line:
            raise RuntimeError(f"HTTP server in {pod.name} did not start: {line!r}")
        self._servers.append(p)
        return p

    def start_agent(self, *extra_args: str) -> subprocess.Popen[Any]:
        self.write_config()
        with self.log_path.open("a") as log:
            self.agent = self.tb.spawn(
                self.node.agent,
                [PY, "-m", "agent.cli", "run", "--config", str(self.config_path), *extra_args],
                stdout=log,
                stderr=log,
            )
        self.wait_ready(self.agent)
        return self.agent

    def stop_agent(self, sig_kill: bool = False) -> None:
        if self.agent is None:
            return
        if sig_kill:
            self.agent.kill()
        else:
            self.agent.terminate()
        try:
            self.agent.wait(20)
        except subprocess.TimeoutExpired:
            self.agent.kill()
            self.agent.wait(5)
        self.agent = None

    def wait_ready(self, proc: subprocess.Popen[Any]) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"agent exited with {proc.returncode}; log:\n" + self.log_tail(40)
                )
            # the agent started, not a predecessor still holding the admin
            # port during a handoff, must be the one answering
            with contextlib.suppress(OSError, ValueError):
                if self.admin("/ready") == "ready\n" and self.status().get("pid") == proc.pid:
                    return
            time.sleep(0.1)
        raise RuntimeError("agent not ready in time; log:\n" + self.log_tail(40))

    def admin(self, path: str) -> Any:
        """GET from the agent's admin port, which listens in the node netns."""
        with (
            netns.entered(self.node.netns_path),
            urllib.request.urlopen(f"http://127.0.0.1:15000{path}", timeout=5) as r,
        ):
            body = r.read().decode()
        return body if path in ("/ready", "/healthz") else json.loads(body)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.admin("/config_dump")
        return result

    def connections(self) -> list[dict[str, Any]]:
        c = self.status()["connections"]
        return list(c["closed"]) + list(c["open"])

    def metrics(self) -> str:
        """The agent's Prometheus text (:15020/metrics, in the node netns)."""
        with (
            netns.entered(self.node.netns_path),
            urllib.request.urlopen("http://127.0.0.1:15020/metrics", timeout=5) as r,
        ):
            return str(r.read().decode())

    def access_log(self, reporter: str | None = None) -> list[dict[str, Any]]:
        """The agent's JSON access log lines (``tether.access``) so far."""
        out = []
        try:
            text = self.log_path.read_text()
        except FileNotFoundError:
            return []
        for line in text.splitlines():
            _, sep, body = line.partition(" tether.access: ")
            if not sep:
                continue
            try:
                rec = json.loads(body)
            except ValueError:
                continue
            if reporter is None or rec.get("reporter") == reporter:
                out.append(rec)
        return out

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except FileNotFoundError:
            return ""

    # -- traffic --------------------------------------------------------------

    def peer(
        self, where: Pod | NodeRole, args: Sequence[str], timeout: float = 60.0
    ) -> dict[str, Any]:
        """Run `agent.sim.peer ARGS` in a pod (or the kubelet) and return its JSON."""
        p = self.tb.spawn(
            where,
            [PY, "-m", "agent.sim.peer", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = p.communicate(timeout=timeout)
        try:
            result: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            return {"ok": False, "error": f"no result (rc {p.returncode}): {err.decode()[-800:]}"}
        return result

    def connect(
        self,
        client: Pod | NodeRole,
        server: Pod,
        port: int = 8080,
        family: int = 4,
        nbytes: int = 65536,
        extra: Sequence[str] = (),
    ) -> dict[str, Any]:
        host = server.ip4 if family == 4 else server.ip6
        return self.peer(
            client, ["connect", host, str(port), "--bytes", str(nbytes), "--timeout", "10", *extra]
        )

    def spawn_peer(self, where: Pod | NodeRole, args: Sequence[str]) -> subprocess.Popen[Any]:
        return self.tb.spawn(
            where,
            [PY, "-m", "agent.sim.peer", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

    @property
    def pin_dir_path(self) -> Path:
        return Path(self.pin_dir)

    # -- teardown --------------------------------------------------------------

    def inventory(self) -> inventory.Inventory:
        return inventory.from_pins(self.pin_dir)

    def cleanup(self) -> dict[str, list[str]]:
        """`tether cleanup` for this node's pins and state."""
        return cleanup(self.pin_dir, self.state_dir)

    def close(self) -> None:
        self.stop_agent()
        for s in self._servers:
            with contextlib.suppress(OSError):
                s.kill()
        with contextlib.suppress(OSError):
            self.cleanup()
        self._tmp.cleanup()
        if self.cluster.nodes == [self]:
            self.cluster._tmp.cleanup()


@contextlib.contextmanager
def cluster_nodes(
    *names: str, cert_ttl: float | None = None
) -> Iterator[tuple[Cluster, list[AgentNode]]]:
    """A fresh testbed with one simulated node per name, all in one Cluster
    (shared CA and config); every agent, netns and pin is gone afterwards."""
    with Testbed() as tb:
        cluster = Cluster(tb)
        cluster.cert_ttl = cert_ttl
        try:
            yield cluster, [AgentNode(tb, n, cluster=cluster) for n in names]
        finally:
            cluster.close()


def classify(result: dict[str, Any], conns: Iterable[dict[str, Any]]) -> tuple[str, str]:
    """How one client connection travelled, from the agent's records:
    (outbound, inbound), each 'captured', 'captured (sk_msg)' or 'direct'."""
    if not result.get("ok"):
        return "failed", "failed"

    def ep(a: Sequence[Any]) -> str:
        return format_authority(str(a[0]), int(a[1]))

    conns = list(conns)
    client_sock = ep(result["getsockname"])
    server_saw = ep(result["server_saw_peer"])
    outs = [c for c in conns if c["direction"] == "outbound" and c["src"] == client_sock]
    ins = [c for c in conns if c["direction"] == "inbound" and c["delivered_as"] == server_saw]
    out = ("captured" + (" (sk_msg)" if outs[0]["spliced"] else "")) if outs else "direct"
    return out, "captured" if ins else "direct"


def waypoint_requests(metrics_text: str) -> list[tuple[dict[str, str], float]]:
    """Every ``istio_requests_total{reporter="waypoint"}`` series: (labels, count)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [
        (dict(s.labels), s.value)
        for fam in text_string_to_metric_families(metrics_text)
        for s in fam.samples
        if s.name == "istio_requests_total" and s.labels.get("reporter") == "waypoint"
    ]


def envoy_stats(wp_pod: Pod) -> dict[str, int]:
    """A waypoint Envoy's own counters, from its admin port (127.0.0.1:15000
    inside the waypoint pod's netns)."""
    with (
        netns.entered(wp_pod.netns_path),
        urllib.request.urlopen("http://127.0.0.1:15000/stats?usedonly", timeout=5) as r,
    ):
        text = r.read().decode()
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.rpartition(": ")
        if value.strip().isdigit():
            out[name] = int(value)
    return out


# -- process and polling helpers (the demo and the benches) ---------------------


def proc_cpu(pid: int) -> float:
    """CPU seconds (user+system, all threads) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))


def proc_rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` in MiB (0 if it has none)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def until(
    what: str,
    check: Callable[[], Any],
    timeout: float,
    error: type[Exception] = TimeoutError,
) -> Any:
    """Poll ``check`` every 0.3 s until it returns something true, and return
    that; an exception from it counts as not yet (a port before it listens).
    After ``timeout`` s raise ``error`` naming ``what`` and the last result."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except Exception as e:
            last = e
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise error(f"{what}: not within {timeout:g}s; last: {last!r}"[:600])
        time.sleep(0.3)
