"""`tether bench waypoint`: what an L7 waypoint costs an HTTP/1.1 keep-alive
request, next to the same request without the mesh and through L4 HBONE only.

One testbed (two simulated nodes, each with its agent; the waypoint's real
Envoy on node 1, run and configured by the agent as in ``agent/demo_l7.py``),
three paths measured back to back in the same run:

- ``direct``: a pod outside the mesh to a server outside the mesh (plain TCP);
- ``l4``: an enrolled pod to an enrolled server's pod IP (HBONE through both
  agents, no waypoint);
- ``waypoint``: the same client to a Service VIP that uses the waypoint
  (agent → HBONE → Envoy → HBONE → agent → server).

Clients on node 1, servers on node 2.  Every server is the same static Envoy
answering a small ``direct_response`` (C++, one worker), so the server is not
what limits the direct path; the load generator is ``wrk`` (Debian package
``wrk``, installed by ``vagrant/provision.sh``): fixed connections, its own
latency histogram, written out by a Lua ``done`` hook.  CPU is read from
``/proc/PID/stat`` of the agents and of the waypoint's Envoy around each path.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from agent.sim.harness import AgentNode, Cluster, envoy_stats, proc_cpu, proc_rss_mib, until
from agent.sim.topology import Pod, Testbed

NS = "bench"
PLAIN_NS = "plain"  # not enrolled: the direct path
WAYPOINT = "waypoint"
VIP = "10.96.0.20"
PORT = 8080
CONNECTIONS = 8
THREADS = 2
WARMUP_S = 1.0
WAIT = 90.0  # Envoy start, certificates and xDS on a loaded 2-core machine
PATHS = ("direct", "l4", "waypoint")
BODY = "ok\n"
SERVER_ADMIN_PORT = 19000  # in the server pods; clear of the agent's 150xx listeners

WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"errors":%d,"non2xx":%d,"p50_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99)))
end
"""


class BenchError(RuntimeError):
    pass


