"""`tether demo`: a simulated node with pods in network namespaces, a real
agent capturing two of them with eBPF, real traffic, a report of what was
captured, and a teardown that is checked against the kernel.

Exit status is 0 only if every connection took the path it should and
nothing tether made is left in the kernel afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from agent.datapath import inventory
from agent.sim.harness import AgentNode, classify
from agent.sim.topology import Testbed


@dataclasses.dataclass
class Flow:
    """One connection the demo makes and the path it must take."""

    name: str
    client: str  # pod name or "kubelet"
    server: str
    family: int
    expect: tuple[str, str]  # (outbound, inbound): captured | direct


FLOWS = [
    Flow("enrolled -> enrolled (IPv4)", "frontend", "backend", 4, ("captured", "captured")),
    Flow("enrolled -> enrolled (IPv6)", "frontend", "backend", 6, ("captured", "captured")),
    Flow("enrolled -> not enrolled", "frontend", "legacy", 4, ("captured", "direct")),
    Flow("not enrolled -> enrolled", "legacy", "backend", 4, ("direct", "captured")),
    Flow("not enrolled -> not enrolled", "legacy", "legacy", 6, ("direct", "direct")),
    Flow("kubelet probe -> enrolled", "kubelet", "backend", 4, ("direct", "direct")),
]


def run(sk_msg: bool) -> dict[str, Any]:
    with Testbed() as tb:
        an = AgentNode(tb, "node1", sk_msg=sk_msg)
        try:
            an.add_pod("frontend", "shop", "frontend")
            an.add_pod("backend", "shop", "backend")
            an.add_pod("legacy", "legacy", "legacy")
            an.enroll_namespace("shop")
            for p in an.pods:
                an.serve(p)
            an.start_agent()
            results = []
            for f in FLOWS:
                client = an.node.kubelet if f.client == "kubelet" else tb.pod(f.client)
                server = tb.pod(f.server)
                r = an.connect(client, server, family=f.family)
                results.append((f, r, server.ip4 if f.family == 4 else server.ip6,
                                None if f.client == "kubelet" else
                                (tb.pod(f.client).ip4 if f.family == 4 else tb.pod(f.client).ip6)))
            time.sleep(0.3)  # let the agent close its records
            status = an.status()
            conns = an.connections()
            inv = an.inventory()
        finally:
            an.stop_agent()
            an.cleanup()
            left = inventory.remaining(inv, an.pin_dir) if "inv" in locals() else {"unknown": 1}
            an.close()
        flows = []
        for f, r, server_ip, client_ip in results:
            seen = classify(r, conns)
            src_ok = client_ip is None or (r.get("server_saw_peer") or [None])[0] == client_ip
            dst_ok = (r.get("getpeername") or [None])[0] == server_ip
            ok = bool(r.get("ok")) and (seen[0].split(" ")[0], seen[1]) == f.expect \
                and src_ok and dst_ok
            flows.append({
                "flow": f.name,
                "client": f.client,
                "server": f.server,
                "original_destination": ":".join(map(str, r.get("getpeername") or [])),
                "server_saw_source": ":".join(map(str, r.get("server_saw_peer") or [])),
                "outbound": seen[0],
                "inbound": "probe bypass" if f.client == "kubelet" and seen[1] == "direct"
                else seen[1],
                "expected": "/".join(f.expect),
                "source_ip_preserved": src_ok,
                "bytes_echoed_ok": bool(r.get("ok")),
                "ok": ok,
                "error": r.get("error"),
            })
        return {
            "topology": tb.describe()["nodes"],
            "sk_msg": sk_msg,
            "flows": flows,
            "bpf_counters": status["datapath"]["stats"],
            "hooks": {k: list(v["links"]) for k, v in status["datapath"]["pods"].items()},
            "kernel_objects_while_running": inv.counts(),
            "kernel_objects_left": left,
            "ok": all(f["ok"] for f in flows) and not any(left.values()),
        }


def main(json_out: bool = False, sk_msg: bool = False) -> int:
    report = run(sk_msg)
    if json_out:
        print(json.dumps(report, indent=1))
    else:
        print_report(report)
    return 0 if report["ok"] else 1


def print_report(r: dict[str, Any]) -> None:
    print("tether demo: one simulated node, pods in network namespaces, eBPF capture"
          + (" (sk_msg on)" if r["sk_msg"] else ""))
    print("namespace shop is enrolled (istio.io/dataplane-mode=ambient); legacy is not\n")
    for n in r["topology"]:
        for p in n["pods"]:
            print(f"  pod {p['namespace'] + '/' + p['name']:16} {p['ip4']:12} {p['ip6']}")
    for pod, hooks in r["hooks"].items():
        print(f"  {pod}: {', '.join(hooks)}")
    print(f"\n  {'flow':30} {'original destination':22} {'server saw':22} "
          f"{'outbound':18} {'inbound':13} ok")
    for f in r["flows"]:
        mark = "yes" if f["ok"] else f"NO (expected {f['expected']}) {f['error'] or ''}"
        print(f"  {f['flow']:30} {f['original_destination']:22} {f['server_saw_source']:22} "
              f"{f['outbound']:18} {f['inbound']:13} {mark}")
    print("\nBPF counters: " + ", ".join(f"{k}={v}" for k, v in r["bpf_counters"].items() if v))
    print("kernel objects while running: " + ", ".join(
        f"{k}={v}" for k, v in r["kernel_objects_while_running"].items()))
    left = r["kernel_objects_left"]
    print("left after `tether cleanup`: "
          + (", ".join(f"{k}={v}" for k, v in left.items() if v) or "nothing"))
    print("\nresult:", "OK" if r["ok"] else "FAILED")
