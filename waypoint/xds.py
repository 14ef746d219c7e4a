"""The agent's ADS server for the waypoint Envoys on its node (state of the world and delta).

Who may fetch what
------------------
Threat: a pod on the node (any workload, or a compromised waypoint of another
namespace) connects to the agent's xDS endpoint and asks for another
namespace's waypoint configuration, and with it that waypoint's private key
(SDS ``tls_certificate``), which would let it impersonate the waypoint's
SPIFFE identity mesh-wide.

Decision: there is no token and no TCP endpoint.  Checks 1 and 2 each keep
that pod out on its own; 3 keeps a wiring mistake from crossing waypoints:

1. One unix socket per waypoint the agent runs on its node,
   ``<stateDir>/xds/<namespace>.<name>.sock`` (directory 0700, socket 0600,
   owned by root unless an owner is given), and only that socket's path is
   bind-mounted into that waypoint's pod.  Reaching it means running in that
   pod, or being root on the node (who owns everything anyway).
2. The peer's credentials (``XdsServer(peer_check=...)``, waypoint/peer.py):
   the process that connected, from SO_PEERCRED, must be in the waypoint
   pod's network namespace (``peer_in_netns``) or cgroup
   (``peer_in_cgroup``); others are disconnected before a byte reaches grpc
   and logged.  grpcio hides the accepted fd and the peer credentials
   (``context.peer()`` is just ``unix:``), so a gate owns the mounted socket,
   checks, and relays admitted connections to grpc's own socket beside it
   (same 0700 directory, never mounted anywhere).  The pid is read in the
   agent's pid namespace (the agent runs with the host's); pid reuse between
   connect() and the check is the remaining gap (SO_PEERPIDFD, Linux 6.5).
3. Every stream's Envoy node id must be the node id of the waypoint the
   socket is for (``node_id(namespace, name)``); any other is refused with
   PERMISSION_DENIED and logged, so a mount or wiring mistake cannot turn
   into serving one waypoint's config and key to another.  The cache is
   keyed by node id: a stream only ever reads its own entry.

Protocol
--------
A snapshot per node id: per type URL, name → Any-packed resource, a content
hash per resource (delta versions) and a version per type (the snapshot
version at which that type last changed; the SotW ``version_info``).
``set_snapshot`` wakes only that node's streams, and a stream sends only what
changed: SotW sends a whole type when its version moved, delta sends the
changed and removed names.  When several types change together they go out
in go-control-plane's ADS order: clusters, endpoints, listeners, routes,
secrets (Envoy warms new clusters before listeners that use them; Envoy's ADS
mux pauses EDS/RDS/SDS while CDS/LDS are applied).  ACKs and NACKs are
tracked per node and type: the last ACKed version, and the last NACK's
version and Envoy's ``error_detail.message``, which are logged, reported by
``status()`` and passed to ``on_nack``.  Envoy keeps its last good config on
a NACK.  SDS secrets (the waypoint's ``tls_certificate`` and the trust root
``validation_context``) go through the same stream: a rotation is a new
Secret version, applied by Envoy to new TLS handshakes without a restart and
without touching open connections.

Threads: the gRPC server runs on its own thread pool, each stream on one pool
thread plus a reader thread; never on the agent's asyncio loop.  The only
shared state is the cache, under one lock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401 (registers the type)
from envoy.extensions.filters.network.http_connection_manager.v3 import (  # noqa: F401
    http_connection_manager_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2, json_format, symbol_database
from google.protobuf.message import Message

from waypoint.als import AccessLogServicer, Sink
from waypoint.als import add_to_server as add_access_log_servicer
from waypoint.peer import PeerCheck, PeerGate

log = logging.getLogger(__name__)

_PREFIX = "type.googleapis.com/"
TYPE_CLUSTER = _PREFIX + cluster_pb2.Cluster.DESCRIPTOR.full_name
TYPE_ENDPOINT = _PREFIX + endpoint_pb2.ClusterLoadAssignment.DESCRIPTOR.full_name
TYPE_LISTENER = _PREFIX + listener_pb2.Listener.DESCRIPTOR.full_name
TYPE_ROUTE = _PREFIX + route_pb2.RouteConfiguration.DESCRIPTOR.full_name
TYPE_SECRET = _PREFIX + secret_pb2.Secret.DESCRIPTOR.full_name
#: go-control-plane's ADS order: what a resource refers to goes out before it.
PUSH_ORDER = (TYPE_CLUSTER, TYPE_ENDPOINT, TYPE_LISTENER, TYPE_ROUTE, TYPE_SECRET)
#: types Envoy subscribes to by wildcard (every resource of the type)
WILDCARD_TYPES = frozenset({TYPE_CLUSTER, TYPE_LISTENER})

#: on_nack(node_id, type_url, rejected version, Envoy's error message)
NackHook = Callable[[str, str, str, str], None]


def node_id(namespace: str, name: str) -> str:
    """The Envoy node id of a waypoint, as its bootstrap sets it and this server checks it."""
    return f"waypoint~{namespace}~{name}"


def socket_name(namespace: str, name: str) -> str:
    """The file name of one waypoint's ADS socket, in the agent's <stateDir>/xds."""
    for part in (namespace, name):
        if not part or "/" in part or part.startswith("."):
            raise ValueError(f"invalid waypoint name part {part!r}")
    return f"{namespace}.{name}.sock"


def socket_path(state_dir: str | os.PathLike[str], namespace: str, name: str) -> Path:
    """Where the agent serves ADS for one waypoint: <stateDir>/xds/<ns>.<name>.sock
    (the xds directory is the one a waypoint pod mounts from the host)."""
    return Path(state_dir) / "xds" / socket_name(namespace, name)


def pack(resource: Message) -> any_pb2.Any:
    if isinstance(resource, any_pb2.Any):
        return resource
    a = any_pb2.Any()
    a.Pack(resource)
    return a


def parse_resource(message_type: type[Message], doc: Mapping[str, Any]) -> Message:
    """A resource from its proto3 JSON/YAML form (``@type`` for nested Any fields)."""
    return json_format.ParseDict(dict(doc), message_type())


def _resource_name(a: any_pb2.Any) -> str:
    """``name``, or ``cluster_name`` for a ClusterLoadAssignment."""
    msg = symbol_database.Default().GetSymbol(a.TypeName())()
    a.Unpack(msg)
    return str(getattr(msg, "name", "") or getattr(msg, "cluster_name", ""))


def content_version(a: any_pb2.Any) -> str:
    """Delta version of one resource: a hash of its deterministic serialization."""
    return hashlib.sha256(a.SerializeToString(deterministic=True)).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class TypeSnapshot:
    """One type of one node's snapshot: the SotW version and the resources with theirs."""

    version: str
    resources: Mapping[str, any_pb2.Any]
    versions: Mapping[str, str]


