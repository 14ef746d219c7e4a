"""`tether demo`'s L7 act: a real Envoy waypoint, run and configured by the
node-1 agent, in front of the seeds' blog-api (set up as
tests/netns/test_waypoint_envoy.py does).

Two simulated nodes.  Node 1: the client pod (blog/frontend) and the
waypoint's pod; node 2: blog-api v1 and v2 and a flaky backend.  Both
Services carry ``istio.io/use-waypoint``, so the client's agent sends their
VIP traffic over HBONE to the waypoint, where Envoy applies the translated
Istio L7 policy.  Shown: the seeds' 90/10 canary with its header override, an
L7 deny by method and path, retries hiding a flaky backend, a JWT-protected
route, Istio's request metrics (``istio_requests_total{reporter="waypoint"}``)
on the agent's :15020 from Envoy's access log, checked against Envoy's own
HTTP counters.  Every check decides the exit status.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
from typing import Any

from agent.datapath import inventory
from agent.sim.harness import AgentNode, Cluster, envoy_stats, until, waypoint_requests
from agent.sim.topology import Pod, Testbed

NS = "blog"
VIP = "10.96.0.10"  # blog-api
FLAKY_VIP = "10.96.0.11"
PORT = 8080
HOST = f"blog-api.{NS}.svc.cluster.local"
FLAKY_HOST = f"flaky.{NS}.svc.cluster.local"
WAYPOINT = "waypoint"
WAIT = 90.0  # Envoy start, certificates and xDS on a loaded 2-core machine
SPLIT_N = 100
CANARY_N = 10
# v2's share of 100 at 10 %: binomial sd 3; [1, 22] is beyond 3 sd on both sides
SPLIT_V2_RANGE = (1, 22)
# Istio's default retry policy already retries twice: 3 failures get through
# only with the VirtualService's 3 attempts
FLAKY_FAILS = 3
ISSUER = "https://auth.example.com"
AUDIENCE = "blog-api"
PROTECTED = "/api/v1/drafts"


def _doc(kind: str, name: str, spec: dict[str, Any], api: str) -> dict[str, Any]:
    return {
        "apiVersion": api,
        "kind": kind,
        "metadata": {"name": name, "namespace": NS},
        "spec": spec,
    }


def _to_waypoint() -> list[dict[str, str]]:
    return [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": WAYPOINT}]


SUBSETS = _doc(  # the seeds' DestinationRule blog/blog-api, its subsets only
    "DestinationRule",
    "blog-api",
    {
        "host": "blog-api",
        "subsets": [
            {"name": "v1", "labels": {"version": "v1"}},
            {"name": "v2", "labels": {"version": "v2"}},
        ],
    },
    "networking.istio.io/v1",
)
CANARY = _doc(  # the seeds' VirtualService blog/blog-api-canary, as written
    "VirtualService",
    "blog-api-canary",
    {
        "hosts": ["blog-api"],
        "http": [
            {
                "match": [{"headers": {"canary": {"exact": "true"}}}],
                "route": [{"destination": {"host": "blog-api", "subset": "v2"}}],
            },
            {
                "route": [
                    {"destination": {"host": "blog-api", "subset": "v1"}, "weight": 90},
                    {"destination": {"host": "blog-api", "subset": "v2"}, "weight": 10},
                ]
            },
        ],
    },
    "networking.istio.io/v1beta1",
)
DENY_ADMIN_DELETE = _doc(
    "AuthorizationPolicy",
    "deny-admin-delete",
    {
        "targetRefs": _to_waypoint(),
        "action": "DENY",
        "rules": [{"to": [{"operation": {"methods": ["DELETE"], "paths": ["/admin*"]}}]}],
    },
    "security.istio.io/v1",
)
RETRIES = _doc(
    "VirtualService",
    "flaky-retries",
    {
        "hosts": ["flaky"],
        "http": [
            {
                "route": [{"destination": {"host": "flaky"}}],
                "retries": {"attempts": FLAKY_FAILS, "retryOn": "5xx"},
            }
        ],
    },
    "networking.istio.io/v1",
)
JWT_AUTHZ = _doc(  # drafts need a token from the issuer; everything else stays open
    "AuthorizationPolicy",
    "drafts-need-jwt",
    {
        "targetRefs": _to_waypoint(),
        "action": "ALLOW",
        "rules": [
            {
                "from": [{"source": {"requestPrincipals": [f"{ISSUER}/*"]}}],
                "to": [{"operation": {"paths": [f"{PROTECTED}*"]}}],
            },
            {"to": [{"operation": {"notPaths": [f"{PROTECTED}*"]}}]},
        ],
    },
    "security.istio.io/v1",
)


# -- JWKS and tokens (ES256, made here: no external issuer) ----------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Issuer:
    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import ec

        self.key = ec.generate_private_key(ec.SECP256R1())
        pub = self.key.public_key().public_numbers()
        self.jwks = json.dumps(
            {
                "keys": [
                    {
                        "kty": "EC",
                        "crv": "P-256",
                        "alg": "ES256",
                        "use": "sig",
                        "kid": "demo",
                        "x": _b64(pub.x.to_bytes(32, "big")),
                        "y": _b64(pub.y.to_bytes(32, "big")),
                    }
                ]
            }
        )

    def token(self, audience: str, subject: str = "alice") -> str:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        now = int(time.time())
        header = {"alg": "ES256", "typ": "JWT", "kid": "demo"}
        claims = {"iss": ISSUER, "sub": subject, "aud": audience, "iat": now, "exp": now + 3600}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        der = self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        return f"{signing_input}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def request_authentication(self) -> dict[str, Any]:
        return _doc(
            "RequestAuthentication",
            "jwt-auth",
            {
                "targetRefs": _to_waypoint(),
                "jwtRules": [{"issuer": ISSUER, "audiences": [AUDIENCE], "jwks": self.jwks}],
            },
            "security.istio.io/v1",
        )


# -- helpers ----------------------------------------------------------------------


class Act:
    def __init__(self, n1: AgentNode, client: Pod, wp_pod: Pod) -> None:
        self.n1, self.client, self.wp_pod = n1, client, wp_pod

    def http(self, *args: str, count: int = 1, vip: str = VIP) -> dict[str, Any]:
        return self.n1.peer(
            self.client,
            ["http", vip, str(PORT), "--count", str(count), "--timeout", "10", *args],
            timeout=120,
        )

    def proxy(self) -> dict[str, Any]:
        (p,) = self.n1.status()["waypoint_proxies"]
        return dict(p)

    def envoy_stats(self) -> dict[str, int]:
        return envoy_stats(self.wp_pod)

    def ready(self) -> bool:
        p = self.proxy()
        if not p["pushed_generation"] or not p["ready"]:
            return False
        types = p["xds"]["types"]
        return all(t["acked"] == t["version"] for t in types.values() if t.get("sent"))

    def outbound_identity(self, vip: str) -> str | None:
        recs = [
            c
            for c in self.n1.connections()
            if c["direction"] == "outbound" and c["dst"] == f"{vip}:{PORT}"
        ]
        return recs[-1]["src_identity"] if recs else None


def _sum(stats: dict[str, int], suffix: str) -> int:
    return sum(v for k, v in stats.items() if k.endswith(suffix))


def _check(name: str, ok: bool, **detail: Any) -> dict[str, Any]:
    return {"check": name, "ok": ok, **detail}


# -- the act ------------------------------------------------------------------------


def envoy_missing() -> str | None:
    try:
        from waypoint.envoy import EnvoyNotInstalled, envoy_binary
    except ImportError as e:
        return f"the waypoint package does not import: {e}"
    try:
        envoy_binary()
    except EnvoyNotInstalled as e:
        return str(e)
    return None


def run(sk_msg: bool) -> dict[str, Any]:
    missing = envoy_missing()
    if missing:
        # `make demo` installs Envoy (the waypoint extra): without it the
        # setup is broken, and a demo that quietly skips half of itself
        # would pass for the wrong reason.
        return {"skipped": missing, "ok": False, "checks": []}
    t0 = time.monotonic()
    issuer = Issuer()
    checks: list[dict[str, Any]] = []
    stats: dict[str, int] = {}
    requests: list[dict[str, Any]] = []
    envoy_pid: int | None = None
    identity: dict[str, Any] = {}
    error: str | None = None
    invs: dict[str, inventory.Inventory] = {}
    with Testbed() as tb:
        cluster = Cluster(tb)
        n1 = AgentNode(tb, "node1", sk_msg=sk_msg, cluster=cluster)
        n2 = AgentNode(tb, "node2", sk_msg=sk_msg, cluster=cluster)
        try:
            client = n1.add_pod("frontend", NS, "frontend", labels={"app": "frontend"})
            wp_pod = n1.add_pod(
                "waypoint-0",
                NS,
                WAYPOINT,
                labels={
                    "istio.io/dataplane-mode": "none",
                    "gateway.networking.k8s.io/gateway-name": WAYPOINT,
                },
            )
            v1 = n2.add_pod(
                "blog-api-v1", NS, "blog-api", labels={"app": "blog-api", "version": "v1"}
            )
            v2 = n2.add_pod(
                "blog-api-v2", NS, "blog-api", labels={"app": "blog-api", "version": "v2"}
            )
            flaky = n2.add_pod("flaky-0", NS, "flaky", labels={"app": "flaky"})
            n1.enroll_namespace(NS)
            for name, vip in (("blog-api", VIP), ("flaky", FLAKY_VIP)):
                cluster.services.append(
                    {
                        "name": name,
                        "namespace": NS,
                        "addresses": [vip],
                        "ports": [{"port": PORT, "targetPort": 8080, "name": "http"}],
                        "selector": {"app": name},
                        "labels": {"app": name, "istio.io/use-waypoint": WAYPOINT},
                    }
                )
            cluster.add_waypoint(WAYPOINT, NS, wp_pod, "node1")
            cluster.policies = [
                SUBSETS,
                CANARY,
                DENY_ADMIN_DELETE,
                RETRIES,
                issuer.request_authentication(),
                JWT_AUTHZ,
            ]
            n2.serve_http(v1, 8080)
            n2.serve_http(v2, 8080)
            n2.serve_http(flaky, 8080, None, "--fail-first", str(FLAKY_FAILS))
            n2.start_agent()
            n1.start_agent()
            act = Act(n1, client, wp_pod)
            until("Envoy ready with every xDS type ACKed", act.ready, WAIT)
            p = act.proxy()
            envoy_pid = p["envoy"]["pid"]
            t_ready = time.monotonic()
            report = p.get("translation_report") or []
            checks.append(
                _check(
                    "translation",
                    not report and p["error"] is None,
                    waypoint_identity=p["identity"],
                    envoy_pid=envoy_pid,
                    report=report,
                )
            )
            checks.extend(_canary(act))
            checks.extend(_deny(act, identity))
            checks.append(_retry(act))
            checks.extend(_jwt(act, issuer))
            stats = act.envoy_stats()
            check, requests = _request_metrics(act, stats)
            checks.append(check)
            t_traffic = time.monotonic()
            invs = {"node1": n1.inventory(), "node2": n2.inventory()}
        except Exception as e:  # reported as a failed check, torn down all the same
            error = f"{type(e).__name__}: {e}"
            with contextlib.suppress(Exception):
                error += "\nnode1 agent log:\n" + n1.log_tail(15)
            t_ready = t_traffic = time.monotonic()
        finally:
            for n in (n1, n2):
                n.stop_agent()
                with contextlib.suppress(OSError):
                    n.cleanup()
            pins = {"node1": n1.pin_dir, "node2": n2.pin_dir}
            left = {name: inventory.remaining(inv, pins[name]) for name, inv in invs.items()}
            envoy_gone = envoy_pid is None or _gone(envoy_pid)
            cluster.close()
    t_end = time.monotonic()
    if error:
        checks.append(_check("act ran to the end", False, error=error))
    checks.append(_check("Envoy process gone after teardown", envoy_gone, pid=envoy_pid))
    clean = bool(left) and not any(any(v.values()) for v in left.values())
    checks.append(_check("nothing left in the kernel", clean, left=left))
    return {
        "waypoint": f"{NS}/{WAYPOINT} on node1 (Envoy, configured over xDS by the agent)",
        "identity": identity,
        "checks": checks,
        "istio_requests_total": requests,
        "envoy_http_counters": {
            k: v
            for k, v in sorted(stats.items())
            if k.startswith("http.")
            and not k.startswith("http.admin.")  # Envoy's admin listener, not traffic
            and ".downstream_rq_" in k
        },
        "seconds": {
            "setup_until_envoy_ready": round(t_ready - t0, 1),
            "traffic": round(t_traffic - t_ready, 1),
            "teardown": round(t_end - t_traffic, 1),
            "total": round(t_end - t0, 1),
        },
        "ok": all(c["ok"] for c in checks),
    }


def _gone(pid: int, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists(f"/proc/{pid}"):
            return True
        time.sleep(0.2)
    with contextlib.suppress(OSError):  # do not leave it running: kill, but report
        os.kill(pid, 9)
    return False


_SHOWN = (
    "source_workload",
    "destination_service_name",
    "destination_workload",
    "response_code",
    "response_flags",
)


def _request_metrics(
    act: Act, stats: dict[str, int]
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The agent's istio_requests_total{reporter="waypoint"} (from Envoy's
    access log) against Envoy's own count of the requests on its L7 chains."""
    envoy_total = sum(
        v
        for k, v in stats.items()
        if k.startswith("http.inbound-") and k.endswith(".downstream_rq_total")
    )

    def agent_total() -> float:
        return sum(v for _, v in waypoint_requests(act.n1.metrics()))

    with contextlib.suppress(TimeoutError):  # reported by the check below
        until("the agent counted every request", lambda: agent_total() >= envoy_total, 30)
    series = waypoint_requests(act.n1.metrics())
    total = sum(v for _, v in series)
    rows = sorted(
        ({**{k: lab[k] for k in _SHOWN}, "count": int(v)} for lab, v in series),
        key=lambda r: tuple(str(r[k]) for k in _SHOWN),
    )
    check = _check(
        "istio_requests_total (agent :15020) counts every request Envoy served",
        envoy_total > 0 and total == envoy_total,
        agent=int(total),
        envoy=envoy_total,
    )
    return check, rows


