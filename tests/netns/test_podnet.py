"""The delivery routing a pod's netns gets at enrollment, installed and
removed by the podnet worker process (agent/datapath/podnet.py) in a netns
this test creates, and checked with iproute2 and procfs, not with podnet."""

from __future__ import annotations

import asyncio
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import netns
from agent.datapath import podnet
from agent.sim.topology import random_prefix

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="netns tier needs root")


@pytest.fixture
def pod_netns() -> Iterator[tuple[str, Path]]:
    name = f"{random_prefix('tp')}-pod"
    path = netns.create_netns(name)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)  # as in a pod
        yield name, path
    finally:
        netns.delete_netns(name)


def _ip(name: str, *args: str) -> str:
    """iproute2's output ("" where it fails: `route show table N` of a
    table that does not exist yet)."""
    return subprocess.run(["ip", "-n", name, *args], capture_output=True, text=True).stdout


def _sysctls(path: Path) -> list[str]:
    with netns.entered(path):
        return [Path(k).read_text().strip() for k in podnet.SYSCTLS]


def _routing(name: str, path: Path) -> tuple[bool, bool, list[str]]:
    mark = f"fwmark {podnet.DELIVERY_MARK:#x} lookup {podnet.DELIVERY_TABLE}"
    rules = all(mark in _ip(name, "-f", fam, "rule") for fam in ("inet", "inet6"))
    table = str(podnet.DELIVERY_TABLE)
    routes = all(
        "local default dev lo" in _ip(name, "-f", fam, "route", "show", "table", table)
        for fam in ("inet", "inet6")
    )
    return rules, routes, _sysctls(path)


def test_worker_installs_and_removes_the_delivery_routing(pod_netns: tuple[str, Path]) -> None:
    name, path = pod_netns
    assert _routing(name, path) == (False, False, ["0", "0", "0"])

    async def main() -> None:
        w = podnet.Worker()
        try:
            await w.call("prepare", str(path))
            assert _routing(name, path) == (True, True, ["1", "1", "1"])
            await w.call("prepare", str(path))  # idempotent: a restarted agent
            assert _ip(name, "-f", "inet", "rule").count("fwmark") == 1
            assert await w.call("installed", str(path))
            await w.call("unprepare", str(path))
            assert _routing(name, path) == (False, False, ["0", "0", "0"])
            assert not await w.call("installed", str(path))
            assert w.started == 1
        finally:
            await w.aclose()

    asyncio.run(main())


def test_one_shot_form_for_callers_off_the_loop(pod_netns: tuple[str, Path]) -> None:
    name, path = pod_netns
    podnet.run_once("prepare", str(path))
    assert podnet.run_once("installed", str(path))
    assert _routing(name, path)[:2] == (True, True)
    podnet.run_once("unprepare", str(path))
    assert not podnet.run_once("installed", str(path))
