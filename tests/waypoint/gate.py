"""Skip (or, under CI, fail) when the waypoint extra is not installed."""

from __future__ import annotations

import importlib
import os

import pytest

HINT = "pip install 'tether[waypoint]'"


def require_waypoint_extra() -> None:
    """Call at module level before importing ``waypoint``: xds-protos must import."""
    try:
        importlib.import_module("envoy.service.discovery.v3.ads_pb2_grpc")
    except ImportError as e:
        if os.environ.get("CI"):
            raise ImportError(f"{e}; CI must run the waypoint tests: {HINT}") from e
        pytest.skip(f"xds-protos not installed ({e}): {HINT}", allow_module_level=True)