def _canary(act: Act) -> list[dict[str, Any]]:
    r = act.http(count=SPLIT_N)
    b = r.get("bodies", {})
    v1, v2 = b.get("blog-api-v1", 0), b.get("blog-api-v2", 0)
    lo, hi = SPLIT_V2_RANGE
    split = _check(
        f"90/10 split over {SPLIT_N} requests",
        r.get("status") == {"200": SPLIT_N} and v1 + v2 == SPLIT_N and lo <= v2 <= hi,
        v1=v1,
        v2=v2,
        status=r.get("status"),
        tolerance=f"v2 in [{lo}, {hi}]",
    )
    c = act.http("--header", "canary: true", count=CANARY_N)
    canary = _check(
        f"{CANARY_N} requests with canary: true",
        c.get("bodies") == {"blog-api-v2": CANARY_N},
        bodies=c.get("bodies"),
        status=c.get("status"),
    )
    return [split, canary]


def _deny(act: Act, identity: dict[str, Any]) -> list[dict[str, Any]]:
    before = _sum(act.envoy_stats(), ".rbac.denied")
    d = act.http("--method", "DELETE", "--path", "/admin/x")
    denied_by = act.outbound_identity(VIP)
    rbac_denied = _sum(act.envoy_stats(), ".rbac.denied") - before
    g = act.http("--path", "/")
    identity["client"] = denied_by
    return [
        _check(
            "DELETE /admin/x denied",
            d.get("status") == {"403": 1} and rbac_denied == 1 and bool(denied_by),
            status=d.get("status"),
            identity=denied_by,
            envoy_rbac_denied=rbac_denied,
        ),
        _check("GET / allowed", g.get("status") == {"200": 1}, status=g.get("status")),
    ]


