"""The tunnel's L4 decision cache (agent/tunnel/context.py authorize): the
same answers as evaluating every time, and a new StateView (a policy change,
a new generation) is never answered from the old one's decisions."""

from __future__ import annotations

import dataclasses
import sys
import threading
from typing import Any

from agent.identity.spiffe import SpiffeId
from agent.model import Snapshot, Workload
from agent.policy import Conn
from agent.state.state import ProxyState
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
    assert len(view.authz_cache) == len(cases)

    state.apply(_state([f"{TD}/ns/shop/sa/other"]))  # the policy flips: a new generation
    new = state.view
    assert new.generation > view.generation
    pod2 = dataclasses.replace(pod, workload=new.by_key["shop/db"])
    assert not authorize(new, pod2, "10.1.0.2", WEB, ("10.1.0.3", 5432)).allowed
    assert authorize(new, pod2, "10.1.0.2", OTHER, ("10.1.0.3", 5432)).allowed
    # a PodRef still holding the old workload record is evaluated, not served stale
    assert not authorize(new, pod, "10.1.0.2", WEB, ("10.1.0.3", 5432)).allowed


def test_a_decision_made_with_an_old_view_never_answers_for_a_new_one() -> None:
    """A loop still holding the old view (another thread, agent.tunnelLoops)
    decides after the new view is in force: its decision stays with the old
    view.  With one module-wide cache it would have been cached where the new
    view's lookups find it (fail-open when the new policy denies)."""
    state = ProxyState("n1", TD)
    state.apply(_state([f"{TD}/ns/shop/sa/web"]))
    old = state.view
    state.apply(_state([f"{TD}/ns/shop/sa/other"]))
    new = state.view
    old_pod = PodRef("shop/db", "/proc/1/ns/net", DB.addresses, old.by_key["shop/db"], None)
    new_pod = dataclasses.replace(old_pod, workload=new.by_key["shop/db"])
    assert not authorize(new, new_pod, "10.1.0.2", WEB, ("10.1.0.3", 5432)).allowed
    assert authorize(old, old_pod, "10.1.0.2", WEB, ("10.1.0.3", 5432)).allowed  # late, old view
    assert not authorize(new, new_pod, "10.1.0.2", WEB, ("10.1.0.3", 5432)).allowed
    assert all(v[1].allowed is False for v in new.authz_cache.values())
    assert dataclasses.replace(new).authz_cache == {}  # a copied view starts empty


def test_threads_deciding_with_flipping_views_always_get_their_views_answer() -> None:
    state = ProxyState("n1", TD)
    views = []
    for who in ("web", "other", "web", "other"):
        state.apply(_state([f"{TD}/ns/shop/sa/{who}"]))
        views.append(state.view)
    wrong: list[str] = []

    def decide(offset: int) -> None:
        for i in range(4000):
            view = views[(i + offset) % len(views)]
            pod = PodRef("shop/db", "/proc/1/ns/net", DB.addresses, view.by_key["shop/db"], None)
            for ident in (WEB, OTHER):
                got = authorize(view, pod, "10.1.0.2", ident, ("10.1.0.3", 5432))
                want = view.policies.evaluate(
                    Conn.make("10.1.0.2", ident, "10.1.0.3", 5432, pod.workload)
                )
                if got != want:
                    wrong.append(f"view {view.generation} {ident.uri}")

    threads = [threading.Thread(target=decide, args=(k,)) for k in range(3)]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as CPython will
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert wrong == []
