"""netns tier: Istio security policy enforced at the destination, end to end.

Real pod processes connect through the real capture (HBONE between enrolled
pods, plaintext from the non-enrolled "legacy" namespace); every verdict is
read twice: what the client got, and the destination agent's record
(response_flag DENY and why).  Policies go in through the local file and take
effect on the agents' reload, as a user's edit would.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.sim.harness import AgentNode, Cluster, cluster_nodes
from agent.sim.topology import Pod, Testbed

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="netns tier needs root")

SEED_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "seed-yaml"
RELOAD_TIMEOUT = 10.0
RECORD_TIMEOUT = 8.0


@dataclass
class Mesh:
    tb: Testbed
    cluster: Cluster
    n1: AgentNode
    n2: AgentNode
    pods: dict[str, Pod]
    node_of: dict[str, AgentNode]

    def __getitem__(self, name: str) -> Pod:
        return self.pods[name]


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    """node1: a (shop/sa-a), o1 (other/sa-o1), l1 (legacy, not enrolled);
    node2: b (shop/sa-b), o2 (other/sa-o2), w (blog/sa-blog), l2 (legacy)."""
    with cluster_nodes("node1", "node2") as (cluster, (n1, n2)):
        pods: dict[str, Pod] = {}
        node_of: dict[str, AgentNode] = {}
        for node, name, ns, sa in [
            (n1, "a", "shop", "sa-a"),
            (n1, "o1", "other", "sa-o1"),
            (n1, "l1", "legacy", "sa-l1"),
            (n2, "b", "shop", "sa-b"),
            (n2, "o2", "other", "sa-o2"),
            (n2, "w", "blog", "sa-blog"),
            (n2, "l2", "legacy", "sa-l2"),
        ]:
            pods[name] = node.add_pod(name, ns, sa, labels={"app": name})
            node_of[name] = node
        for ns in ("shop", "other", "blog"):
            n1.enroll_namespace(ns)
        for name in ("b", "o2", "w", "l2"):
            n2.serve(pods[name], 8080)
        n2.serve(pods["b"], 8081)
        n1.start_agent()
        n2.start_agent()
        yield Mesh(cluster.tb, cluster, n1, n2, pods, node_of)


@pytest.fixture(autouse=True)
def _no_policies_after(mesh: Mesh) -> Iterator[None]:
    yield
    if mesh.cluster.policies:
        set_policies(mesh, [])


# -- policies -----------------------------------------------------------------------


def authz(
    name: str,
    ns: str,
    action: str,
    rules: list[dict[str, Any]] | None,
    selector: dict[str, str] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"action": action}
    if rules is not None:
        spec["rules"] = rules
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": ns},
        "spec": spec,
    }


def peer_auth(ns: str, mode: str, name: str = "default") -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication",
        "metadata": {"name": name, "namespace": ns},
        "spec": {"mtls": {"mode": mode}},
    }


def _doc_key(d: dict[str, Any]) -> str:
    return f"{d['metadata']['namespace']}/{d['metadata']['name']}"


def _modes(docs: list[dict[str, Any]]) -> dict[str, str]:
    """What /config_dump shows for the docs: AuthorizationPolicy key -> action,
    PeerAuthentication key -> mode (prefixed, so the two kinds never collide)."""
    out = {}
    for d in docs:
        spec = d.get("spec") or {}
        if d.get("kind") == "AuthorizationPolicy":
            out[f"AP {_doc_key(d)}"] = spec.get("action", "ALLOW")
        elif d.get("kind") == "PeerAuthentication":
            out[f"PA {_doc_key(d)}"] = (spec.get("mtls") or {}).get("mode", "UNSET")
    return out


def _enforced(n: AgentNode) -> tuple[dict[str, str], set[str]]:
    p = n.status()["policies"]
    got = {f"AP {x['key']}": x["action"] for x in p["authorizationPolicies"]}
    got.update({f"PA {x['key']}": x["mode"] for x in p["peerAuthentications"]})
    return got, set(p["rejected"])


def set_policies(mesh: Mesh, docs: list[dict[str, Any]], rejected: set[str] | None = None) -> None:
    """Write the docs to both nodes' files and wait until both agents enforce
    exactly the valid ones and refuse exactly `rejected` (document labels)."""
    mesh.cluster.policies[:] = docs
    mesh.cluster.write_configs()
    bad = rejected or set()
    want = _modes([d for d in docs if f"{d['kind']} {_doc_key(d)}" not in bad])
    deadline = time.monotonic() + RELOAD_TIMEOUT
    for n in (mesh.n1, mesh.n2):
        while (have := _enforced(n)) != (want, bad):
            assert time.monotonic() < deadline, (have, want, bad, n.log_tail())
            time.sleep(0.2)
    # the file is reloaded as a whole: one more poll period makes sure the
    # agents are not between two reloads of an older file
    time.sleep(0.2)


# -- traffic and verdicts ------------------------------------------------------------


def _last_id(node: AgentNode) -> int:
    conns = node.connections()
    return max((c["id"] for c in conns), default=0)


def attempt(
    mesh: Mesh, src: str, dst: str, port: int = 8080
) -> tuple[bool, dict[str, Any], list[dict[str, Any]]]:
    """One connection src -> dst:port from a process in pod src; returns (ok, the
    client's result, the destination agent's new inbound records for it)."""
    s, d = mesh[src], mesh[dst]
    dn = mesh.node_of[dst]
    before = _last_id(dn)
    r = mesh.node_of[src].connect(s, d, port=port, nbytes=4096)
    deadline = time.monotonic() + RECORD_TIMEOUT
    while True:
        recs = [
            c
            for c in dn.status()["connections"]["closed"]
            if c["id"] > before
            and c["direction"] == "inbound"
            and c["dst"] == f"{d.ip4}:{port}"
            and c["src"].startswith(f"{s.ip4}:")
        ]
        if recs or time.monotonic() > deadline:
            return bool(r["ok"]), r, recs
        time.sleep(0.1)


def allowed(mesh: Mesh, src: str, dst: str, port: int = 8080) -> None:
    ok, r, recs = attempt(mesh, src, dst, port)
    assert ok, (f"{src} -> {dst}:{port} should be allowed", r, recs, mesh.node_of[dst].log_tail(5))
    assert recs and recs[-1]["response_flag"] == "-", recs
    assert r["server_saw_peer"][0] == mesh[src].ip4


def denied(mesh: Mesh, src: str, dst: str, port: int = 8080, why: str = "") -> dict[str, Any]:
    ok, r, recs = attempt(mesh, src, dst, port)
    assert not ok, (f"{src} -> {dst}:{port} should be denied", r, recs)
    assert r["server_saw_peer"] is None, "the app must never see a denied connection"
    assert "reset" in r["error"].lower() or "closed" in r["error"].lower(), r
    assert recs, f"no destination record for {src} -> {dst}:{port}"
    rec = recs[-1]
    assert rec["response_flag"] == "DENY", rec
    assert why in (rec["error"] or ""), rec
    assert rec["delivered_as"] is None
    return rec


def source_flag(mesh: Mesh, src: str, dst: str, port: int = 8080) -> str:
    """The source agent's outbound record for the last src -> dst:port."""
    n = mesh.node_of[src]
    recs = [
        c
        for c in n.connections()
        if c["direction"] == "outbound"
        and c["pod"] == f"{mesh[src].namespace}/{src}"
        and c["dst"] == f"{mesh[dst].ip4}:{port}"
    ]
    return str(max(recs, key=lambda c: c["id"])["response_flag"]) if recs else "<none>"


