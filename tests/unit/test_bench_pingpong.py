"""`tether bench pingpong` drives the real path (bridges, H2Conns, mutual TLS
over loopback) in one process: every reply intact, the TLS path the agent
would pick, and the call count a number that only the code changes."""

from __future__ import annotations

from agent.bench_pingpong import measure
from agent.tunnel import tlssock


def test_round_trips_are_intact_and_counted() -> None:
    r = measure(50, calls=True)
    assert r["intact"] is True
    assert r["tls"] == [tlssock.DEFAULT if tlssock.core_available() else "loop"]
    assert r["cpu_us"] > 0 and r["wall_us"] > 0
    # per round trip: two traversals each way of bridge, H2Conn and TLS
    assert r["calls"] > 50
    assert any("h2conn.py" in k for k in r["top_calls"])


def test_the_count_is_the_code_not_the_run() -> None:
    a, b = measure(200, calls=True), measure(200, calls=True)
    assert abs(a["calls"] - b["calls"]) <= 0.02 * a["calls"]
