"""The local file and waypoints: the `waypoints:` list (validated, with
errors naming the field), and every namespace, service and workload that
asks for a waypoint is listed with the waypoint it resolves to (or "no such
waypoint": its traffic goes direct); `none` opts out; a malformed labels
field names itself."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.model import Snapshot, Waypoint
from agent.sources.localfile import MAX_ERROR_CHARS, ConfigError, LocalFileSource, load, parse
from agent.state.state import ProxyState


def _doc(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "node": "n1",
        "namespaces": [
            {
                "name": "shop",
                "labels": {
                    "istio.io/dataplane-mode": "ambient",
                    "istio.io/use-waypoint": "shop-wp",
                },
            },
            {"name": "data", "labels": {"istio.io/use-waypoint": "none"}},
            {"name": "plain"},
        ],
        "workloads": [
            {
                "name": "a",
                "namespace": "data",
                "serviceAccount": "a",
                "node": "n2",
                "addresses": ["10.0.0.1"],
                "labels": {"istio.io/use-waypoint": "a-wp"},
            },
            {
                "name": "b",
                "namespace": "data",
                "serviceAccount": "b",
                "node": "n2",
                "addresses": ["10.0.0.2"],
            },
        ],
        "services": [
            {
                "name": "db",
                "namespace": "data",
                "addresses": ["10.96.0.9"],
                "ports": [{"port": 5432}],
                "selector": {"app": "db"},
                "labels": {"istio.io/use-waypoint": "db-wp"},
            },
        ],
    }
    doc.update(extra)
    return doc


WAYPOINTS = [
    {
        "name": "shop-wp",
        "namespace": "shop",
        "addresses": ["10.0.9.1", "fd00::9:1"],
        "node": "n2",
        "serviceAccount": "shop-wp-sa",
        "for": "all",
        "netns": "/run/netns/wp",
        "cgroup": "/sys/fs/cgroup/wp",
    },
    {"name": "db-wp", "namespace": "data", "addresses": ["10.0.9.2"]},
    {"name": "a-wp", "namespace": "data", "for": "service"},
]


def test_every_scope_that_asks_for_a_waypoint_is_listed_as_what_is_true() -> None:
    """Before: every use was listed as "not applied" (tether ran no waypoint).
    Now each names the waypoint it resolves to, or says there is none."""
    uses = parse(_doc()).snapshot.waypoint_uses()
    assert [(u["scope"], u["name"], u["waypoint"], u["resolved"]) for u in uses] == [
        ("namespace", "shop", "shop-wp", None),
        ("service", "data/db", "db-wp", None),
        ("workload", "data/a", "a-wp", None),
    ]
    assert [u["status"] for u in uses] == [
        "no such waypoint shop/shop-wp: traffic goes direct",
        "no such waypoint data/db-wp: traffic goes direct",
        "no such waypoint data/a-wp: traffic goes direct",
    ]
    uses = parse(_doc(waypoints=WAYPOINTS)).snapshot.waypoint_uses()
    assert [(u["resolved"], u["status"]) for u in uses] == [
        ("shop/shop-wp", "service and workload traffic goes through waypoint shop/shop-wp"),
        ("data/db-wp", "service traffic goes through waypoint data/db-wp"),
        (
            "data/a-wp",
            "waypoint data/a-wp is for service traffic: workload traffic goes direct",
        ),
    ]


def test_waypoint_without_address_is_reported_as_refusing() -> None:
    doc = _doc(waypoints=[{"name": "db-wp", "namespace": "data"}])
    (svc,) = [u for u in parse(doc).snapshot.waypoint_uses() if u["scope"] == "service"]
    assert "has no address yet: refused" in str(svc["status"])


def test_waypoints_are_read_with_every_field() -> None:
    snap = parse(_doc(waypoints=WAYPOINTS)).snapshot
    assert snap.waypoints[0] == Waypoint(
        "shop-wp",
        "shop",
        ("10.0.9.1", "fd00::9:1"),
        "n2",
        "shop-wp-sa",
        "all",
        "/run/netns/wp",
        "/sys/fs/cgroup/wp",
    )
    db = snap.waypoints[1]
    assert (db.node, db.account, db.traffic_for, db.netns) == ("n1", "db-wp", "service", None)
    assert snap.waypoint_named("data", "a-wp") is snap.waypoints[2]
    assert snap.waypoints[2].addresses == ()


@pytest.mark.parametrize(
    "bad,error",
    [
        ({"namespace": "data"}, r"waypoints\[0\]\.name: required string"),
        ({"name": "w"}, r"waypoints\[0\]\.namespace: required string"),
        ({"name": "w", "namespace": "d", "addresses": ["nope"]},
         r"waypoints\[0\]\.addresses: 'nope' is not an IP address"),
        ({"name": "w", "namespace": "d", "addresses": "10.0.0.1"},
         r"waypoints\[0\]\.addresses: expected a list of strings"),
        ({"name": "w", "namespace": "d", "for": "pods"},
         r"waypoints\[0\]\.for: 'pods' is not one of service, workload, all, none"),
        ({"name": "w", "namespace": "d", "port": 15008},
         r"waypoints\[0\]: unknown field\(s\) \['port'\]"),
        ({"name": "w", "namespace": "d", "node": ["n1"]},
         r"waypoints\[0\]\.node: expected a string"),
        ("w", r"waypoints\[0\]: expected a mapping"),
    ],
)  # fmt: skip
def test_bad_waypoints_name_the_field(bad: Any, error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        parse(_doc(waypoints=[bad]))


def test_duplicate_waypoint_and_not_a_list() -> None:
    wp = {"name": "w", "namespace": "d"}
    with pytest.raises(
        ConfigError, match=r"waypoints\[1\]: d/w is already defined by waypoints\[0\]"
    ):
        parse(_doc(waypoints=[wp, dict(wp)]))
    with pytest.raises(ConfigError, match="waypoints: expected a list"):
        parse(_doc(waypoints={"w": wp}))


def test_require_waypoint_setting() -> None:
    assert parse(_doc()).settings.agent.require_waypoint is True
    assert parse(_doc(agent={"requireWaypoint": False})).settings.agent.require_waypoint is False
    with pytest.raises(ConfigError, match=r"agent\.requireWaypoint: expected true or false"):
        parse(_doc(agent={"requireWaypoint": "no"}))


def test_waypoint_access_log_setting() -> None:
    assert parse(_doc()).settings.agent.waypoint_access_log is True
    off = parse(_doc(agent={"waypointAccessLog": False}))
    assert off.settings.agent.waypoint_access_log is False
    with pytest.raises(ConfigError, match=r"agent\.waypointAccessLog: expected true or false"):
        parse(_doc(agent={"waypointAccessLog": 1}))


def test_no_labels_no_waypoints() -> None:
    doc = _doc(namespaces=[{"name": "shop"}], services=[])
    doc["workloads"][0]["labels"] = {}
    assert parse(doc).snapshot.waypoint_uses() == []


def test_bad_service_labels_name_the_field() -> None:
    doc = _doc()
    doc["services"][0]["labels"] = ["istio.io/use-waypoint"]
    with pytest.raises(ConfigError, match=r"services\[0\]\.labels"):
        parse(doc)


# -- the reload path: it never dies, never stalls the loop, never loses an edit


def _write_node_file(d: Path, policy_files: list[str] | None = None) -> Path:
    doc = _doc()
    if policy_files is not None:
        doc["policyFiles"] = policy_files
    p = d / "node.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


DENY = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-%s, namespace: shop}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [legacy]}}]}]}
"""