def _server_config(port: int) -> dict[str, Any]:
    """A static Envoy answering every request with 200 ``BODY`` (the servers)."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [
                        {
                            "match": {"prefix": "/"},
                            "direct_response": {"status": 200, "body": {"inline_string": BODY}},
                        }
                    ],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "bench",
                    "address": {
                        "socket_address": {
                            "address": "::",
                            "port_value": port,
                            # pods are dual-stack and the waypoint's clusters list
                            # both addresses: a v4-only server fails half the requests
                            "ipv4_compat": True,
                        }
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ]
        },
        "admin": {
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": SERVER_ADMIN_PORT}}
        },
    }


def wrk_binary() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise BenchError(
            "tether bench waypoint needs wrk (Debian/Ubuntu: apt-get install wrk; "
            "vagrant/provision.sh installs it)"
        )
    return path


def _wrk(
    tb: Testbed, wrk: str, script: Path, client: Pod, url: str, seconds: float
) -> dict[str, Any]:
    """One wrk run from ``client``'s netns; its Lua hook's JSON line."""
    argv = [
        wrk,
        f"-t{THREADS}",
        f"-c{CONNECTIONS}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        url,
    ]
    p = tb.spawn(client, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = p.communicate(timeout=seconds + 60)
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        raise BenchError(f"wrk {url} from {client.name} failed (rc {p.returncode}): {err!r}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def run_once(seconds: float) -> dict[str, Any]:
    """One testbed, the three paths measured back to back."""
    from waypoint.envoy import EnvoyProcess, envoy_binary

    wrk = wrk_binary()
    envoy = envoy_binary()
    load0 = os.getloadavg()
    t0 = time.monotonic()
    rows: dict[str, dict[str, Any]] = {}
    waypoint_envoy: dict[str, Any] = {}
    with Testbed() as tb:
        cluster = Cluster(tb)
        n1 = AgentNode(tb, "node1", cluster=cluster)
        n2 = AgentNode(tb, "node2", cluster=cluster)
        servers: list[Any] = []
        try:
            client = n1.add_pod("client", NS, "client", labels={"app": "client"})
            plain_client = n1.add_pod("plain-client", PLAIN_NS, "client")
            wp_pod = n1.add_pod(
                "waypoint-0",
                NS,
                WAYPOINT,
                labels={
                    "istio.io/dataplane-mode": "none",
                    "gateway.networking.k8s.io/gateway-name": WAYPOINT,
                },
            )
            api = n2.add_pod("api-0", NS, "api", labels={"app": "api"})
            l4 = n2.add_pod("l4-0", NS, "l4", labels={"app": "l4"})
            plain = n2.add_pod("plain-0", PLAIN_NS, "plain", labels={"app": "plain"})
            n1.enroll_namespace(NS)
            cluster.services.append(
                {
                    "name": "api",
                    "namespace": NS,
                    "addresses": [VIP],
                    "ports": [{"port": PORT, "targetPort": PORT, "name": "http"}],
                    "selector": {"app": "api"},
                    "labels": {"app": "api", "istio.io/use-waypoint": WAYPOINT},
                }
            )
            cluster.add_waypoint(WAYPOINT, NS, wp_pod, "node1")
            for pod in (api, l4, plain):
                srv = EnvoyProcess(
                    _server_config(PORT),
                    n2.dir / f"server-{pod.name}",
                    netns=pod.netns_path,
                    binary=envoy,
                    log_level="warn",
                )
                servers.append(srv)
                srv.start(WAIT)
            n2.start_agent()
            n1.start_agent()

            def proxy() -> dict[str, Any]:
                (p,) = n1.status()["waypoint_proxies"]
                return dict(p)

            def ready() -> bool:
                p = proxy()
                if not p["pushed_generation"] or not p["ready"]:
                    return False
                types = p["xds"]["types"]
                return all(t["acked"] == t["version"] for t in types.values() if t.get("sent"))

            until("the waypoint's Envoy ready with every xDS type ACKed", ready, WAIT, BenchError)
            envoy_pid = int(proxy()["envoy"]["pid"])
            agents = {"node1": n1.agent, "node2": n2.agent}
            script = n1.dir / "report.lua"
            script.write_text(WRK_SCRIPT)
            targets = {
                "direct": (plain_client, f"http://{plain.ip4}:{PORT}/"),
                "l4": (client, f"http://{l4.ip4}:{PORT}/"),
                "waypoint": (client, f"http://{VIP}:{PORT}/"),
            }
            for name in PATHS:
                who, url = targets[name]
                host = url.split("/")[2].split(":")[0]
                probe = n1.peer(who, ["http", host, str(PORT), "--timeout", "10"], timeout=30)
                if probe.get("status") != {"200": 1}:
                    raise BenchError(
                        f"{name}: one request to {url} did not answer 200: {probe}; "
                        "node1 agent log:\n" + n1.log_tail(15) + "\nnode2:\n" + n2.log_tail(15)
                    )
                # warm-up: connections, HBONE pools, Envoy's upstreams
                _wrk(tb, wrk, script, who, url, WARMUP_S)
                cpu0 = {r: proc_cpu(a.pid) for r, a in agents.items() if a is not None}
                env0 = proc_cpu(envoy_pid)
                res = _wrk(tb, wrk, script, who, url, seconds)
                cpu = {r: proc_cpu(a.pid) - cpu0[r] for r, a in agents.items() if a is not None}
                env = proc_cpu(envoy_pid) - env0
                n = res["requests"]
                k = n / 1000 if n else float("nan")
                rows[name] = {
                    "url": url,
                    "requests": n,
                    "errors": res["errors"],
                    "non2xx": res["non2xx"],
                    "rps": round(n / (res["duration_us"] / 1e6), 1),
                    "p50_ms": round(res["p50_us"] / 1000, 3),
                    "p99_ms": round(res["p99_us"] / 1000, 3),
                    "agent_cpu_ms_per_1k": round(sum(cpu.values()) * 1000 / k, 1),
                    "agent_cpu_ms_per_1k_by_node": {
                        r: round(c * 1000 / k, 1) for r, c in sorted(cpu.items())
                    },
                    "envoy_cpu_ms_per_1k": round(env * 1000 / k, 1),
                }
            stats = envoy_stats(wp_pod)
            waypoint_envoy = {
                "pid": envoy_pid,
                "rss_mib": proc_rss_mib(envoy_pid),
                "counters_whole_run": {  # warm-ups and probes included
                    k: v
                    for k, v in sorted(stats.items())
                    if v
                    and not k.startswith(("http.admin.", "cluster.xds"))
                    and (
                        (".downstream_rq_" in k and k.endswith("xx"))
                        or k.endswith(("upstream_cx_total", "upstream_rq_retry"))
                        or "upstream_rq_5" in k
                        or "_reset" in k
                    )
                },
            }
        finally:
            for srv in servers:
                with contextlib.suppress(Exception):
                    srv.stop()
            for n in (n1, n2):
                n.stop_agent()
                with contextlib.suppress(OSError):
                    n.cleanup()
            cluster.close()
    direct = rows["direct"]
    for row in rows.values():
        row["rps_x_direct"] = _ratio(row["rps"], direct["rps"])
        row["p50_x_direct"] = _ratio(row["p50_ms"], direct["p50_ms"])
        row["p99_x_direct"] = _ratio(row["p99_ms"], direct["p99_ms"])
    return {
        "paths": rows,
        "waypoint_envoy": waypoint_envoy,
        "seconds_per_path": seconds,
        "connections": CONNECTIONS,
        "loadavg": [round(x, 2) for x in (*load0, *os.getloadavg())],
        "wall_s": round(time.monotonic() - t0, 1),
    }


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def median_runs(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Each number the median of the runs' (ratios recomputed from the medians' runs
    would mix runs: the ratios too are medians of per-run ratios)."""

    def med(values: list[Any]) -> Any:
        nums = [v for v in values if isinstance(v, (int, float)) and v == v]
        return round(statistics.median(nums), 3) if nums else None

    out: dict[str, Any] = json.loads(json.dumps(reports[0]))
    for name, row in out["paths"].items():
        for key, value in row.items():
            if isinstance(value, (int, float)):
                row[key] = med([r["paths"][name][key] for r in reports])
            elif isinstance(value, dict):
                row[key] = {k: med([r["paths"][name][key][k] for r in reports]) for k in value}
    out["waypoint_envoy"] = {"rss_mib": med([r["waypoint_envoy"]["rss_mib"] for r in reports])}
    out["runs"] = len(reports)
    out["per_run"] = {  # the spread behind the medians
        name: {k: [r["paths"][name][k] for r in reports] for k in ("rps", "p50_ms", "p99_ms")}
        for name in out["paths"]
    }
    out["loadavg"] = [r["loadavg"] for r in reports]
    out["wall_s"] = [r["wall_s"] for r in reports]
    return out


