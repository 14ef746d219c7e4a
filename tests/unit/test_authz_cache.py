"""The tunnel's L4 decision cache (agent/tunnel/context.py authorize): the
same answers as evaluating every time, and a new StateView (a policy change,
a new generation) is never answered from the old one's decisions."""

from __future__ import annotations

import dataclasses
from typing import Any

from agent.identity.spiffe import SpiffeId
from agent.model import Snapshot, Workload
from agent.policy import Conn
from agent.state.state import ProxyState
from agent.tunnel import context
from agent.tunnel.context import PodRef, authorize

TD = "cluster.local"
DB = Workload("db", "shop", "db", "n1", ("10.1.0.3",), {"app": "db"})
WEB = SpiffeId.parse(f"spiffe://{TD}/ns/shop/sa/web")
OTHER = SpiffeId.parse(f"spiffe://{TD}/ns/shop/sa/other")


def _policy(principals: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "db-allow", "namespace": "shop"},
        "spec": {
            "selector": {"matchLabels": {"app": "db"}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": principals}}]}],
        },
    }


def _state(principals: list[str]) -> Snapshot:
    return Snapshot(
        "n1", {"shop": {"istio.io/dataplane-mode": "ambient"}}, (DB,), (), (_policy(principals),)
    )


def test_cached_decisions_equal_fresh_ones_and_a_new_view_starts_over() -> None:
    state = ProxyState("n1", TD)
    state.apply(_state([f"{TD}/ns/shop/sa/web"]))
    view = state.view
    pod = PodRef("shop/db", "/proc/1/ns/net", DB.addresses, view.by_key["shop/db"], None)
    assert pod.workload is not None
    cases = [(WEB, "10.1.0.2"), (OTHER, "10.1.0.2"), (None, "10.1.0.9"), (WEB, "10.1.0.7")]
    for _ in range(3):  # the second and third pass come from the cache
        for ident, src in cases:
            got = authorize(view, pod, src, ident, ("10.1.0.3", 5432))
            fresh = view.policies.evaluate(Conn.make(src, ident, "10.1.0.3", 5432, pod.workload))
            assert got == fresh
    assert authorize(view, pod, "10.1.0.2", WEB, ("10.1.0.3", 5432)).allowed
    assert not authorize(view, pod, "10.1.0.2", OTHER, ("10.1.0.3", 5432)).allowed
    assert len(context._authz) == len(cases)

    state.apply(_state([f"{TD}/ns/shop/sa/other"]))  # the policy flips: a new generation
    new = state.view
    assert new.generation > view.generation
    pod2 = dataclasses.replace(pod, workload=new.by_key["shop/db"])
    assert not authorize(new, pod2, "10.1.0.2", WEB, ("10.1.0.3", 5432)).allowed
    assert authorize(new, pod2, "10.1.0.2", OTHER, ("10.1.0.3", 5432)).allowed
    # a PodRef still holding the old workload record is evaluated, not served stale
    assert not authorize(new, pod, "10.1.0.2", WEB, ("10.1.0.3", 5432)).allowed