BAD_FILES: dict[str, bytes] = {
    "deep nesting": b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n",
    "non-utf8": b"apiVersion: v1\nkind: \xff\xfe\x00bad\n",
    "alias bomb": (
        b'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
        + b"".join(
            b"%s: &%s [*%s,*%s,*%s,*%s,*%s,*%s,*%s,*%s,*%s]\n"
            % ((bytes([c]),) * 2 + (bytes([c - 1]),) * 9)
            for c in range(ord("b"), ord("k"))
        )
    ),
    "huge file": b"# " + b"x" * (9 << 20) + b"\n",
    "not yaml": b"key: [unclosed\n  - {\n",
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_every_bad_policy_file_is_reported_and_the_next_good_edit_applies(
    tmp_path: Path, name: str
) -> None:
    """Before: RecursionError/UnicodeDecodeError escaped the watcher (which
    caught only OSError and ConfigError) and reloading stopped for good; an
    alias bomb ran the agent out of memory; a change to a policyFiles file
    was never noticed."""
    pol = tmp_path / "mesh.yaml"
    pol.write_text(DENY % "one")
    path = _write_node_file(tmp_path, ["mesh.yaml"])
    src = LocalFileSource(path, load(path))
    got: list[Snapshot] = []

    async def run() -> None:
        loop = asyncio.get_running_loop()
        pol.write_bytes(BAD_FILES[name])
        assert await src.poll(loop, got.append) is False
        assert src.error is not None and len(src.error) <= MAX_ERROR_CHARS + 200
        assert str(pol) in src.error
        assert not await src.poll(loop, got.append)  # reported once, not retried in a loop
        pol.write_text(DENY % "two")
        os.utime(pol, (time.time() + 5, time.time() + 5))
        assert await src.poll(loop, got.append) is True

    asyncio.run(run())
    assert src.error is None
    assert [d["metadata"]["name"] for d in got[-1].policies] == ["deny-two"]


def test_list_wrapped_document_is_passed_on_and_fails_closed(tmp_path: Path) -> None:
    """Before: dropped with no log line and nothing under `rejected` (a
    wrapped DENY silently stopped denying)."""
    pol = tmp_path / "mesh.yaml"
    pol.write_text("- " + (DENY % "wrapped").replace("\n", "\n  ") + "\n---\n" + DENY % "plain")
    snap = load(_write_node_file(tmp_path, ["mesh.yaml"])).snapshot
    assert (
        isinstance(snap.policies[0], list) and snap.policies[1]["metadata"]["name"] == "deny-plain"
    )
    state = ProxyState("n1")
    state.apply(snap)
    desc = state.view.policies.describe()
    assert any("a list" in k for k in desc["rejected"]), desc["rejected"]
    assert desc["failClosed"], "the wrapped DENY cannot be read: its reach is denied"


def test_compiling_a_huge_policy_does_not_stall_the_loop() -> None:
    """100k principals: compiled on a worker thread (ProxyState.apply off the
    loop), so the loop keeps running callbacks meanwhile; before, the reload
    ran on the loop and stalled every connection for 5-10 s.  Checked by
    counting loop ticks during the compile (no timing bound: a loaded
    machine only makes the compile longer)."""
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "big", "namespace": "shop"},
        "spec": {
            "rules": [
                {
                    "from": [
                        {
                            "source": {
                                "principals": [
                                    f"cluster.local/ns/x/sa/s{i}" for i in range(100_000)
                                ]
                            }
                        }
                    ]
                }
            ]
        },
    }
    state = ProxyState("n1")

    async def run() -> tuple[float, float, int]:
        loop = asyncio.get_running_loop()
        worst, ticks, done = 0.0, 0, False

        async def tick() -> None:
            nonlocal worst, ticks
            last = loop.time()
            while not done:
                await asyncio.sleep(0.01)
                now = loop.time()
                worst, ticks, last = max(worst, now - last), ticks + 1, now

        ticker = loop.create_task(tick())
        await asyncio.sleep(0)
        t0 = loop.time()
        await loop.run_in_executor(None, state.apply, Snapshot("n1", policies=(doc,)))
        took, during = loop.time() - t0, ticks
        done = True
        await ticker
        return took, worst, during

    took, worst, during = asyncio.run(run())
    assert state.view.policies.describe()["authorizationPolicies"][0]["name"] == "big"
    print(f"compile {took:.2f}s, {during} loop ticks meanwhile, worst gap {worst * 1000:.0f} ms")
    assert during >= 3, (took, worst, during)