@dataclasses.dataclass
class TypeStatus:
    """What Envoy did with a type: for ``tether status`` and ``/config_dump``."""

    version: str = ""  # current in the cache
    sent: str = ""
    acked: str = ""
    nack_version: str = ""
    nack_message: str = ""
    nack_at: float = 0.0
    ack_latency_ms: float | None = None
    _sent_at: float = 0.0

    def public(self) -> dict[str, Any]:
        d = {k: v for k, v in dataclasses.asdict(self).items() if not k.startswith("_")}
        if not self.nack_message:
            for k in ("nack_version", "nack_message", "nack_at"):
                d.pop(k)
        return d


_CHANGED = object()
_END = object()


class SnapshotCache:
    """Desired xDS state per Envoy node id, and what each node ACKed or NACKed."""

    def __init__(self, on_nack: NackHook | None = None) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._snapshots: dict[str, dict[str, TypeSnapshot]] = {}
        self._generation: dict[str, int] = {}
        self._watchers: dict[str, set[queue.SimpleQueue[object]]] = {}
        self._status: dict[str, dict[str, TypeStatus]] = {}
        self.on_nack = on_nack

    def set_snapshot(
        self,
        node: str,
        resources_by_type: Mapping[str, Iterable[Message] | Mapping[str, Message]],
        version: str | None = None,
    ) -> dict[str, str]:
        """Replace the node's whole state (absent types become empty); returns
        the SotW version of each type.  Only types whose content changed get a
        new version, and only the node's connected streams are woken."""
        packed: dict[str, dict[str, any_pb2.Any]] = {t: {} for t in PUSH_ORDER}
        for type_url, resources in resources_by_type.items():
            items = (
                resources.items()
                if isinstance(resources, Mapping)
                else ((None, r) for r in resources)
            )
            out: dict[str, any_pb2.Any] = {}
            for name, r in items:
                a = pack(r)
                if a.type_url != type_url:
                    raise ValueError(f"resource of type {a.type_url} listed under {type_url}")
                key = name if name is not None else _resource_name(a)
                if not key:
                    raise ValueError(f"{type_url} resource without a name")
                if key in out:
                    raise ValueError(f"duplicate {type_url} resource {key!r}")
                out[key] = a
            packed[type_url] = out
        with self._lock:
            gen = self._generation.get(node, 0) + 1
            new_version = version or str(gen)
            old = self._snapshots.get(node, {})
            snap: dict[str, TypeSnapshot] = {}
            changed = False
            for type_url, res in packed.items():
                versions = {n: content_version(a) for n, a in res.items()}
                prev = old.get(type_url)
                if prev is not None and dict(prev.versions) == versions:
                    snap[type_url] = prev
                else:
                    snap[type_url] = TypeSnapshot(new_version, res, versions)
                    changed = True
            if not changed and node in self._snapshots and set(old) == set(snap):
                return {t: s.version for t, s in old.items()}
            self._generation[node] = gen
            self._snapshots[node] = snap
            st = self._status.setdefault(node, {})
            for type_url, s in snap.items():
                st.setdefault(type_url, TypeStatus()).version = s.version
            for q in self._watchers.get(node, ()):
                q.put(_CHANGED)
            return {t: s.version for t, s in snap.items()}

    def clear(self, node: str) -> None:
        """Forget a node (its waypoint is gone); its streams keep what they have."""
        with self._lock:
            self._snapshots.pop(node, None)
            self._status.pop(node, None)

    def get(self, node: str, type_url: str) -> TypeSnapshot | None:
        """The node's current resources of one type; None until it has a snapshot."""
        with self._lock:
            snap = self._snapshots.get(node)
            if snap is None:
                return None
            return snap.get(type_url) or TypeSnapshot(str(self._generation[node]), {}, {})

    def nodes(self) -> list[str]:
        with self._lock:
            return sorted(self._snapshots)

    def status(self) -> dict[str, Any]:
        """Per node and type: version, sent, acked, last NACK; and streams connected."""
        with self._lock:
            return {
                node: {
                    "streams": len(self._watchers.get(node, ())),
                    "types": {t: s.public() for t, s in types.items()},
                }
                for node, types in sorted(self._status.items())
            }

    def type_status(self, node: str, type_url: str) -> TypeStatus:
        with self._lock:
            return dataclasses.replace(self._status.get(node, {}).get(type_url, TypeStatus()))

    def wait_acked(self, node: str, type_url: str, version: str, timeout: float) -> bool:
        """Block until Envoy ACKed ``version`` of the type (False on timeout or NACK)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                st = self._status.get(node, {}).get(type_url)
                if st is not None and st.acked == version:
                    return True
                if st is not None and st.nack_version == version:
                    return False
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)

    def wait_nacked(self, node: str, type_url: str, version: str, timeout: float) -> str | None:
        """Block until Envoy NACKed ``version``; returns Envoy's message (None on timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                st = self._status.get(node, {}).get(type_url)
                if st is not None and st.nack_version == version:
                    return st.nack_message
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    # -- for the streams -------------------------------------------------------------

    def _watch(self, node: str, q: queue.SimpleQueue[object]) -> None:
        with self._lock:
            self._watchers.setdefault(node, set()).add(q)
            self._status.setdefault(node, {})

    def _unwatch(self, node: str, q: queue.SimpleQueue[object]) -> None:
        with self._lock:
            qs = self._watchers.get(node)
            if qs is not None:
                qs.discard(q)
                if not qs:
                    del self._watchers[node]

    def _record_sent(self, node: str, type_url: str, version: str) -> None:
        with self._lock:
            st = self._status.setdefault(node, {}).setdefault(type_url, TypeStatus())
            st.sent = version
            st._sent_at = time.monotonic()

    def _record_ack(self, node: str, type_url: str, version: str) -> None:
        with self._cond:
            st = self._status.setdefault(node, {}).setdefault(type_url, TypeStatus())
            if st.sent == version and st._sent_at:
                st.ack_latency_ms = round((time.monotonic() - st._sent_at) * 1000, 2)
            st.acked = version
            if st.nack_version == version:
                st.nack_version = st.nack_message = ""
                st.nack_at = 0.0
            self._cond.notify_all()

    def _record_nack(self, node: str, type_url: str, version: str, message: str) -> None:
        with self._cond:
            st = self._status.setdefault(node, {}).setdefault(type_url, TypeStatus())
            repeated = st.nack_version == version and st.nack_message == message
            st.nack_version, st.nack_message, st.nack_at = version, message, time.time()
            self._cond.notify_all()
        if repeated:
            return
        log.warning(
            "xds: %s rejected %s version %s: %s",
            node,
            type_url.rsplit(".", 1)[-1],
            version,
            message,
        )
        if self.on_nack is not None:
            try:
                self.on_nack(node, type_url, version, message)
            except Exception:
                log.exception("xds: on_nack hook failed")


