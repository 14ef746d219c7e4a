"""Tier gating shared by every test tier.

Privileged tiers (bpf, netns) skip with a reason when not root.  In CI
(TETHER_REQUIRE_ALL_TIERS=1, set by `make test` when CI is set) a skip in a
privileged tier fails the run: CI runs as root and must exercise them all.
"""

from __future__ import annotations

import os

import pytest

PRIVILEGED_TIERS = ("tests/bpf/", "tests/netns/", "tests/k8s/")
#: tiers CI must run in full: the privileged ones, and the waypoint tier (a real
#: Envoy from the waypoint extra; its netns test needs root)
REQUIRED_TIERS = (*PRIVILEGED_TIERS, "tests/waypoint/")
#: opt-in tiers: required once asked for (`make test-node`, `make test-kernels`
#: set these), so a CI run that asked for them cannot pass by skipping them
OPT_IN_TIERS = {"TETHER_NODE": "tests/node/", "TETHER_KERNELS": "tests/kernels/"}


def _required_tiers() -> tuple[str, ...]:
    return REQUIRED_TIERS + tuple(
        tier for var, tier in OPT_IN_TIERS.items() if os.environ.get(var) == "1"
    )


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int) -> None:
    if os.environ.get("TETHER_REQUIRE_ALL_TIERS") != "1":
        return
    skipped = [
        r
        for r in terminalreporter.stats.get("skipped", [])
        if any(
            t in str(getattr(r, "nodeid", "")) or t in str(getattr(r, "location", ""))
            for t in _required_tiers()
        )
    ]
    if skipped:
        terminalreporter.write_line(
            f"FAIL: {len(skipped)} privileged or waypoint tier test(s) skipped, "
            "but CI must run them all:",
            red=True,
        )
        for r in skipped[:20]:
            terminalreporter.write_line(f"  {r.nodeid}: {r.longrepr}")
        terminalreporter._session.exitstatus = pytest.ExitCode.TESTS_FAILED  # type: ignore[attr-defined]