# -- cases --------------------------------------------------------------------------


def test_no_policy_allows_everything(mesh: Mesh) -> None:
    for src in ("a", "o1", "l1"):
        allowed(mesh, src, "b")
    allowed(mesh, "a", "b", 8081)
    allowed(mesh, "a", "w")
    ok, _, recs = attempt(mesh, "a", "b")
    assert ok and recs[-1]["security"] == "mutual_tls" and recs[-1]["path"] == "hbone"
    ok, _, recs = attempt(mesh, "l1", "b")
    assert ok and recs[-1]["path"] == "plaintext" and recs[-1]["src_identity"] is None


def test_allow_by_principal(mesh: Mesh) -> None:
    set_policies(
        mesh,
        [
            authz(
                "allow-a",
                "shop",
                "ALLOW",
                [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/sa-a"]}}]}],
            )
        ],
    )
    allowed(mesh, "a", "b")
    allowed(mesh, "a", "b", 8081)
    rec = denied(mesh, "o1", "b", why="no ALLOW policy matched")
    assert rec["src_identity"] == "spiffe://cluster.local/ns/other/sa/sa-o1"
    assert source_flag(mesh, "o1", "b") == "DENY", "the source records the 401 as DENY"
    denied(mesh, "l1", "b", why="no ALLOW policy matched")  # plaintext has no principal
    allowed(mesh, "o1", "o2")  # a shop policy does not apply in other
    allowed(mesh, "l1", "o2")


def test_deny_by_namespace(mesh: Mesh) -> None:
    set_policies(
        mesh,
        [authz("deny-other", "shop", "DENY", [{"from": [{"source": {"namespaces": ["other"]}}]}])],
    )
    denied(mesh, "o1", "b", why="shop/deny-other")
    allowed(mesh, "a", "b")
    allowed(mesh, "l1", "b")  # plaintext has no namespace: a positive match never matches


def test_deny_by_not_namespace_catches_plaintext(mesh: Mesh) -> None:
    set_policies(
        mesh,
        [
            authz(
                "deny-foreign",
                "shop",
                "DENY",
                [{"from": [{"source": {"notNamespaces": ["shop"]}}]}],
            )
        ],
    )
    allowed(mesh, "a", "b")
    denied(mesh, "o1", "b", why="shop/deny-foreign")
    denied(mesh, "l1", "b", why="shop/deny-foreign")  # a negative match always does


def test_deny_by_port(mesh: Mesh) -> None:
    set_policies(
        mesh, [authz("deny-8081", "shop", "DENY", [{"to": [{"operation": {"ports": ["8081"]}}]}])]
    )
    allowed(mesh, "a", "b", 8080)
    denied(mesh, "a", "b", 8081, why="shop/deny-8081")
    denied(mesh, "l1", "b", 8081, why="shop/deny-8081")
    allowed(mesh, "l1", "b", 8080)


def test_ip_blocks(mesh: Mesh) -> None:
    a, l1 = mesh["a"], mesh["l1"]
    set_policies(
        mesh,
        [
            authz(
                "allow-a-ip",
                "shop",
                "ALLOW",
                [{"from": [{"source": {"ipBlocks": [f"{a.ip4}/32", f"{l1.ip4}"]}}]}],
            )
        ],
    )
    allowed(mesh, "a", "b")
    allowed(mesh, "l1", "b")  # ipBlocks match plaintext peers too
    denied(mesh, "o1", "b", why="no ALLOW policy matched")
    set_policies(
        mesh,
        [
            authz(
                "deny-node1-cidr",
                "shop",
                "DENY",
                [
                    {
                        "from": [
                            {"source": {"ipBlocks": ["10.10.1.0/24"], "notIpBlocks": [f"{a.ip4}"]}}
                        ]
                    }
                ],
            )
        ],
    )
    allowed(mesh, "a", "b")
    denied(mesh, "o1", "b", why="shop/deny-node1-cidr")
    denied(mesh, "l1", "b", why="shop/deny-node1-cidr")


def test_selector_scopes_a_policy_to_matching_workloads(mesh: Mesh) -> None:
    set_policies(
        mesh,
        [
            authz(
                "deny-all-to-o2",
                "other",
                "DENY",
                [{"from": [{"source": {"ipBlocks": ["0.0.0.0/0"]}}]}],
                selector={"app": "o2"},
            )
        ],
    )
    denied(mesh, "a", "o2", why="other/deny-all-to-o2")
    allowed(mesh, "a", "b")


def test_peer_authentication_strict_and_permissive(mesh: Mesh) -> None:
    set_policies(mesh, [peer_auth("shop", "STRICT")])
    rec = denied(mesh, "l1", "b", why="PeerAuthentication STRICT")
    assert rec["path"] == "plaintext"
    denied(mesh, "l2", "b", why="PeerAuthentication STRICT")  # same node, still plaintext
    allowed(mesh, "a", "b")  # mTLS
    allowed(mesh, "o1", "b")
    allowed(mesh, "l1", "o2")  # other has no PeerAuthentication: PERMISSIVE
    dump = mesh.n2.status()["policies"]["peerAuthentications"]
    assert [(p["key"], p["mode"], p["level"]) for p in dump] == [
        ("shop/default", "STRICT", "namespace")
    ]

    set_policies(mesh, [peer_auth("shop", "PERMISSIVE")])
    allowed(mesh, "l1", "b")
    allowed(mesh, "a", "b")

    # mesh-wide STRICT from the root namespace, overridden by shop PERMISSIVE
    set_policies(mesh, [peer_auth("istio-system", "STRICT"), peer_auth("shop", "PERMISSIVE")])
    allowed(mesh, "l1", "b")
    denied(mesh, "l1", "o2", why="PeerAuthentication STRICT")


def _seed(pattern: str) -> list[dict[str, Any]]:
    if not SEED_DIR.is_dir():
        pytest.skip(f"seed fixtures not present at {SEED_DIR}")
    files = sorted(SEED_DIR.glob(pattern))
    if not files:
        pytest.skip(f"no seed file {pattern} in {SEED_DIR}")
    docs: list[dict[str, Any]] = []
    for f in files:
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d is not None]
    return docs