class _Stream:
    """One ADS stream: a reader thread feeds requests, the cache feeds changes."""

    def __init__(
        self,
        server: AdsServicer,
        requests: Iterator[Any],
        context: grpc.ServicerContext,
    ) -> None:
        self.server = server
        self.cache = server.cache
        self.requests = requests
        self.context = context
        self.q: queue.SimpleQueue[object] = queue.SimpleQueue()
        self.node = ""
        self._nonces = itertools.count(1)

    def nonce(self) -> str:
        return str(next(self._nonces))

    def _read(self) -> None:
        try:
            for req in self.requests:
                self.q.put(req)
        except Exception as e:  # the client went away: grpc raises from the iterator
            log.debug("xds: stream reader ended: %s", e)
        finally:
            self.q.put(_END)

    def _authenticate(self, req: Any) -> None:
        ident = req.node.id
        if not ident:
            self.context.abort(grpc.StatusCode.INVALID_ARGUMENT, "first request carries no node id")
        if not self.server.allows(ident):
            log.warning(
                "xds: refused node id %r on %s (serves %s)",
                ident,
                self.server.name,
                sorted(self.server.node_ids),
            )
            self.context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"node {ident!r} is not served on this socket",
            )
        self.node = ident
        self.cache._watch(ident, self.q)
        log.info("xds: %s connected (%s)", ident, type(self).__name__.strip("_"))

    def run(self) -> Iterator[Any]:
        threading.Thread(target=self._read, name="xds-reader", daemon=True).start()
        self.context.add_callback(lambda: self.q.put(_END))
        try:
            while True:
                item = self.q.get()
                if item is _END:
                    return
                if item is _CHANGED:
                    if self.node:
                        yield from self.on_change()
                    continue
                if not self.node:
                    self._authenticate(item)
                yield from self.on_request(item)
        finally:
            if self.node:
                self.cache._unwatch(self.node, self.q)
                log.info("xds: %s disconnected", self.node)

    def ordered(self, types: Iterable[str]) -> list[str]:
        rank = {t: i for i, t in enumerate(PUSH_ORDER)}
        return sorted(types, key=lambda t: (rank.get(t, len(rank)), t))

    def on_request(self, req: Any) -> Iterator[Any]:
        raise NotImplementedError

    def on_change(self) -> Iterator[Any]:
        raise NotImplementedError


