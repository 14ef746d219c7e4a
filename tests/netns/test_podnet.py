"""netns tier: the per-pod delivery routing, written by a short-lived worker.

pyroute2 runs in a child process (agent/datapath/podnet.py) so that the agent
does not keep its ~11 MiB resident; these tests check the kernel state the
worker leaves, that the calling process never imports pyroute2, that a
netlink error reaches the caller as OSError, and that the worker goes away
when idle.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.sim.topology import Testbed

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="netns tier needs root")

_CHECK = textwrap.dedent(
    """
    import json, os, sys, time
    os.environ["TETHER_PODNET_IDLE"] = "0.5"
    from agent.datapath import podnet
    ns, missing = sys.argv[1], sys.argv[2]
    out = {"before": podnet.installed(ns)}
    podnet.prepare(ns)
    podnet.prepare(ns)  # idempotent
    out["after_prepare"] = podnet.installed(ns)
    worker = podnet._WORKER._proc
    out["worker_pid"] = worker.pid if worker else None
    podnet.unprepare(ns)
    podnet.unprepare(ns)  # absent pieces are fine
    out["after_unprepare"] = podnet.installed(ns)
    try:
        podnet.prepare(missing)
        out["missing"] = "no error"
    except OSError as e:
        out["missing"] = f"OSError {e.errno}: {e.strerror}"
    out["pyroute2_here"] = "pyroute2" in sys.modules
    for _ in range(50):  # bounded: the idle close comes after 0.5 s
        if podnet._WORKER._proc is None:
            break
        time.sleep(0.1)
    out["worker_after_idle"] = podnet._WORKER._proc is not None
    out["worker_reaped"] = not os.path.exists(f"/proc/{out['worker_pid']}")
    print(json.dumps(out))
    """
)


@pytest.fixture
def pod_netns() -> Iterator[Path]:
    with Testbed() as tb:
        tb.add_node("node1")
        pod = tb.nodes["node1"].add_pod("p", "ns", "sa")
        yield pod.netns_path


def test_worker_installs_and_removes_the_rules_and_the_agent_never_imports_pyroute2(
    pod_netns: Path, tmp_path: Path
) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _CHECK, str(pod_netns), str(tmp_path / "no-such-netns")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["before"] is False, out
    assert out["after_prepare"] is True, out
    assert out["after_unprepare"] is False, out
    assert out["missing"].startswith("OSError"), out
    assert "no-such-netns" in out["missing"], out
    assert out["pyroute2_here"] is False, out
    # closed after idle, and reaped (no zombie left in the agent)
    assert out["worker_pid"] and out["worker_after_idle"] is False, out
    assert out["worker_reaped"] is True, out
