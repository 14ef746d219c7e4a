"""The bench's bookkeeping (no root, no traffic): medians over runs, the
profile's buckets, the metrics exposition staying parseable, the order of
the rows across runs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent import bench
from agent.bench import _bucket, median_runs


def test_median_runs_takes_medians_of_numbers_and_of_in_run_ratios() -> None:
    runs = [
        {"wall_s": 10, "loadavg": [1, 1, 1, 2, 2, 2], "results": {"p": {"x": v, "x_st": r}}}
        for v, r in ((1.0, 0.5), (3.0, 0.9), (2.0, 0.7))
    ]
    m = median_runs(runs)
    assert m["runs"] == 3 and m["wall_s"] == 30
    assert m["results"]["p"] == {"x": 2.0, "x_st": 0.7}
    assert len(m["loadavg_runs"]) == 3


def test_profile_buckets_go_by_the_innermost_frame_that_says_something() -> None:
    root = (
        "_run_module_as_main (<frozen runpy>:198);"
        "BaseEventLoop._run_once (asyncio/base_events.py:1922)"
    )
    h2 = root + ";H2Conn.data_received (agent/tunnel/h2conn.py:348)"
    assert _bucket(h2 + ";H2Connection.receive_data (h2/connection.py:1519)") == (
        "h2/hyperframe/hpack framing"
    )
    assert _bucket(h2 + ";0x7faede480d24 (libc.so.6)") == "copies (libc memcpy/memmove)"
    assert _bucket(root + ";write (asyncio/selector_events.py:1057);send (libc.so.6)") == (
        "syscalls (send/recv)"
    )
    assert _bucket(root + ";SSLObject.read (ssl.py:921);aesni_gcm (libcrypto.so.3)") == (
        "TLS crypto (libcrypto)"
    )
    idle = "_worker (concurrent/futures/thread.py:81);PyThread_acquire_lock_timed (python3.11)"
    assert _bucket(idle) is None


def test_every_second_run_measures_the_variants_first(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Row position alone moved latency by 13-27 % in an A/A run (README):
    the runs alternate which rows go first, and the report says the order."""
    calls: list[bool] = []

    def fake(seconds: float, **kw: Any) -> dict[str, Any]:
        calls.append(kw["variants_first"])
        order = ["tether cross-node [v]", "tether cross-node (HBONE)"]
        return {
            "results": {"tether cross-node (HBONE)": {"p50_us": 1.0}},
            "wall_s": 1.0,
            "loadavg": [0.0] * 6,
            "config": {"cross_row_order": order if kw["variants_first"] else order[::-1]},
        }

    monkeypatch.setattr(bench, "run_tunnel", fake)
    assert bench.main("tunnel", runs=3, json_out=True, variants={"v": {"K": "1"}}) == 0
    assert calls == [False, True, False]
    report = json.loads(capsys.readouterr().out)
    assert [o[0] for o in report["row_order_runs"]] == [
        "tether cross-node (HBONE)",
        "tether cross-node [v]",
        "tether cross-node (HBONE)",
    ]


def test_cpu_shares_split_busy_idle_steal() -> None:
    from agent.bench import _CPU_FIELDS, cpu_shares

    before = dict.fromkeys(_CPU_FIELDS, 0)
    after = {**before, "user": 50, "system": 20, "softirq": 10, "idle": 90, "iowait": 10}
    after["steal"] = 20
    assert cpu_shares(before, after) == {"busy": 40.0, "idle": 50.0, "steal": 10.0}
    assert cpu_shares(before, before) == {"busy": 0.0, "idle": 0.0, "steal": 0.0}