@dataclasses.dataclass
class _SotwWatch:
    names: frozenset[str]
    sent_version: str | None = None
    nonce: str = ""
    nonce_version: str = ""


class _SotwStream(_Stream):
    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.watches: dict[str, _SotwWatch] = {}

    def on_request(self, req: Any) -> Iterator[Any]:
        t = req.type_url
        w = self.watches.get(t)
        if w is not None and req.response_nonce and req.response_nonce != w.nonce:
            return  # stale: answers a response already superseded
        if w is not None and req.response_nonce:
            if req.HasField("error_detail") and req.error_detail.code != 0:
                self.cache._record_nack(
                    self.node, t, w.nonce_version, req.error_detail.message or "(no message)"
                )
            else:
                self.cache._record_ack(self.node, t, w.nonce_version)
        names = frozenset(req.resource_names)
        if w is None or names != w.names:
            self.watches[t] = w = _SotwWatch(names, None if w is None else w.sent_version)
            yield from self.respond(t, force=True)

    def on_change(self) -> Iterator[Any]:
        for t in self.ordered(self.watches):
            yield from self.respond(t, force=False)

    def respond(self, t: str, force: bool) -> Iterator[Any]:
        w = self.watches[t]
        snap = self.cache.get(self.node, t)
        if snap is None or (not force and w.sent_version == snap.version):
            return
        if t in WILDCARD_TYPES and (not w.names or "*" in w.names):
            resources = list(snap.resources.values())
        else:
            resources = [snap.resources[n] for n in sorted(w.names) if n in snap.resources]
        w.nonce, w.nonce_version, w.sent_version = self.nonce(), snap.version, snap.version
        self.cache._record_sent(self.node, t, snap.version)
        yield discovery_pb2.DiscoveryResponse(
            version_info=snap.version, resources=resources, type_url=t, nonce=w.nonce
        )


