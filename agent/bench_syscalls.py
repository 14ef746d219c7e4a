"""`tether bench syscalls`: system calls per new connection and per message,
each agent, counted by strace on the two-node testbed of `tether bench
tunnel`.

CPU figures on a shared 2-core machine move 10-20 % from run to run; a
count of system calls does not depend on how loaded the machine is, so a
change to the per-connection or per-message path shows in it at once, and
each call is a kernel entry the CPU figures pay for.  strace slows the
agents a great deal while it is attached: only the counts are reported,
never its times.

- connections: the connect-per-request client of `bench tunnel` (connect,
  1 byte each way, close), counted per connection it completed;
- messages: sockperf's 1 KiB TCP ping-pong at 1000/s (the vCPU@1k
  workload), counted per message it received back (a request and its reply
  through both agents).

The stunnel pair of `bench tunnel` (a C relay doing the same job: TLS 1.3,
mutual, node to node) is counted the same way first, between two pods of
a namespace that is not enrolled, as the baseline.  `--variant NAME:K=V`
counts again with both agents restarted under that environment
(`PYTHONPATH=<tree>`: another tree's agent, checked as in `bench tunnel`).
`--runs N` repeats the whole measurement N times and reports each count's
median (and every run's total, to show how little they move).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.bench import (
    CPS_PORT,
    RATE_MPS,
    SOCKPERF_PORT,
    _check_variant_code,
    _env,
    _sockperf_pp,
    _start_stunnel,
    _stop_stunnel,
    _t_cps,
    _variant_env,
    two_nodes,
)
from agent.sim.topology import Pod, Testbed

ATTACH_S = 0.5  # strace's attach to every thread, before the workload starts
# "[Total Run] RunTime=2.000 sec; Warm up time=400 msec; SentMessages=2001; ReceivedMessages=2000"
_RECEIVED = re.compile(r"\[Total Run\].*?ReceivedMessages=(\d+)")


def parse_strace_summary(text: str) -> dict[str, int]:
    """`strace -c` summary table -> {syscall: calls}."""
    calls: dict[str, int] = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) < 5 or not f[0][0].isdigit() or f[-1] == "total":
            continue
        # % time, seconds, usecs/call, calls, [errors], syscall
        calls[f[-1]] = calls.get(f[-1], 0) + int(f[3])
    return calls


def _counted(
    pids: dict[str, int], out: Path, tag: str, workload: Any
) -> tuple[int, dict[str, dict[str, int]]]:
    """Run `workload` (-> units done) with strace -c on every process."""
    strace = shutil.which("strace")
    if strace is None:
        raise RuntimeError("strace not installed (apt-get install strace)")
    procs = {}
    for role, pid in pids.items():
        path = out / f"{tag}-{re.sub(r'[^a-z0-9]+', '_', role)}.txt"
        procs[role] = (
            subprocess.Popen(
                [strace, "-f", "-c", "-o", str(path), "-p", str(pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
            path,
        )
    try:
        time.sleep(ATTACH_S)
        units = int(workload())
    finally:
        for p, _ in procs.values():
            p.send_signal(signal.SIGINT)  # detach: strace writes its summary
        for p, _ in procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
    counts = {role: parse_strace_summary(path.read_text()) for role, (_, path) in procs.items()}
    return units, counts


def _per_unit(units: int, calls: dict[str, dict[str, int]]) -> dict[str, Any]:
    out: dict[str, Any] = {"units": units}
    for role, c in calls.items():
        per = {k: round(v / units, 2) for k, v in sorted(c.items(), key=lambda kv: -kv[1])}
        out[role] = {"total": round(sum(c.values()) / units, 1), "calls": per}
    return out


def _workloads(tb: Testbed, client: Pod, server: Pod, host: str, seconds: float) -> dict[str, Any]:
    """The two counted workloads from `client` to `server` at `host`."""

    def conns() -> int:
        return int(_t_cps(tb, client, server, host, CPS_PORT, seconds)["ok"])

    def messages() -> int:
        t = max(2, round(seconds))
        args = ["--mps", str(RATE_MPS), "-t", str(t)]
        rc, text, _ = _sockperf_pp(tb, client, server, host, SOCKPERF_PORT, args, t + 30)
        m = _RECEIVED.search(text)
        if rc != 0 or m is None:
            raise RuntimeError(f"sockperf --mps: {text[-500:]}")
        return int(m.group(1))

    return {"connection": conns, "message": messages}


def _row(pids: dict[str, int], out: Path, name: str, workloads: dict[str, Any]) -> dict[str, Any]:
    row: dict[str, Any] = {}
    tag = re.sub(r"\W+", "_", name)
    for workload, fn in workloads.items():
        units, calls = _counted(pids, out, f"{tag}-{workload}", fn)
        if units <= 0:
            raise RuntimeError(f"{name}: no {workload} completed under strace")
        row[workload] = _per_unit(units, calls)
    return row


def run_syscalls(
    seconds: float, out_dir: str, variants: dict[str, dict[str, str]] | None = None
) -> dict[str, Any]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"seconds": seconds, "rows": {}}
    load0 = os.getloadavg()
    rows: list[tuple[str, dict[str, str]]] = [("as is", {})]
    rows += [(n, _variant_env(v)) for n, v in (variants or {}).items()]
    with two_nodes() as (tb, n1, n2, a, b), tempfile.TemporaryDirectory() as tmp:
        # the C baseline first, on an idle machine, between unenrolled pods
        c = n1.add_pod("c", "plain", "client")
        d = n2.add_pod("d", "plain", "server")
        pids, _ = _start_stunnel(tb, Path(tmp), n1.node, n2.node, d)
        try:
            work = _workloads(tb, c, d, n1.node.gateway4, seconds)
            work["connection"]()  # as the agents' rows get: one warm-up second
            stunnel = {"sender (node1)": pids["stunnel-client"]}
            stunnel["receiver (node2)"] = pids["stunnel-server"]
            report["rows"]["stunnel pair"] = _row(stunnel, out, "stunnel pair", work)
            report["rows"]["stunnel pair"]["what"] = "stunnel (C), client and server"
        finally:
            _stop_stunnel(tb, pids)
        work = _workloads(tb, a, b, b.ip4, seconds)
        for name, env in rows:
            for an in (n1, n2):
                an.stop_agent()
            with _env(env):
                n1.start_agent()
                n2.start_agent()
            code = _check_variant_code(name, env, n1, n2)
            _t_cps(tb, a, b, b.ip4, CPS_PORT, 1.0)  # the pooled HBONE connection up
            agents = {"sender (node1)": n1.agent, "receiver (node2)": n2.agent}
            row = _row({k: p.pid for k, p in agents.items() if p is not None}, out, name, work)
            row["agent_code"] = code
            row["what"] = f"agent code at {code}"
            report["rows"][name] = row
    report["loadavg"] = [round(x, 2) for x in (*load0, *os.getloadavg())]
    return report


def median_runs(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several: every count per unit the median of the runs'
    (a call a run did not make counts 0 there)."""
    out: dict[str, Any] = {
        "seconds": reports[0]["seconds"],
        "runs": len(reports),
        "loadavg_runs": [r["loadavg"] for r in reports],
        "rows": {},
    }
    for name, first in reports[0]["rows"].items():
        rows = [r["rows"][name] for r in reports]
        merged: dict[str, Any] = {k: v for k, v in first.items() if isinstance(v, str)}
        for workload in ("connection", "message"):
            parts = [r[workload] for r in rows]
            m: dict[str, Any] = {"units": [p["units"] for p in parts]}
            for role in ("sender (node1)", "receiver (node2)"):
                per = [p[role] for p in parts]
                names = {k for p in per for k in p["calls"]}
                calls = {k: statistics.median(p["calls"].get(k, 0.0) for p in per) for k in names}
                m[role] = {
                    "total": statistics.median(p["total"] for p in per),
                    "totals": [p["total"] for p in per],
                    "calls": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
                }
            merged[workload] = m
        out["rows"][name] = merged
    return out


