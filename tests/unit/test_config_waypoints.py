"""The local file and the waypoint label: every namespace, service and
workload that asks for a waypoint is listed as not applied (tether runs no
waypoint yet); `none` opts out; a malformed labels field names itself."""

from __future__ import annotations

from typing import Any

import pytest

from agent.config import WAYPOINT_NOT_APPLIED, ConfigError, parse


def _doc(**extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "node": "n1",
        "namespaces": [
            {
                "name": "shop",
                "labels": {
                    "istio.io/dataplane-mode": "ambient",
                    "istio.io/use-waypoint": "shop-wp",
                },
            },
            {"name": "data", "labels": {"istio.io/use-waypoint": "none"}},
            {"name": "plain"},
        ],
        "workloads": [
            {
                "name": "a",
                "namespace": "data",
                "serviceAccount": "a",
                "node": "n2",
                "addresses": ["10.0.0.1"],
                "labels": {"istio.io/use-waypoint": "a-wp"},
            },
            {
                "name": "b",
                "namespace": "data",
                "serviceAccount": "b",
                "node": "n2",
                "addresses": ["10.0.0.2"],
            },
        ],
        "services": [
            {
                "name": "db",
                "namespace": "data",
                "addresses": ["10.96.0.9"],
                "ports": [{"port": 5432}],
                "selector": {"app": "db"},
                "labels": {"istio.io/use-waypoint": "db-wp"},
            },
        ],
    }
    doc.update(extra)
    return doc


def test_every_scope_that_asks_for_a_waypoint_is_listed_as_not_applied() -> None:
    uses = parse(_doc()).waypoint_uses()
    assert [(u["scope"], u["name"], u["waypoint"]) for u in uses] == [
        ("namespace", "shop", "shop-wp"),
        ("service", "data/db", "db-wp"),
        ("workload", "data/a", "a-wp"),
    ]
    assert all(u["status"] == WAYPOINT_NOT_APPLIED for u in uses)
    assert "only L4 authorization is enforced" in WAYPOINT_NOT_APPLIED


def test_no_labels_no_waypoints() -> None:
    doc = _doc(namespaces=[{"name": "shop"}], services=[])
    doc["workloads"][0]["labels"] = {}
    assert parse(doc).waypoint_uses() == []


def test_bad_service_labels_name_the_field() -> None:
    doc = _doc()
    doc["services"][0]["labels"] = ["istio.io/use-waypoint"]
    with pytest.raises(ConfigError, match=r"services\[0\]\.labels"):
        parse(doc)
