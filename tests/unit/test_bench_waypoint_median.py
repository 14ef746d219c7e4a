"""`tether bench waypoint --runs N`: every number the median of the runs'."""

from __future__ import annotations

from typing import Any

from agent.bench_waypoint import median_runs


def _run(rps: float, p99: float, load: float) -> dict[str, Any]:
    row = {
        "url": "http://x/",
        "rps": rps,
        "p50_ms": p99 / 2,
        "p99_ms": p99,
        "agent_cpu_ms_per_1k_by_node": {"node1": rps / 10},
    }
    return {
        "paths": {"direct": dict(row), "waypoint": dict(row, rps=rps / 4)},
        "waypoint_envoy": {"pid": 1, "rss_mib": load * 10},
        "seconds_per_path": 1.0,
        "connections": 8,
        "loadavg": [load] * 6,
        "wall_s": 30.0,
    }


def test_medians_per_number_and_every_runs_load_kept() -> None:
    m = median_runs([_run(100, 9, 1), _run(300, 1, 3), _run(200, 5, 2)])
    assert m["paths"]["direct"]["rps"] == 200
    assert m["paths"]["direct"]["p99_ms"] == 5
    assert m["paths"]["waypoint"]["rps"] == 50
    assert m["paths"]["direct"]["agent_cpu_ms_per_1k_by_node"] == {"node1": 20}
    assert m["paths"]["direct"]["url"] == "http://x/"
    assert m["waypoint_envoy"] == {"rss_mib": 20}
    assert m["per_run"]["direct"]["rps"] == [100, 300, 200]
    assert m["runs"] == 3 and m["loadavg"] == [[1] * 6, [3] * 6, [2] * 6]