def test_seed_deny_all_denies_everything_to_blog(mesh: Mesh) -> None:
    docs = _seed("AuthorizationPolicy-deny-all-*.yaml")
    assert [(d["metadata"]["namespace"], d["metadata"]["name"]) for d in docs] == [
        ("blog", "deny-all")
    ]
    assert docs[0].get("spec") is None, "the seed's spec is empty: an ALLOW with no rules"
    set_policies(mesh, docs)
    for src in ("a", "o1", "o2", "l1", "l2"):
        denied(mesh, src, "w", why="no ALLOW policy matched")
    assert source_flag(mesh, "a", "w") == "DENY"
    allowed(mesh, "a", "b")  # other namespaces are untouched
    allowed(mesh, "l1", "o2")
    dump = mesh.n2.status()["policies"]["authorizationPolicies"]
    assert [(p["key"], p["action"], p["rules"]) for p in dump] == [("blog/deny-all", "ALLOW", [])]


def test_seed_peer_authentication_default_strict(mesh: Mesh) -> None:
    docs = _seed("PeerAuthentication-default-*.yaml")
    by_ns = {d["metadata"]["namespace"]: d for d in docs}
    assert by_ns.get("blog", {}).get("spec", {}).get("mtls", {}).get("mode") == "STRICT"
    set_policies(mesh, docs)
    denied(mesh, "l1", "w", why="PeerAuthentication STRICT")
    denied(mesh, "l2", "w", why="PeerAuthentication STRICT")
    allowed(mesh, "a", "w")  # mTLS is fine
    allowed(mesh, "o2", "w")  # same node: the in-process path, same policy
    allowed(mesh, "l1", "b")  # shop is not STRICT (production's policy has no pods here)
    keys = {p["key"] for p in mesh.n2.status()["policies"]["peerAuthentications"]}
    assert keys == {f"{d['metadata']['namespace']}/default" for d in docs}


