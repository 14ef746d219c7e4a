"""`tether` command line: run, status, cleanup, demo, bench, bpf-source, ca, waypoint-proxy."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def _cmd_run(a: argparse.Namespace) -> int:
    from agent.app import main_run

    kube = {"node": a.node, "kubeconfig": a.kubeconfig} if a.kube else None
    if a.kube and not a.node:
        print(
            "tether run --kube needs --node (the DaemonSet passes spec.nodeName)", file=sys.stderr
        )
        return 2
    return main_run(a.config, True if a.sk_msg else None, kube)


def _cmd_status(a: argparse.Namespace) -> int:
    url = f"http://127.0.0.1:{a.admin_port}/config_dump"
    try:
        import urllib.request  # here: the agent's own run never needs it

        with urllib.request.urlopen(url, timeout=5) as r:
            data = json.load(r)
    except OSError as e:
        print(
            f"tether status: no agent answers on {url} ({e}); is `tether run` up?", file=sys.stderr
        )
        return 1
    if a.json:
        print(json.dumps(data, indent=1))
        return 0
    dp = data["datapath"]
    print(f"node {data['node']}  ready={data['ready']}  sk_msg={dp['skmsg']}  pins={dp['pin_dir']}")
    print("programs: " + ", ".join(f"{n} ({h})" for n, h in dp["programs"].items()))
    print(f"enrolled pods: {len(dp['pods'])}")
    for key, p in dp["pods"].items():
        print(
            f"  {key:30} slot {p['slot']:<4} ips {','.join(p['spec']['ips'])}  "
            f"hooks {','.join(p['links'])}"
        )
    for key, err in data["pod_errors"].items():
        print(f"  {key:30} NOT CAPTURED: {err}")
    print("bpf counters: " + ", ".join(f"{k}={v}" for k, v in dp["stats"].items() if v))
    for c in data.get("certificates", []):
        print(
            f"certificate {c.get('identity')}: {c.get('state')}, serial {c.get('serial')}, "
            f"until {c.get('not_after')}"
        )
    for w in data.get("waypoints", []):
        print(
            f"waypoint {w['name']} ({w['identity']}, for {w['for']}) at "
            f"{','.join(w['addresses']) or 'no address yet'}; guards {','.join(w['guards']) or '-'}"
        )
    for u in data.get("waypoint_uses", []):
        print(f"  {u['scope']} {u['name']} uses waypoint {u['waypoint']}: {u['status']}")
    for w in data.get("waypoint_proxies", []):
        envoy = w.get("envoy") or {}
        print(
            f"waypoint proxy {w['name']}: Envoy pid {envoy.get('pid') or '-'} "
            f"ready={w['ready']} restarts={envoy.get('restarts', 0)}"
            + (f"  ERROR: {w['error']}" if w.get("error") else "")
        )
        for uri, j in (w.get("jwks") or {}).items():
            state = "fetched" if j["fetched"] else "NOT FETCHED (its tokens are refused)"
            err = f"; last fetch failed ({j['failures']}x): {j['error']}" if j["error"] else ""
            print(f"  jwksUri {uri}: {state}{err}")
    for p in data.get("hbone_pool", []):
        print(
            f"hbone pool {p['src']} -> {p['dst']} at {p['address']}: "
            f"{p['connections']} connections, {p['streams']} streams"
            + (f" (loop {p['loop']})" if "loop" in p else "")
        )
    opened = data["connections"]["open"]
    loops = data.get("tunnel_loops")
    per_loop = (
        f" (per tunnel loop: {', '.join(map(str, loops['open_connections']))})"
        if loops and loops.get("count", 1) > 1
        else ""
    )
    print(f"open connections: {len(opened)}{per_loop}")
    for c in opened:
        ids = f" [{c['src_identity'] or '-'} -> {c['dst_identity'] or '-'}]"
        print(f"  {c['pod']:20} {c['direction']:8} {c['src']} -> {c['dst']} via {c['path']}" + ids)
    return 0


def _cmd_cleanup(a: argparse.Namespace) -> int:
    from agent.datapath.datapath import cleanup

    report = cleanup(a.pin_dir, a.state_dir)
    print(
        json.dumps(report, indent=1)
        if a.json
        else f"removed {len(report['links'])} links, {len(report['maps'])} pinned maps, "
        f"routing in {len(report['netns'])} pod netns"
    )
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from agent.demo import main as demo_main

    return demo_main(json_out=a.json, sk_msg=a.sk_msg)


def _cmd_bench(a: argparse.Namespace) -> int:
    if a.what == "waypoint":
        from agent.bench_waypoint import main as waypoint_main

        return waypoint_main(seconds=a.seconds, runs=a.runs, json_out=a.json)
    if a.what == "loops":
        from agent.bench_loops import main as loops_main

        return loops_main(loops_n=a.loops, runs=a.runs, json_out=a.json)
    variants = {}
    for spec in a.variant:
        name, _, env = spec.partition(":")
        variants[name] = dict(kv.split("=", 1) for kv in env.split(",") if kv)
    if a.what == "syscalls":
        from agent.bench_syscalls import main as syscalls_main

        return syscalls_main(a.seconds, a.out, variants, json_out=a.json, runs=a.runs)
    if a.what == "pingpong":
        from agent.bench_pingpong import main as pingpong_main

        workload = "connections" if a.workload == "connections" else "messages"
        return pingpong_main(a.runs, variants, json_out=a.json, workload=workload)
    from agent.bench import main as bench_main

    return bench_main(
        a.what,
        seconds=a.seconds,
        json_out=a.json,
        out_dir=a.out,
        runs=a.runs,
        cross_only=a.cross_only,
        variants=variants,
        workload=a.workload,
        connections=a.connections,
        busy=a.busy,
    )


def _cmd_ca(a: argparse.Namespace) -> int:
    import asyncio
    import logging

    from agent.identity.serve_ca import run_ca

    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    authenticator = None
    if a.kube:
        from agent.sources.k8s_auth import kube_authenticator

        authenticator = kube_authenticator(a.trust_domain, a.kubeconfig)
    elif not a.auth_file:
        print(
            "tether ca: give --kube (TokenReview) or --auth-file (static tokens)", file=sys.stderr
        )
        return 2
    from agent.identity.serve_ca import DEFAULT_SERVER_NAMES

    names = (*DEFAULT_SERVER_NAMES, *a.server_name) if a.server_name else DEFAULT_SERVER_NAMES
    try:
        asyncio.run(
            run_ca(
                a.bind,
                a.root_dir,
                trust_domain=a.trust_domain,
                authenticator=authenticator,
                auth_file=None if a.kube else a.auth_file,
                tls=not a.insecure,
                server_names=names,
            )
        )
    except (ValueError, OSError) as e:
        print(f"tether ca: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


def _cmd_bpf_source(a: argparse.Namespace) -> int:
    from agent.datapath.loader import BuildOptions, compose_source

    opts = BuildOptions(pin_dir=a.pin_dir)
    print("// cflags: " + " ".join(opts.cflags()))
    print(compose_source(opts))
    return 0


def _cmd_waypoint_proxy(a: argparse.Namespace) -> int:
    """The waypoint pod's entrypoint (agent/sources/waypoint_deploy.py writes
    it into the Deployment): Envoy, fed over ADS by the node agent on the
    unix socket <xds-dir>/<ns>.<name>.sock, with the node id it checks."""
    import tempfile

    from waypoint.envoy import EnvoyNotInstalled, bootstrap, envoy_binary
    from waypoint.xds import node_id, socket_name

    try:
        path = Path(a.xds_dir) / socket_name(a.namespace, a.name)
    except ValueError as e:
        print(f"tether waypoint-proxy: {e}", file=sys.stderr)
        return 2
    # Ready (the kubelet's probe on the status port) only once the node
    # agent's first CDS and LDS arrived: no initial-fetch timeout
    cfg = bootstrap(
        node_id(a.namespace, a.name),
        f"{a.name}.{a.namespace}",
        path,
        a.admin_port,
        initial_fetch_timeout_s=0,
        ready_port=a.ready_port or None,
    )
    if a.print:
        print(json.dumps(cfg, indent=1))
        return 0
    try:
        binary = envoy_binary()
    except EnvoyNotInstalled as e:
        print(f"tether waypoint-proxy: {e}", file=sys.stderr)
        return 1
    fd, cfg_path = tempfile.mkstemp(prefix="waypoint-bootstrap-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f)
    argv = [str(binary), "-c", cfg_path, "-l", a.log_level, "--disable-hot-restart"]
    os.execv(argv[0], argv)  # Envoy is the pod's process: signals go to it


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tether", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    r = sub.add_parser("run", help="run the node agent from a local config file")
    r.add_argument("--config", required=True, help="local-file model (YAML)")
    r.add_argument("--sk-msg", action="store_true", help="splice pod<->agent hops with sk_msg")
    r.add_argument(
        "--kube",
        action="store_true",
        help="take namespaces, pods, services and policies from the Kubernetes API",
    )
    r.add_argument("--node", default=os.environ.get("NODE_NAME"), help="this node's name")
    r.add_argument("--kubeconfig", help="default: in-cluster, then ~/.kube/config")
    r.set_defaults(fn=_cmd_run)

    s = sub.add_parser("status", help="what the running agent captures")
    s.add_argument("--admin-port", type=int, default=15000)
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=_cmd_status)

    c = sub.add_parser("cleanup", help="remove every link, program, pin and rule tether made")
    c.add_argument("--pin-dir", default="/sys/fs/bpf/tether")
    c.add_argument("--state-dir", default="/run/tether")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=_cmd_cleanup)

    d = sub.add_parser("demo", help="simulated node: capture pods' traffic, then tear down")
    d.add_argument("--json", action="store_true")
    d.add_argument("--sk-msg", action="store_true")
    d.set_defaults(fn=_cmd_demo)

    b = sub.add_parser("bench", help="benchmarks (numbers as ratios to a same-run baseline)")
    b.add_argument(
        "what",
        choices=[
            "datapath",
            "tunnel",
            "h2",
            "profile",
            "memory",
            "waypoint",
            "ktls",
            "workers",
            "loops",
            "syscalls",
            "pingpong",
        ],
    )
    b.add_argument("--seconds", type=float, default=3.0)
    b.add_argument("--json", action="store_true")
    b.add_argument(
        "--out",
        default="profile",
        help="profile: where py-spy's stacks go; syscalls: strace's summaries",
    )
    b.add_argument(
        "--runs",
        type=int,
        default=1,
        help="tunnel, waypoint, workers, pingpong (at least 3), syscalls: runs, medians reported",
    )
    b.add_argument("--connections", type=int, default=1000, help="memory: open connections to hold")
    b.add_argument("--loops", type=int, default=2, help="loops: tunnel loops against 1")
    b.add_argument(
        "--workload",
        choices=["throughput", "connections", "messages"],
        default="throughput",
        help="profile; pingpong: connections (else 1 KiB round trips)",
    )
    b.add_argument("--cross-only", action="store_true", help="tunnel: skip the same-node rows")
    b.add_argument(
        "--busy",
        type=int,
        default=0,
        metavar="N",
        help="tunnel: N busy-loop processes compete for the CPU throughout (load)",
    )
    b.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME:K=V[,K=V]",
        help="tunnel, syscalls, pingpong: one more row, the agents (pingpong: the process) "
        "started with this environment",
    )
    b.set_defaults(fn=_cmd_bench)

    ca = sub.add_parser("ca", help="serve istio.v1.auth.IstioCertificateService (the mesh CA)")
    ca.add_argument("--bind", default="0.0.0.0:15012")
    ca.add_argument(
        "--root-dir",
        help="ca-key.pem/ca-cert.pem (Istio cacerts layout); generated there if absent",
    )
    ca.add_argument("--trust-domain", default="cluster.local")
    ca.add_argument(
        "--auth-file",
        help="YAML: bearer tokens -> a node agent (impersonates its pods) or one workload "
        "identity, and which identities run on which node",
    )
    ca.add_argument(
        "--kube",
        action="store_true",
        help="authenticate callers with TokenReview; an agent may get identities "
        "of pods on its node",
    )
    ca.add_argument("--kubeconfig", help="default: in-cluster, then ~/.kube/config")
    ca.add_argument(
        "--server-name",
        action="append",
        help="DNS name or IP in the CA's serving certificate (repeatable), e.g. "
        "tether-ca.tether-system.svc",
    )
    ca.add_argument("--insecure", action="store_true", help="serve without TLS (tests only)")
    ca.set_defaults(fn=_cmd_ca)

    w = sub.add_parser(
        "waypoint-proxy", help="a waypoint pod: Envoy configured by this node's agent over ADS"
    )
    w.add_argument("--namespace", required=True, help="the waypoint Gateway's namespace")
    w.add_argument("--name", required=True, help="the waypoint Gateway's name")
    w.add_argument(
        "--xds-dir",
        default="/var/run/tether/xds",
        help="the node agent's <stateDir>/xds, mounted from the host",
    )
    w.add_argument("--admin-port", type=int, default=15000, help="Envoy admin, 127.0.0.1 only")
    w.add_argument(
        "--ready-port",
        type=int,
        default=15021,
        help="GET /healthz/ready: 200 once configured by the node agent (0: none)",
    )
    w.add_argument("--log-level", default="warning")
    w.add_argument("--print", action="store_true", help="print the bootstrap and exit")
    w.set_defaults(fn=_cmd_waypoint_proxy)

    e = sub.add_parser("bpf-source", help="print the C text BCC compiles, with its cflags")
    e.add_argument("--pin-dir", default="/sys/fs/bpf/tether")
    e.set_defaults(fn=_cmd_bpf_source)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = parser().parse_args(argv)
    rc: int = a.fn(a)
    return rc


if __name__ == "__main__":
    sys.exit(main())