def _print(report: dict[str, Any]) -> None:
    runs = report.get("runs", 1)
    print(
        f"HTTP/1.1 keep-alive, {report['connections']} connections (wrk), "
        f"{report['seconds_per_path']:g} s per path"
        + (f", median of {runs} runs" if runs > 1 else "")
    )
    hdr = (
        f"{'path':9} {'rps':>9} {'x direct':>8} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'p99 x':>7} {'agent ms/1k':>11} {'Envoy ms/1k':>11} {'errors':>6}"
    )
    print(hdr)
    for name in PATHS:
        r = report["paths"][name]
        print(
            f"{name:9} {r['rps']:>9} {r['rps_x_direct']:>8} {r['p50_ms']:>8} {r['p99_ms']:>8} "
            f"{r['p99_x_direct']:>7} {r['agent_cpu_ms_per_1k']:>11} "
            f"{r['envoy_cpu_ms_per_1k']:>11} {r['errors'] + r['non2xx']:>6}"
        )
    for name, spread in report.get("per_run", {}).items():
        print(f"  {name} per run: rps {spread['rps']}, p99 ms {spread['p99_ms']}")
    print(f"waypoint Envoy RSS: {report['waypoint_envoy']['rss_mib']} MiB")
    print(f"load average (1/5/15 min, at start then end of each run): {report['loadavg']}")


def main(seconds: float = 5.0, runs: int = 1, json_out: bool = False) -> int:
    reports = []
    for i in range(runs):
        reports.append(run_once(seconds))
        if runs > 1 and not json_out:
            last = reports[-1]
            print(f"run {i + 1}/{runs}: {last['wall_s']} s, load {last['loadavg']}")
    report = median_runs(reports) if runs > 1 else reports[0]
    if json_out:
        print(json.dumps(report, indent=1))
    else:
        _print(report)
    return 0