def _retry(act: Act) -> dict[str, Any]:
    stat = f"cluster.outbound|{PORT}||{FLAKY_HOST}.upstream_rq_retry"
    before = act.envoy_stats().get(stat, 0)
    r = act.http(vip=FLAKY_VIP)
    retries = act.envoy_stats().get(stat, 0) - before
    return _check(
        f"flaky backend (first {FLAKY_FAILS} answers 503), retries attempts {FLAKY_FAILS}",
        r.get("status") == {"200": 1} and retries == FLAKY_FAILS,
        status=r.get("status"),
        envoy_retries=retries,
    )


def _jwt(act: Act, issuer: Issuer) -> list[dict[str, Any]]:
    """Who answers matters: a missing token is the RBAC's 403 (no request
    principal); a token for another audience is jwt_authn's own 403 (Envoy
    answers 403, not 401, for an audience not allowed: envoyproxy/envoy#7646);
    a token with a bad signature is jwt_authn's 401."""
    cases = [
        ("valid token", issuer.token(AUDIENCE), "200", None),
        ("no token", None, "403", ".rbac.denied"),
        ("token for another audience", issuer.token("billing"), "403", ".jwt_authn.denied"),
        ("token signed by another key", Issuer().token(AUDIENCE), "401", ".jwt_authn.denied"),
    ]
    out = []
    for name, token, want, by in cases:
        args = ["--path", f"{PROTECTED}/1"]
        if token:
            args += ["--header", f"authorization: Bearer {token}"]
        before = act.envoy_stats()
        r = act.http(*args)
        after = act.envoy_stats()
        counted = {
            s.lstrip("."): _sum(after, s) - _sum(before, s)
            for s in (".rbac.denied", ".jwt_authn.denied")
        }
        ok = r.get("status") == {want: 1} and all(
            n == (1 if by and by.lstrip(".") == s else 0) for s, n in counted.items()
        )
        out.append(
            _check(
                f"GET {PROTECTED}/1, {name}",
                ok,
                status=r.get("status"),
                want=want,
                envoy_denied_by=[s for s, n in counted.items() if n] or None,
            )
        )
    return out