@dataclasses.dataclass
class _DeltaWatch:
    wildcard: bool
    names: set[str]
    known: dict[str, str]  # what Envoy has: name -> version
    nonce: str = ""
    nonce_version: str = ""
    answered: bool = False


class _DeltaStream(_Stream):
    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.watches: dict[str, _DeltaWatch] = {}

    def on_request(self, req: Any) -> Iterator[Any]:
        t = req.type_url
        w = self.watches.get(t)
        subscribe = set(req.resource_names_subscribe)
        if w is None:
            w = _DeltaWatch(
                wildcard=t in WILDCARD_TYPES and (not subscribe or "*" in subscribe),
                names=set(),
                known=dict(req.initial_resource_versions),
            )
            self.watches[t] = w
        elif req.response_nonce and req.response_nonce == w.nonce:
            if req.HasField("error_detail") and req.error_detail.code != 0:
                self.cache._record_nack(
                    self.node, t, w.nonce_version, req.error_detail.message or "(no message)"
                )
            else:
                self.cache._record_ack(self.node, t, w.nonce_version)
        if "*" in subscribe:
            w.wildcard = True
        w.names |= subscribe - {"*"}
        for n in req.resource_names_unsubscribe:
            if n == "*":
                w.wildcard = False
            w.names.discard(n)
            w.known.pop(n, None)
        if not w.answered or subscribe:
            yield from self.respond(t)

    def on_change(self) -> Iterator[Any]:
        for t in self.ordered(self.watches):
            yield from self.respond(t)

    def respond(self, t: str) -> Iterator[Any]:
        w = self.watches[t]
        snap = self.cache.get(self.node, t)
        if snap is None:
            return
        in_scope = set(snap.resources) if w.wildcard else (w.names & set(snap.resources))
        changed = sorted(n for n in in_scope if w.known.get(n) != snap.versions[n])
        removed = sorted(n for n in w.known if n not in snap.resources)
        if not changed and not removed and w.answered:
            return
        for n in changed:
            w.known[n] = snap.versions[n]
        for n in removed:
            del w.known[n]
        w.answered = True
        w.nonce, w.nonce_version = self.nonce(), snap.version
        self.cache._record_sent(self.node, t, snap.version)
        yield discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=snap.version,
            type_url=t,
            nonce=w.nonce,
            resources=[
                discovery_pb2.Resource(name=n, version=snap.versions[n], resource=snap.resources[n])
                for n in changed
            ],
            removed_resources=removed,
        )


