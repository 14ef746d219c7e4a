"""`tether bench syscalls` reads strace's -c summary: every row counted
(with or without an errors column), the total line and headers skipped."""

from __future__ import annotations

from typing import Any

from agent.bench_syscalls import _per_unit, parse_strace_summary

SUMMARY = """\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 33.51    0.180256          22      8011           write
 32.31    0.173791      173791         1         1 futex
 13.21    0.071039           8      8025           epoll_pwait
  7.69    0.041350           3     12018      4005 read
  0.01    0.000057          57         1         1 connect
------ ----------- ----------- --------- --------- ----------------
100.00    0.466493          17     28056      4007 total
"""


def test_rows_with_and_without_errors() -> None:
    assert parse_strace_summary(SUMMARY) == {
        "write": 8011,
        "futex": 1,
        "epoll_pwait": 8025,
        "read": 12018,
        "connect": 1,
    }


def test_nothing_counted_from_an_empty_or_foreign_text() -> None:
    assert parse_strace_summary("") == {}
    assert parse_strace_summary("strace: Process 123 attached\n") == {}


def test_per_unit_divides_and_orders() -> None:
    got = _per_unit(4000, {"sender": parse_strace_summary(SUMMARY)})
    assert got["units"] == 4000
    assert got["sender"]["total"] == 7.0  # 28,056 / 4,000
    assert list(got["sender"]["calls"])[:3] == ["read", "epoll_pwait", "write"]
    assert got["sender"]["calls"]["read"] == 3.0


def test_runs_merge_to_medians_with_missing_calls_as_zero() -> None:
    from agent.bench_syscalls import median_runs

    def run(total: float, reads: float, futex: float | None, load: float) -> dict[str, Any]:
        calls = {"read": reads, **({"futex": futex} if futex is not None else {})}
        role = {"total": total, "calls": calls}
        per = {"units": 100, "sender (node1)": role, "receiver (node2)": role}
        row = {"what": "agent code at x", "connection": per, "message": per}
        return {"seconds": 3, "loadavg": [load] * 6, "rows": {"as is": row}}

    m = median_runs([run(50, 3, 4, 1.0), run(52, 2, None, 1.1), run(51, 2, 1, 0.9)])
    conn = m["rows"]["as is"]["connection"]["sender (node1)"]
    assert m["runs"] == 3 and len(m["loadavg_runs"]) == 3
    assert conn["total"] == 51 and conn["totals"] == [50, 52, 51]
    assert conn["calls"] == {"read": 2, "futex": 1}
    assert m["rows"]["as is"]["what"] == "agent code at x"