def test_seed_deny_all_and_strict_together(mesh: Mesh) -> None:
    docs = _seed("AuthorizationPolicy-deny-all-*.yaml") + [
        d
        for d in _seed("PeerAuthentication-default-*.yaml")
        if d["metadata"]["namespace"] == "blog"
    ]
    set_policies(mesh, docs)
    denied(mesh, "l1", "w", why="PeerAuthentication STRICT")  # refused before authz
    denied(mesh, "a", "w", why="no ALLOW policy matched")


def test_config_dump_lists_policies(mesh: Mesh) -> None:
    docs = [
        authz(
            "allow-a",
            "shop",
            "ALLOW",
            [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/sa-a"]}}]}],
        ),
        authz("deny-8081", "shop", "DENY", [{"to": [{"operation": {"ports": ["8081"]}}]}]),
        peer_auth("shop", "STRICT"),
    ]
    set_policies(mesh, docs)
    for n in (mesh.n1, mesh.n2):
        p = n.status()["policies"]
        got = {x["key"]: x for x in p["authorizationPolicies"]}
        assert set(got) == {"shop/allow-a", "shop/deny-8081"}
        assert got["shop/allow-a"]["action"] == "ALLOW"
        assert got["shop/deny-8081"]["action"] == "DENY"
        assert got["shop/allow-a"]["namespace"] == "shop"
        assert p["rejected"] == {}
        assert [x["key"] for x in p["peerAuthentications"]] == ["shop/default"]


def test_invalid_policy_is_reported_and_its_reach_fails_closed(mesh: Mesh) -> None:
    """A new DENY that cannot be read: the others stay in force, and what the
    broken one could reach (no selector: its namespace) is denied until it is
    fixed or deleted (agent/policy/load.py says why); before, it was simply
    dropped, so a DENY with a typo denied nothing."""
    good = authz("deny-8081", "shop", "DENY", [{"to": [{"operation": {"ports": ["8081"]}}]}])
    bad = authz(
        "bad-ip", "shop", "DENY", [{"from": [{"source": {"ipBlocks": ["10.10.1.300/24"]}}]}]
    )
    set_policies(mesh, [good, bad], rejected={"AuthorizationPolicy shop/bad-ip"})
    for n in (mesh.n1, mesh.n2):
        p = n.status()["policies"]
        errs = p["rejected"]["AuthorizationPolicy shop/bad-ip"]
        assert any("ipBlocks[0]" in e and "10.10.1.300/24" in e for e in errs), errs
        assert [x["key"] for x in p["authorizationPolicies"]] == ["shop/deny-8081"]
        assert [g["key"] for g in p["failClosed"]] == ["shop/bad-ip"], p["failClosed"]
    assert "policy not applied" in mesh.n2.log_tail(200)
    assert "bad-ip" in mesh.n2.log_tail(200)
    denied(mesh, "a", "b", 8080, why="shop/bad-ip")  # its reach: namespace shop
    denied(mesh, "l1", "b", 8080, why="shop/bad-ip")
    set_policies(mesh, [good])  # deleting the broken document lifts the deny-all
    denied(mesh, "a", "b", 8081, why="shop/deny-8081")  # the valid one is enforced
    allowed(mesh, "a", "b", 8080)
    allowed(mesh, "l1", "b", 8080)


def test_invalid_update_keeps_the_last_good_version(mesh: Mesh) -> None:
    good = authz("deny-8081", "shop", "DENY", [{"to": [{"operation": {"ports": ["8081"]}}]}])
    set_policies(mesh, [good])
    denied(mesh, "a", "b", 8081, why="shop/deny-8081")
    broken = copy.deepcopy(good)
    broken["spec"]["rules"][0]["from"] = [{"source": {"ipBlocks": ["not-an-ip"]}}]
    mesh.cluster.policies[:] = [broken]
    mesh.cluster.write_configs()
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while "AuthorizationPolicy shop/deny-8081" not in mesh.n2.status()["policies"]["rejected"]:
        assert time.monotonic() < deadline, mesh.n2.log_tail()
        time.sleep(0.2)
    keys = [x["key"] for x in mesh.n2.status()["policies"]["authorizationPolicies"]]
    assert keys == ["shop/deny-8081"], "the last good version must stay in force"
    denied(mesh, "a", "b", 8081, why="shop/deny-8081")
