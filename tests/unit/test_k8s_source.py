"""KubeSource without an API server: a custom resource whose CRD is not
installed (the Gateway API, or Istio's own CRDs) counts as synced and empty,
is reported, and is picked up once it appears; other failures still raise."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from agent.sources.k8s import Kind, KubeSource

GW = ("gateway.networking.k8s.io", "v1", "gateways")


class FakeList:
    def __init__(self) -> None:
        self.installed = False
        self.items: list[dict[str, Any]] = []

    def __call__(self, *args: Any, **kw: Any) -> Any:
        if not self.installed:
            raise ApiException(status=404, reason="Not Found")
        return SimpleNamespace(
            data=json.dumps({"metadata": {"resourceVersion": "7"}, "items": self.items}).encode()
        )


def _source() -> KubeSource:
    return KubeSource("n1", api=client.ApiClient())


def test_missing_crd_is_synced_empty_and_reported_then_picked_up() -> None:
    src = _source()
    fake = FakeList()
    kind = Kind("gateways", fake, GW)
    assert src._relist(kind) is None
    assert "gateways" in src.synced and src.objects["gateways"] == {}
    assert "CRD not installed" in src.describe()["missing"]["gateways"]
    fake.installed = True
    fake.items = [
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "shop"},
        }
    ]
    assert src._relist(kind) == "7"
    assert "gateways" not in src.describe()["missing"]
    assert list(src.objects["gateways"]) == ["shop/waypoint"]


def test_snapshot_carries_gateway_api_documents_for_reporting() -> None:
    src = _source()
    src.objects = {
        "gateways": {
            "shop/w": {
                "apiVersion": "gateway.networking.k8s.io/v1",
                "metadata": {"name": "w", "namespace": "shop"},
            }
        }
    }
    (doc,) = src.snapshot().policies
    assert doc["kind"] == "Gateway" and doc["apiVersion"].startswith("gateway.networking")


def test_missing_core_kind_still_fails() -> None:
    src = _source()
    fake = FakeList()
    with pytest.raises(ApiException):
        src._relist(Kind("pods", fake))
    assert "pods" not in src.synced


def test_other_errors_of_custom_kinds_still_fail() -> None:
    src = _source()

    def forbidden(*a: Any, **kw: Any) -> Any:
        raise ApiException(status=403, reason="Forbidden")

    with pytest.raises(ApiException):
        src._relist(Kind("gateways", forbidden, GW))
    assert "gateways" not in src.synced


def test_crd_removed_while_watching_is_relisted_and_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The watch of a custom kind gets 404 (its CRD was deleted): the loop
    relists instead of re-watching a stale resourceVersion forever, and the
    kind shows up as missing with nothing left of it."""
    import agent.sources.k8s as k8s

    src = _source()
    fake = FakeList()
    fake.installed = True
    fake.items = [
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "w", "namespace": "shop"},
        }
    ]

    class GoneWatch:
        def stream(self, *a: Any, **kw: Any) -> Any:
            fake.installed = False  # the CRD is deleted while we watch
            raise ApiException(status=404, reason="Not Found")

        def stop(self) -> None:
            pass

    monkeypatch.setattr(k8s.watch, "Watch", GoneWatch)
    monkeypatch.setattr(k8s, "MISSING_RECHECK", 0.0)
    waits: list[float] = []

    def wait(t: float) -> bool:
        waits.append(t)
        if "gateways" in src.missing or len(waits) >= 5:  # bounded either way
            src._stop.set()
        return src._stop.is_set()

    monkeypatch.setattr(src._stop, "wait", wait)
    src._run(Kind("gateways", fake, GW))
    assert "gateways" in src.missing
    assert src.objects["gateways"] == {}
    assert len(waits) <= 3, waits
