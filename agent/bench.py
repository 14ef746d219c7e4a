"""`tether bench datapath`: same-node pod-to-pod throughput and request/response
latency, direct vs captured (relayed by the agent) vs captured with sk_msg.

Real C peers do the measuring (iperf3 for single-stream throughput, sockperf
ping-pong with 1 KiB messages for round-trip latency), so the only Python in
the path is the agent under test.  Every number is also given as a ratio to
the direct baseline measured in the same run: these machines are noisy, and
ratios survive that better than absolute numbers.  A benchmark, never a test:
nothing here asserts a speed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

from agent.sim.harness import AgentNode
from agent.sim.topology import Pod, Testbed

IPERF_PORT = 5201
SOCKPERF_PORT = 11111


def _iperf(an: AgentNode, client: Pod, server: Pod, seconds: float) -> float:
    srv = an.tb.spawn(server, ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    try:
        p = an.tb.spawn(client, ["iperf3", "-c", server.ip4, "-p", str(IPERF_PORT), "-t",
                                 str(seconds), "-J"], stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE)
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
    srv = an.tb.spawn(server, ["sockperf", "sr", "--tcp", "-i", server.ip4, "-p",
                               str(SOCKPERF_PORT)],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)
    try:
        p = an.tb.spawn(client, ["sockperf", "pp", "--tcp", "-i", server.ip4, "-p",
                                 str(SOCKPERF_PORT), "-m", "1024", "-t", str(int(seconds)),
                                 "--full-rtt"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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


def main(what: str, seconds: float = 3.0, json_out: bool = False) -> int:
    if what != "datapath":
        raise SystemExit(f"unknown benchmark {what!r}")
    report = run(seconds)
    if json_out:
        print(json.dumps(report, indent=1))
        return 0
    print(f"tether bench datapath: same node, pod to pod, {seconds:g} s per measurement")
    print("iperf3 single stream; sockperf TCP ping-pong 1 KiB, full round trip\n")
    print(f"{'path':26} {'Gbit/s':>8} {'x direct':>9} {'p50 us':>8} {'x':>6} {'p99 us':>8} "
          f"{'x':>6} {'agent CPU s/GB':>15} {'agent RSS MiB':>14}")
    for name, r in report["results"].items():
        print(f"{name:26} {r['throughput_gbit_s']:>8} {r['throughput_ratio']:>9} "
              f"{r['p50_us']:>8} {r['p50_ratio']:>6} {r['p99_us']:>8} {r['p99_ratio']:>6} "
              f"{r.get('agent_cpu_s_per_gb', '-')!s:>15} {r.get('agent_rss_mib', '-')!s:>14}")
    return 0
