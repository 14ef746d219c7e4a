"""netns tier: `tether bench waypoint` end to end with a tiny run: every path
(direct, L4 HBONE, through the Envoy waypoint) answered, with sane numbers.

Needs root, Envoy (the waypoint extra) and wrk (vagrant/provision.sh installs
it); without Envoy or wrk the module skips (a skip fails CI's privileged run).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.waypoint.gate import HINT, require_waypoint_extra

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="netns tier needs root")

require_waypoint_extra()

from waypoint.envoy import EnvoyNotInstalled, envoy_binary  # noqa: E402

try:
    envoy_binary()
except EnvoyNotInstalled as e:
    pytest.skip(f"needs Envoy: {e} ({HINT})", allow_module_level=True)
if shutil.which("wrk") is None:
    pytest.skip("needs wrk (apt-get install wrk)", allow_module_level=True)


def test_bench_waypoint_reports_every_path() -> None:
    p = subprocess.run(
        [sys.executable, "-m", "agent.cli", "bench", "waypoint", "--seconds", "1", "--json"],
        capture_output=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr.decode()[-3000:]
    report = json.loads(p.stdout)
    assert set(report["paths"]) == {"direct", "l4", "waypoint"}
    for name, row in report["paths"].items():
        assert row["rps"] > 0 and row["requests"] > 0, (name, row)
        assert row["p99_ms"] >= row["p50_ms"] > 0, (name, row)
        assert row["errors"] == 0 and row["non2xx"] == 0, (name, row)
    assert report["paths"]["direct"]["rps_x_direct"] == 1.0
    # only the waypoint path goes through Envoy; the mesh paths cost the agents CPU
    assert report["paths"]["waypoint"]["envoy_cpu_ms_per_1k"] > 0
    assert report["paths"]["l4"]["agent_cpu_ms_per_1k"] > 0
    assert report["waypoint_envoy"]["rss_mib"] > 0
    assert len(report["loadavg"]) == 6
