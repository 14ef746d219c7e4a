"""`tether bench pingpong` drives the real path (bridges, H2Conns, mutual TLS
over loopback) in one process: every reply intact, the TLS path the agent
would pick, and the call count a number that only the code changes."""

from __future__ import annotations

import pytest

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


def test_new_connections_are_served_intact_and_counted() -> None:
    """The connections workload: every connection gets its CONNECT answered
    200, its request to the destination app and the reply back, both
    bridges ended cleanly; the count per connection covers both agents'
    HEADERS paths (h2's send and receive), which the messages workload
    never reaches."""
    r = measure(30, calls=True, workload="connections")
    assert r["workload"] == "connections"
    assert r["intact"] is True
    assert r["cpu_us"] > 0 and r["wall_us"] > 0
    assert r["calls"] > measure(30, calls=True)["calls"]  # a connection does more than a message
    assert any("send_headers" in k or "hpack" in k for k in r["top_calls"]) or r["calls"] > 500


def test_a_refused_connect_is_not_intact(monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks can fail: a destination that answers the CONNECT with
    anything but 200 makes the run not intact (the bench then exits 1)."""
    from agent.tunnel.h2conn import H2Conn, H2Stream

    respond = H2Conn.respond

    def refuse(self: H2Conn, stream: H2Stream, status: int, end: bool | None = None) -> None:
        respond(self, stream, 503 if status == 200 else status, end)

    monkeypatch.setattr(H2Conn, "respond", refuse)
    assert measure(3, workload="connections")["intact"] is False


def test_a_changed_reply_is_not_intact(monkeypatch: pytest.MonkeyPatch) -> None:
    from agent.tunnel.bridge import Bridge

    on_data = Bridge._on_data

    def flip(self: Bridge, data: bytes) -> None:
        on_data(self, bytes(b ^ 1 for b in data) if self.initiator == "socket" else data)

    monkeypatch.setattr(Bridge, "_on_data", flip)
    assert measure(3, workload="connections")["intact"] is False


def test_a_destination_handler_that_fails_ends_the_round(monkeypatch: pytest.MonkeyPatch) -> None:
    """A destination side that raises (here: its request check) answers 503
    and the round ends not intact, instead of the client waiting for it."""
    import agent.tunnel.hbone

    def broken(headers: object, local_ip: str) -> tuple[str, int]:
        raise RuntimeError("check failed")

    monkeypatch.setattr(agent.tunnel.hbone, "check_request", broken)
    assert measure(3, workload="connections")["intact"] is False
