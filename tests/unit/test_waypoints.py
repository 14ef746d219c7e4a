"""agent/waypoints.py without Envoy: which waypoints a node runs, and a
missing Envoy reported in the status while the agent carries on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from agent.identity.spiffe import SpiffeId
from agent.model import Snapshot
from agent.model.waypoint import Waypoint
from agent.state.state import StateView, build_view
from agent.waypoints import Waypoints, local_waypoints

MINE = Waypoint("wp", "shop", ("10.1.0.9",), "n1", "wp-sa", netns="/proc/self/ns/net")
ELSEWHERE = Waypoint("wp2", "shop", ("10.1.0.10",), "n2", netns="/proc/self/ns/net")
NO_NETNS = Waypoint("wp3", "shop", ("10.1.0.11",), "n1")


def view(*wps: Waypoint) -> StateView:
    return build_view(Snapshot("n1", {}, (), (), (), wps), "cluster.local", None, 1)


def test_only_this_nodes_waypoints_with_a_netns_are_run() -> None:
    v = view(MINE, ELSEWHERE, NO_NETNS)
    assert local_waypoints(v) == [MINE]
    ws = Waypoints("/nonexistent", "cluster.local", None)
    assert list(ws.identities(v)) == [SpiffeId("cluster.local", "shop", "wp-sa")]


def test_missing_envoy_is_an_error_in_the_status_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TETHER_ENVOY", str(tmp_path / "no-envoy"))

    async def run() -> list[dict[str, object]]:
        ws = Waypoints(str(tmp_path), "cluster.local", None)
        ws.reconcile(view(MINE))
        deadline = asyncio.get_running_loop().time() + 10
        while not ws.describe()[0]["error"]:
            assert asyncio.get_running_loop().time() < deadline, ws.describe()
            await asyncio.sleep(0.01)
        status = ws.describe()
        ws.reconcile(view())  # the waypoint is gone: its proxy is closed
        assert ws.describe() == []
        await ws.close()
        return status

    (st,) = asyncio.run(run())
    assert st["name"] == "shop/wp" and st["ready"] is False
    assert "TETHER_ENVOY" in str(st["error"]) and "envoy" not in st, st


def test_envoy_in_pod_needs_no_local_envoy_and_nacks_reach_the_hook(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kubernetes: the pod runs Envoy; the agent does not look for a binary
    (it serves xDS only), and a NACK is handed to ``on_nack`` (an Event)."""
    import dataclasses

    monkeypatch.setenv("TETHER_ENVOY", str(tmp_path / "no-envoy"))
    in_pod = dataclasses.replace(MINE, envoy_in_pod=True)
    got: list[tuple[str, str]] = []

    async def run() -> dict[str, object]:
        ws = Waypoints(str(tmp_path), "cluster.local", None)
        ws.on_nack = lambda wp, msg: got.append((wp.key, msg))
        ws.reconcile(view(in_pod))
        deadline = asyncio.get_running_loop().time() + 10
        while not ws.describe()[0]["error"]:
            assert asyncio.get_running_loop().time() < deadline, ws.describe()
            await asyncio.sleep(0.01)
        (st,) = ws.describe()
        ws.proxies["shop/wp"]._on_nack(
            "waypoint~shop~wp", "type.googleapis.com/envoy.config.listener.v3.Listener", "7", "bad"
        )
        await ws.close()
        return st

    st = asyncio.run(run())
    assert st["envoy_in_pod"] is True
    assert "TETHER_ENVOY" not in str(st["error"]) and "certificates" in str(st["error"]), st
    assert got == [("shop/wp", "Envoy rejected Listener version 7: bad")]