def print_report(r: dict[str, Any]) -> None:
    print("\nL7 act: a real Envoy waypoint in front of blog/blog-api (the seeds' canary)")
    if r.get("skipped"):
        print(f"  NOT RUN (fails the demo): {r['skipped']}")
        return
    print(f"  waypoint {r['waypoint']}")
    for c in r["checks"]:
        mark = "ok" if c["ok"] else "FAILED"
        detail = {k: v for k, v in c.items() if k not in ("check", "ok")}
        print(f"  {c['check']:62} {mark}")
        if detail:
            print("      " + ", ".join(f"{k}={_fmt(v)}" for k, v in detail.items()))
    print(
        '\n  istio_requests_total{reporter="waypoint"} on the agent\'s :15020/metrics'
        " (from Envoy's access log):"
    )
    for row in r.get("istio_requests_total", []):
        print(
            f"    {row['source_workload']} -> {row['destination_service_name']}"
            f" ({row['destination_workload']}) {row['response_code']}"
            f" flags={row['response_flags']}: {row['count']}"
        )
    print("\n  Envoy's own HTTP counters (waypoint admin /stats):")
    for k, v in r["envoy_http_counters"].items():
        print(f"    {k} = {v}")
    s = r["seconds"]
    print(
        f"\n  L7 act took {s['total']}s: {s['setup_until_envoy_ready']}s until Envoy ready, "
        f"{s['traffic']}s traffic, {s['teardown']}s teardown"
    )


def _fmt(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v, default=str)
