"""Admission limits for 15008 (agent.tunnel.limits), the Prometheus counter
they feed, and how connection records write endpoints and response flags."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics import Metrics
from agent.model import format_authority
from agent.tunnel import limits
from agent.tunnel.conns import ConnTable, parse_endpoint
from agent.tunnel.limits import Admission, HboneLimits, ResetBudget


def test_per_source_cap_refuses_only_that_source() -> None:
    lim = HboneLimits(per_source=3, per_pod=100, per_agent=1000)
    assert all(lim.admit("ns/a", "10.0.0.9") for _ in range(3))
    assert not lim.admit("ns/a", "10.0.0.9")
    assert lim.admit("ns/a", "10.0.0.10")  # another source still gets in
    assert lim.admit("ns/b", "10.0.0.9")  # per pod: another pod's listener is separate
    lim.release("ns/a", "10.0.0.9")
    assert lim.admit("ns/a", "10.0.0.9")


def test_pod_and_agent_caps() -> None:
    lim = HboneLimits(per_source=100, per_pod=2, per_agent=3)
    assert lim.admit("ns/a", "1.1.1.1") and lim.admit("ns/a", "1.1.1.2")
    assert not lim.admit("ns/a", "1.1.1.3")  # pod full
    assert lim.admit("ns/b", "1.1.1.3")
    assert not lim.admit("ns/c", "1.1.1.4")  # agent full
    lim.release("ns/b", "1.1.1.3")
    assert lim.admit("ns/c", "1.1.1.4")
    for pod, src in (("ns/a", "1.1.1.1"), ("ns/a", "1.1.1.2"), ("ns/c", "1.1.1.4")):
        lim.release(pod, src)
    assert lim.agent.count == 0 and not lim.pods and not lim.agent.by_source


def test_refusal_by_the_parent_takes_nothing_from_the_child() -> None:
    agent = Admission(10, 1, "agent")
    pod = Admission(10, 10, "ns/a", agent)
    assert pod.admit("x") is None
    assert pod.admit("y") == "per_agent"
    assert pod.count == 1 and dict(pod.by_source) == {"x": 1}


def test_limits_are_counted_in_prometheus_and_logged_at_a_bounded_rate(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(limits, "on_limited", [])
    monkeypatch.setattr(limits, "_last_log", {})
    m = Metrics()
    lim = HboneLimits(per_source=1, per_pod=10, per_agent=10)
    assert lim.admit("ns/a", "10.1.1.1")
    with caplog.at_level(logging.WARNING, logger="agent.tunnel.limits"):
        for _ in range(500):
            lim.admit("ns/a", "10.1.1.1")
    lines = [r for r in caplog.records if "per_source" in r.getMessage()]
    assert len(lines) == 1 and "10.1.1.1" in lines[0].getMessage()
    fams = {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}
    samples = {s.labels["reason"]: s.value for s in fams["tether_hbone_limited"].samples}
    assert samples["per_source"] == 500


def test_reset_budget_allows_a_burst_then_a_rate() -> None:
    b = ResetBudget(burst=10, rate=0.0)
    assert all(b.spend() for _ in range(10))
    assert not b.spend()
    b = ResetBudget(burst=5, rate=3.0)
    assert all(b.spend() for _ in range(5)) and not b.spend()
    b.stamp -= 1.0  # a second later: `rate` more, an honest client never runs dry
    assert all(b.spend() for _ in range(2))


@pytest.mark.parametrize(
    ("ip", "text"),
    [("10.0.0.1", "10.0.0.1:80"), ("fd00:10:2::4", "[fd00:10:2::4]:80")],
)
def test_records_write_ipv6_endpoints_in_brackets(ip: str, text: str) -> None:
    t = ConnTable()
    c = t.add("ns/a", "inbound", (ip, 80), (ip, 80), "hbone")
    c.delivered_as = (ip, 80)
    rec = c.record()
    assert rec["src"] == rec["dst"] == rec["delivered_as"] == text == format_authority(ip, 80)
    assert parse_endpoint(text) == (ip, 80)


class _Aborted:
    bytes_a_to_b = 10
    bytes_b_to_a = 5

    def __init__(self, flag: str | None) -> None:
        self.abort_flag = flag


@pytest.mark.parametrize(
    ("relay_flag", "error", "want"),
    [
        (None, None, "-"),  # clean end
        ("DC", "stream reset by peer (code 8)", "DC"),
        ("UC", "stream reset by peer (code 8)", "UC"),
        (None, "connection closed", "DC"),  # an error with a relay: not a failed connect
    ],
)
def test_a_stream_cut_after_data_moved_is_dc_or_uc_not_connect(
    relay_flag: str | None, error: str | None, want: str
) -> None:
    t = ConnTable()
    c = t.add("ns/a", "outbound", ("10.0.0.1", 1), ("10.0.0.2", 80), "hbone")
    c.relay = _Aborted(relay_flag)
    t.end(c, error)
    assert c.flag == want


def test_a_failed_connect_is_still_connect() -> None:
    t = ConnTable()
    c = t.add("ns/a", "outbound", ("10.0.0.1", 1), ("10.0.0.2", 80), "hbone")
    t.end(c, "CONNECT answered 503")
    assert c.flag == "CONNECT"


_FAULTS = """
import resource, sys
from agent.tunnel import limits
print(limits.tune_malloc())
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
held = []
f0 = faults()
for i in range(300):
    # a relay's pattern: a read's bytes and a frame, a few held, freed out of order
    held.append(bytearray(256 << 10)); held.append(bytearray(1 << 20))
    if len(held) > 6:
        held.pop(0); held.pop(1)
    if i % 50 == 0:
        held.clear()
print((faults() - f0) / (300 * 1.25))
"""


def _faults_per_mib(env: dict[str, str]) -> tuple[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.splitlines()
    return out[0], float(out[1])


def test_malloc_thresholds_stop_the_relay_buffers_faulting_in_again() -> None:
    """With glibc's own thresholds a relay's 256 KiB-1 MiB buffers are
    returned to the system when freed and fault their pages in again when
    allocated; with tune_malloc's they stay on the heap.  Page faults per
    MiB allocated, each in a fresh process."""
    said, tuned = _faults_per_mib({"TETHER_MALLOC": ""})
    assert said.startswith("tuned"), said
    said, default = _faults_per_mib({"TETHER_MALLOC": "default"})
    assert said == "default (TETHER_MALLOC=default)"
    assert tuned * 3 < default, (tuned, default)