class AdsServicer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """AggregatedDiscoveryService for the node ids one socket serves."""

    def __init__(self, cache: SnapshotCache, node_ids: Iterable[str], name: str = "") -> None:
        self.cache = cache
        self.node_ids = frozenset(node_ids)
        self.name = name

    def allows(self, node: str) -> bool:
        return node in self.node_ids

    def StreamAggregatedResources(
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        return _SotwStream(self, request_iterator, context).run()

    def DeltaAggregatedResources(
        self, request_iterator: Iterator[Any], context: grpc.ServicerContext
    ) -> Iterator[Any]:
        return _DeltaStream(self, request_iterator, context).run()


class XdsServer:
    """ADS (and, given ``access_log``, Envoy's access log service) on one
    unix socket for one waypoint (or a set of node ids), on grpc's threads."""

    def __init__(
        self,
        cache: SnapshotCache,
        path: str | os.PathLike[str],
        node_ids: Iterable[str],
        *,
        owner: tuple[int, int] | None = None,
        peer_check: PeerCheck | None = None,
        max_streams: int = 8,
        access_log: Sink | None = None,
    ) -> None:
        self.cache = cache
        self.path = Path(path)
        self.owner = owner
        self.servicer = AdsServicer(cache, node_ids, name=str(self.path))
        # Envoy's access logs on the same socket and server: the same gate and node ids
        self.als = (
            AccessLogServicer(self.servicer.node_ids, access_log, name=str(self.path))
            if access_log is not None
            else None
        )
        self._server: grpc.Server | None = None
        self.max_streams = max_streams  # each stream holds one pool thread while open
        self.gate: PeerGate | None = None
        if peer_check is not None:
            # grpc listens where no pod can reach it; the gate owns the mounted path
            self.gate = PeerGate(
                self.path, self.path.with_name(f".{self.path.name}.grpc"), peer_check
            )

    @property
    def grpc_path(self) -> Path:
        return self.gate.private if self.gate is not None else self.path

    def start(self) -> None:
        # 0700 directory first: the socket file is created by grpc with the
        # umask's mode, and nobody else can reach it before the chmod below.
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.path.parent, 0o700)
        for p in {self.path, self.grpc_path}:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()  # a stale socket from a previous agent
        server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=self.max_streams, thread_name_prefix=f"xds-{self.path.stem}"
            ),
            maximum_concurrent_rpcs=self.max_streams,
        )
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self.servicer, server)
        if self.als is not None:
            add_access_log_servicer(self.als, server)
        server.add_insecure_port(f"unix:{self.grpc_path}")
        server.start()
        os.chmod(self.grpc_path, 0o600)
        self._server = server
        if self.gate is not None:
            self.gate.start()
        if self.owner is not None:
            os.chown(self.path, *self.owner)
        log.info("xds: serving %s on %s", sorted(self.servicer.node_ids), self.path)

    def stop(self, grace: float = 1.0) -> None:
        if self.gate is not None:
            self.gate.stop()
        if self._server is not None:
            self._server.stop(grace).wait(grace + 1)
            self._server = None
        for p in {self.path, self.grpc_path}:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    def __enter__(self) -> XdsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
