"""A small mesh for the waypoint translation tests: namespace ``blog`` (and
``default``, ``production``) enrolled and sent through waypoint ``blog/waypoint``,
the seed services and their pods."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.message import Message

from agent.model import Service, ServicePort, Snapshot, Workload
from agent.model.waypoint import Waypoint
from agent.state.state import StateView, build_view
from waypoint.translate import CLUSTER, LISTENER, ROUTE, Report, Resources, translate


def seed_dir() -> Path | None:
    env = os.environ.get("TETHER_SEED_YAML")
    if env:
        return Path(env)
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "fixtures" / "seed-yaml"
        if candidate.is_dir():
            return candidate
    return None


def load_seeds() -> list[dict[str, Any]]:
    d = seed_dir()
    if d is None:
        return []
    out = []
    for path in sorted(d.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if isinstance(doc, dict):
                out.append(doc)
    return out


def seeds(kind: str, name: str, namespace: str | None = None) -> list[dict[str, Any]]:
    return [
        d
        for d in load_seeds()
        if d.get("kind") == kind
        and d["metadata"]["name"] == name
        and (namespace is None or d["metadata"].get("namespace", "default") == namespace)
    ]


WAYPOINT = Waypoint("waypoint", "blog", ("10.1.0.9",), "n1")
USE = {
    "istio.io/dataplane-mode": "ambient",
    "istio.io/use-waypoint": "waypoint",
    "istio.io/use-waypoint-namespace": "blog",
}
NAMESPACES = {"blog": USE, "default": USE, "production": USE}
SERVICES = (
    Service(
        "blog-api", "blog", ("10.96.0.10",), (ServicePort(8080, 8080, "http"),), {"app": "blog-api"}
    ),
    Service(
        "user-service",
        "blog",
        ("10.96.0.11",),
        (ServicePort(9090, 9090, "grpc"),),
        {"app": "user-service"},
    ),
    Service("myapp", "default", ("10.96.0.20",), (ServicePort(80, 8080),), {"app": "myapp"}),
    Service("myapp", "production", ("10.96.0.30",), (ServicePort(80, 8080),), {"app": "myapp"}),
)
WORKLOADS = (
    Workload(
        "blog-api-v1",
        "blog",
        "blog-api",
        "n1",
        ("10.1.0.11",),
        {"app": "blog-api", "version": "v1"},
    ),
    Workload(
        "blog-api-v2",
        "blog",
        "blog-api",
        "n2",
        ("10.1.0.12",),
        {"app": "blog-api", "version": "v2"},
    ),
    Workload(
        "user-service-0", "blog", "user-service", "n2", ("10.1.0.13",), {"app": "user-service"}
    ),
    Workload(
        "myapp-v1", "default", "myapp", "n1", ("10.1.0.21",), {"app": "myapp", "version": "v1"}
    ),
    Workload(
        "myapp-v2", "default", "myapp", "n2", ("10.1.0.22",), {"app": "myapp", "version": "v2"}
    ),
    Workload("myapp-0", "production", "myapp", "n2", ("10.1.0.31",), {"app": "myapp"}),
)


def view_of(
    docs: Iterable[Mapping[str, Any]],
    *,
    services: tuple[Service, ...] = SERVICES,
    workloads: tuple[Workload, ...] = WORKLOADS,
    namespaces: dict[str, dict[str, str]] | None = None,
    waypoints: tuple[Waypoint, ...] = (WAYPOINT,),
) -> StateView:
    snap = Snapshot(
        "n1",
        namespaces if namespaces is not None else NAMESPACES,
        workloads,
        services,
        tuple(docs),
        waypoints,
    )
    return build_view(snap, "cluster.local", None, 1)


def run(docs: Iterable[Mapping[str, Any]], **kw: Any) -> tuple[Resources, Report]:
    jwks = kw.pop("jwks", None)
    return translate(view_of(docs, **kw), WAYPOINT, jwks=jwks)


def as_dict(m: Message) -> dict[str, Any]:
    return json_format.MessageToDict(m, preserving_proto_field_name=True)


def listener(res: Resources, name: str) -> dict[str, Any]:
    return as_dict(res[LISTENER][name])


def cluster(res: Resources, name: str) -> dict[str, Any]:
    return as_dict(res[CLUSTER][name])


def route_config(res: Resources, name: str) -> dict[str, Any]:
    return as_dict(res[ROUTE][name])


def routes(
    res: Resources, host: str = "blog-api.blog.svc.cluster.local", port: int = 8080
) -> list[dict[str, Any]]:
    rc = route_config(res, f"inbound-vip|{port}|http|{host}")
    return list(rc["virtual_hosts"][0]["routes"])


def chain(
    res: Resources, name: str = "inbound-vip|8080|http|blog-api.blog.svc.cluster.local"
) -> dict[str, Any]:
    for fc in listener(res, "main_internal")["filter_chains"]:
        if fc["name"] == name:
            return dict(fc)
    raise KeyError(name)


def http_filters(
    res: Resources, name: str = "inbound-vip|8080|http|blog-api.blog.svc.cluster.local"
) -> list[dict[str, Any]]:
    return list(chain(res, name)["filters"][0]["typed_config"]["http_filters"])


def contains(actual: Any, expected: Any) -> bool:
    """``expected`` is a sub-structure of ``actual`` (dicts by subset, lists exactly)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            k in actual and contains(actual[k], v) for k, v in expected.items()
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(contains(a, e) for a, e in zip(actual, expected, strict=True))
        )
    return bool(actual == expected)


def doc(
    kind: str, name: str, spec: Mapping[str, Any], namespace: str = "blog", api: str | None = None
) -> dict[str, Any]:
    apis = {
        "VirtualService": "networking.istio.io/v1",
        "DestinationRule": "networking.istio.io/v1",
        "AuthorizationPolicy": "security.istio.io/v1",
        "RequestAuthentication": "security.istio.io/v1",
        "HTTPRoute": "gateway.networking.k8s.io/v1",
    }
    return {
        "apiVersion": api or apis[kind],
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace},
        "spec": dict(spec),
    }


TO_WAYPOINT = [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}]
TO_BLOG_API = [{"kind": "Service", "group": "", "name": "blog-api"}]