def _format(report: dict[str, Any]) -> str:
    lines = [
        "tether bench syscalls: system calls per unit, each agent, counted by strace -f -c "
        "(its times are not reported: it slows the agents); medians of "
        f"{report['runs']} run(s), load (1/5/15 min) at start and end of each: "
        + "; ".join(map(str, report["loadavg_runs"])),
        "",
    ]
    for name, row in report["rows"].items():
        lines.append(f"[{name}] {row['what']}")
        for workload in ("connection", "message"):
            r = row[workload]
            lines.append(f"  per {workload} ({r['units']} counted):")
            for role in ("sender (node1)", "receiver (node2)"):
                top = ", ".join(f"{k} {v:g}" for k, v in list(r[role]["calls"].items())[:10])
                each = "/".join(f"{t:g}" for t in r[role]["totals"])
                lines.append(f"    {role:17} {r[role]['total']:6.1f}  (each run {each}; {top})")
    return "\n".join(lines)


def main(
    seconds: float,
    out_dir: str,
    variants: dict[str, dict[str, str]] | None = None,
    json_out: bool = False,
    runs: int = 1,
) -> int:
    report = median_runs([run_syscalls(seconds, out_dir, variants) for _ in range(max(1, runs))])
    print(json.dumps(report, indent=1) if json_out else _format(report))
    return 0
