"""The local file: one YAML file describes a node's agent settings, the
namespaces (with their labels), the workloads, services and policies.  It is
a source like the Kubernetes watchers (ztunnel's LOCAL_XDS_PATH plays the
same part): it writes the same Snapshot, so the agent runs without a
cluster, and the demo and the tests drive it this way.

Reading is bounded, because the file (and every file in `policyFiles`) is
operator input the agent must survive: at most MAX_FILE_BYTES per file,
MAX_DEPTH levels of nesting, MAX_ALIASES YAML aliases, MAX_NODES nodes once aliases
are expanded (an alias bomb expands exponentially); any failure, of whatever class, is a
ConfigError with a short message, and the watcher keeps the last good
snapshot and keeps watching.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from agent.model import (
    FOR_VALUES,
    AgentSettings,
    IdentitySettings,
    NodeSettings,
    Service,
    ServicePort,
    Snapshot,
    Waypoint,
    Workload,
)
from agent.model.settings import MAX_TUNNEL_LOOPS

log = logging.getLogger(__name__)

MAX_FILE_BYTES = 8 << 20
MAX_DEPTH = 64
MAX_ALIASES = 256
MAX_NODES = 2_000_000
MAX_ERROR_CHARS = 400
POLL_INTERVAL = 1.0


class ConfigError(ValueError):
    """A field of the local file is wrong; the message names it and says what fits."""


@dataclasses.dataclass(frozen=True)
class LocalFile:
    settings: NodeSettings
    snapshot: Snapshot
    files: tuple[Path, ...] = ()  # every file read (the main file and its policyFiles)


def short(text: object, limit: int = MAX_ERROR_CHARS) -> str:
    """An error message of bounded size (a document's repr can be megabytes)."""
    s = str(text)
    return s if len(s) <= limit else s[: limit - 20] + f"... ({len(s)} chars)"


class _BoundedLoader(yaml.SafeLoader):
    """yaml.SafeLoader with limits on nesting, aliases and the document's
    size once aliases are expanded (what anything walking it will see:
    PyYAML shares aliased objects, so a billion-laughs document loads in
    microseconds and explodes in the first code that walks or prints it)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._aliases = 0
        self._size: dict[int, int] = {}  # id(node) -> expanded node count

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise ConfigError(f"more than {MAX_ALIASES} YAML aliases")
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise ConfigError(f"YAML nested deeper than {MAX_DEPTH} levels")
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if id(node) not in self._size:
            size = 1
            if isinstance(node, yaml.SequenceNode):
                size += sum(self._size.get(id(c), 1) for c in node.value)
            elif isinstance(node, yaml.MappingNode):
                size += sum(
                    self._size.get(id(k), 1) + self._size.get(id(v), 1) for k, v in node.value
                )
            if size > MAX_NODES:
                raise ConfigError(f"YAML expands to more than {MAX_NODES} nodes (an alias bomb?)")
            self._size[id(node)] = size
        return node


def read_yaml(path: Path, *, many: bool = False) -> Any:
    """Read one YAML file (or all its documents) within the limits; every
    failure is a ConfigError naming the file."""
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read {short(path, 200)}: {e.strerror}") from e
    except ValueError:  # an embedded NUL byte
        raise ConfigError(f"{short(path, 200)!r} is not a file name") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_FILE_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path} is not UTF-8 text (byte {e.start})") from None
    loader = _BoundedLoader(text)
    try:
        if many:
            docs = []
            while loader.check_data():  # type: ignore[no-untyped-call]
                docs.append(loader.get_data())
            return docs
        return loader.get_single_data()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {short(e)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None
    except Exception as e:  # e.g. ValueError from a timestamp like 2001-13-01
        raise ConfigError(f"{path}: {type(e).__name__}: {short(e)}") from None
    finally:
        loader.dispose()


def _str_list(v: Any, where: str) -> tuple[str, ...]:
    if v is None:
        return ()
    if not isinstance(v, list) or not all(isinstance(x, str | int) for x in v):
        raise ConfigError(f"{where}: expected a list of strings")
    return tuple(str(x) for x in v)


def _opt_str(v: Any, where: str) -> str | None:
    if v is None or isinstance(v, str):
        return v
    raise ConfigError(f"{where}: expected a string (a path or an address)")


def _list(v: Any, where: str) -> list[Any]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise ConfigError(f"{where}: expected a list")
    return v


def _port(v: Any, where: str) -> int:
    """A port number: an int or a string of at most 5 ASCII digits, 1-65535."""
    text = str(v) if isinstance(v, int | str) and not isinstance(v, bool) else ""
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and 0 < int(text) < 65536):
        raise ConfigError(f"{where}: {short(v, 40)!r} is not a port number (1-65535)")
    return int(text)


def _ports(v: Any, where: str) -> tuple[int, ...]:
    out = []
    for x in _str_list(v, where):
        if not (x.isascii() and x.isdigit() and len(x) <= 5) or not 0 < int(x) < 65536:
            raise ConfigError(f"{where}: {short(x, 40)!r} is not a port number (1-65535)")
        out.append(int(x))
    return tuple(out)


def _labels(v: Any, where: str) -> dict[str, str]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"{where}: expected a mapping of labels")
    return {str(k): str(x) for k, x in v.items()}


def _named_with_addresses(d: Any, where: str) -> tuple[str, ...]:
    """Common to workloads and services: a mapping with name, namespace and
    a list of IP addresses; returns the addresses."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where}: expected a mapping")
    for field in ("name", "namespace"):
        if not isinstance(d.get(field), str) or not d[field]:
            raise ConfigError(f"{where}.{field}: required string")
    addrs = _str_list(d.get("addresses"), f"{where}.addresses")
    for a in addrs:
        try:
            ipaddress.ip_address(a)
        except ValueError:
            raise ConfigError(f"{where}.addresses: {short(a, 60)!r} is not an IP address") from None
    return addrs


def _workload(d: Any, i: int, node: str) -> Workload:
    where = f"workloads[{i}]"
    addrs = _named_with_addresses(d, where)
    cidrs = _str_list(d.get("excludeOutboundCIDRs"), f"{where}.excludeOutboundCIDRs")
    for c in cidrs:
        try:
            ipaddress.ip_network(c, strict=False)
        except ValueError:
            raise ConfigError(
                f"{where}.excludeOutboundCIDRs: {short(c, 60)!r} is not a CIDR"
            ) from None
    return Workload(
        name=d["name"],
        namespace=d["namespace"],
        service_account=str(d.get("serviceAccount", "default")),
        node=str(d.get("node", node)),
        addresses=addrs,
        labels=_labels(d.get("labels"), f"{where}.labels"),
        netns=_opt_str(d.get("netns"), f"{where}.netns"),
        cgroup=_opt_str(d.get("cgroup"), f"{where}.cgroup"),
        exclude_outbound_ports=_ports(
            d.get("excludeOutboundPorts"), f"{where}.excludeOutboundPorts"
        ),
        exclude_inbound_ports=_ports(d.get("excludeInboundPorts"), f"{where}.excludeInboundPorts"),
        exclude_outbound_cidrs=cidrs,
    )


def _service(d: Any, i: int) -> Service:
    where = f"services[{i}]"
    addrs = _named_with_addresses(d, where)
    ports = []
    for j, p in enumerate(_list(d.get("ports"), f"{where}.ports")):
        pw = f"{where}.ports[{j}]"
        if not isinstance(p, dict) or "port" not in p:
            raise ConfigError(f"{pw}: expected a mapping with port (and targetPort)")
        port = _ports([p["port"]], f"{pw}.port")[0]
        target = _ports([p.get("targetPort", port)], f"{pw}.targetPort")[0]
        ports.append(ServicePort(port, target))
    return Service(
        d["name"],
        d["namespace"],
        addrs,
        tuple(ports),
        _labels(d.get("selector"), f"{where}.selector"),
        labels=_labels(d.get("labels"), f"{where}.labels"),
    )


_WAYPOINT_FIELDS = {
    "name",
    "namespace",
    "addresses",
    "node",
    "serviceAccount",
    "for",
    "netns",
    "cgroup",
}


def _waypoint(d: Any, i: int, node: str) -> Waypoint:
    """A waypoint as Istio runs one (a Gateway of class istio-waypoint and its
    pods): `for` is its istio.io/waypoint-for label, `addresses` its pods'
    IPs (HBONE on 15008 there); none yet means traffic through it is refused."""
    where = f"waypoints[{i}]"
    addrs = _named_with_addresses(d, where)
    unknown = set(d) - _WAYPOINT_FIELDS
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {short(sorted(map(str, unknown)), 120)}; "
            f"known: {sorted(_WAYPOINT_FIELDS)}"
        )
    traffic_for = d.get("for", "service")
    if traffic_for not in FOR_VALUES:
        raise ConfigError(
            f"{where}.for: {short(traffic_for, 40)!r} is not one of {', '.join(FOR_VALUES)}"
        )
    for field in ("node", "serviceAccount", "netns", "cgroup"):
        if d.get(field) is not None and not isinstance(d[field], str):
            raise ConfigError(f"{where}.{field}: expected a string")
    return Waypoint(
        name=d["name"],
        namespace=d["namespace"],
        addresses=addrs,
        node=d.get("node") or node,
        service_account=d.get("serviceAccount") or "",
        traffic_for=traffic_for,
        netns=_opt_str(d.get("netns"), f"{where}.netns"),
        cgroup=_opt_str(d.get("cgroup"), f"{where}.cgroup"),
    )


def _waypoints(v: Any, node: str) -> tuple[Waypoint, ...]:
    out: list[Waypoint] = []
    seen: dict[str, int] = {}
    for i, d in enumerate(v or []):
        wp = _waypoint(d, i, node)
        if wp.key in seen:
            raise ConfigError(
                f"waypoints[{i}]: {wp.key} is already defined by waypoints[{seen[wp.key]}]"
            )
        seen[wp.key] = i
        out.append(wp)
    return tuple(out)


def _policies(doc: dict[str, Any], base: Path | None) -> tuple[tuple[Any, ...], tuple[Path, ...]]:
    """Inline documents and those of every policyFiles entry, as given.  A
    non-mapping entry (a list where a document was expected) is passed on
    for the policy loader to report and fail closed on, never dropped: it may
    hold a DENY.  A file that cannot be read fails the whole load (its
    documents cannot be told apart from deleted ones)."""
    out: list[Any] = []
    files: list[Path] = []
    inline = doc.get("policies") or []
    if not isinstance(inline, list):
        raise ConfigError("policies: expected a list of Istio documents")
    out.extend(p for p in inline if p is not None)
    names = doc.get("policyFiles") or []
    if not isinstance(names, list):
        raise ConfigError("policyFiles: expected a list of file names")
    for i, f in enumerate(names):
        path = Path(str(f))
        if base is not None and not path.is_absolute():
            path = base / path
        files.append(path)
        try:
            docs = read_yaml(path, many=True)
        except ConfigError as e:
            raise ConfigError(f"policyFiles[{i}]: {e}") from None
        out.extend(d for d in docs if d is not None)  # an empty document is nothing
    return tuple(out), tuple(files)


_AGENT_FIELDS = {
    "pinDir",
    "stateDir",
    "cgroup",
    "kubeletCgroups",
    "skMsg",
    "adminPort",
    "readyPort",
    "metricsPort",
    "podCgroupRoot",
    "requireWaypoint",
    "waypointAccessLog",
    "waypointDeployer",
    "waypointImage",
    "tunnelLoops",
}


def _bool(v: Any, where: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{where}: expected true or false, got {short(v, 40)!r}")
    return v


def _agent_settings(a: Any) -> AgentSettings:
    if not isinstance(a, dict):
        raise ConfigError("agent: expected a mapping")
    unknown = set(a) - _AGENT_FIELDS
    if unknown:
        raise ConfigError(
            f"agent: unknown field(s) {short(sorted(map(str, unknown)), 120)}; "
            f"known: {sorted(_AGENT_FIELDS)}"
        )
    return AgentSettings(
        pin_dir=str(a.get("pinDir", AgentSettings.pin_dir)),
        state_dir=str(a.get("stateDir", AgentSettings.state_dir)),
        cgroup=_opt_str(a.get("cgroup"), "agent.cgroup"),
        kubelet_cgroups=_str_list(a.get("kubeletCgroups"), "agent.kubeletCgroups"),
        pod_cgroup_root=_opt_str(a.get("podCgroupRoot"), "agent.podCgroupRoot"),
        sk_msg=bool(a.get("skMsg", False)),
        admin_port=_port(a.get("adminPort", 15000), "agent.adminPort"),
        ready_port=_port(a.get("readyPort", 15021), "agent.readyPort"),
        metrics_port=_port(a.get("metricsPort", 15020), "agent.metricsPort"),
        require_waypoint=_bool(a.get("requireWaypoint", True), "agent.requireWaypoint"),
        waypoint_access_log=_bool(a.get("waypointAccessLog", True), "agent.waypointAccessLog"),
        waypoint_deployer=_bool(a.get("waypointDeployer", True), "agent.waypointDeployer"),
        waypoint_image=_opt_str(a.get("waypointImage"), "agent.waypointImage"),
        tunnel_loops=_loops(a.get("tunnelLoops", 1)),
    )


def _loops(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= MAX_TUNNEL_LOOPS:
        raise ConfigError(
            f"agent.tunnelLoops: expected a whole number from 1 to {MAX_TUNNEL_LOOPS} (event loops "
            f"serving the tunnel, one thread each; about one per core), got {short(v, 40)!r}"
        )
    return v


def _identity_settings(ident: Any) -> IdentitySettings:
    if not isinstance(ident, dict):
        raise ConfigError(
            "identity: expected a mapping (trustDomain, caDir | caAddress, "
            "caRootFile, tokenFile, certTTL)"
        )
    raw_ttl = ident.get("certTTL")
    try:
        ttl = float(raw_ttl) if raw_ttl is not None and not isinstance(raw_ttl, bool) else None
    except (TypeError, ValueError, OverflowError):
        ttl = -1.0
    if raw_ttl is not None and (ttl is None or not 1 <= ttl <= 10 * 365 * 86400):
        raise ConfigError("identity.certTTL: expected seconds, a number from 1 to 315360000")
    identity = IdentitySettings(
        trust_domain=str(ident.get("trustDomain", "cluster.local")),
        ca_dir=_opt_str(ident.get("caDir"), "identity.caDir"),
        cert_ttl=ttl,
        ca_address=_opt_str(ident.get("caAddress"), "identity.caAddress"),
        ca_root_file=_opt_str(ident.get("caRootFile"), "identity.caRootFile"),
        token_file=_opt_str(ident.get("tokenFile"), "identity.tokenFile"),
        ca_plaintext=bool(ident.get("caPlaintext", False)),
    )
    if identity.ca_address and identity.ca_dir:
        raise ConfigError("identity: give caDir (embedded CA) or caAddress (remote CA), not both")
    return identity


def parse(doc: Any, base: Path | None = None) -> LocalFile:
    if not isinstance(doc, dict):
        raise ConfigError("the file must be a YAML mapping with node, agent, namespaces, workloads")
    node = doc.get("node")
    if not isinstance(node, str) or not node:
        raise ConfigError("node: required, the name of the node this agent runs on")
    settings = NodeSettings(
        node,
        _agent_settings(doc.get("agent") or {}),
        _identity_settings(doc.get("identity") or {}),
    )
    namespaces: dict[str, dict[str, str]] = {}
    for key in ("workloads", "services", "namespaces", "waypoints"):
        if not isinstance(doc.get(key) or [], list):
            raise ConfigError(f"{key}: expected a list")
    for i, ns in enumerate(doc.get("namespaces") or []):
        if not isinstance(ns, dict) or not isinstance(ns.get("name"), str):
            raise ConfigError(f"namespaces[{i}]: expected a mapping with a name")
        namespaces[ns["name"]] = _labels(ns.get("labels"), f"namespaces[{i}].labels")
    workloads = tuple(_workload(w, i, node) for i, w in enumerate(doc.get("workloads") or []))
    services = tuple(_service(s, i) for i, s in enumerate(doc.get("services") or []))
    waypoints = _waypoints(doc.get("waypoints"), node)
    policies, files = _policies(doc, base)
    snapshot = Snapshot(node, namespaces, workloads, services, policies, waypoints)
    return LocalFile(settings, snapshot, files)


def load(path: str | Path) -> LocalFile:
    """Read and check the file and its policy files.  Any failure, whatever
    its class, is a ConfigError with a bounded message."""
    path = Path(path)
    try:
        lf = parse(read_yaml(path), path.parent)
    except ConfigError:
        raise
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    except Exception as e:  # a careless or hostile file must never escape as a crash
        raise ConfigError(f"{path}: {type(e).__name__}: {short(e)}") from None
    return dataclasses.replace(lf, files=(path, *lf.files))


def _fingerprint(files: tuple[Path, ...]) -> tuple[tuple[str, float, int, int], ...]:
    out = []
    for f in files:
        try:
            st = os.stat(f)
            out.append((str(f), st.st_mtime, st.st_size, st.st_ino))
        except OSError:
            out.append((str(f), -1.0, -1, -1))
    return tuple(out)


class LocalFileSource:
    """Watches the file and every file it names (policyFiles), and hands each
    new good snapshot to the agent.  Parsing runs on a worker thread, off the
    data-plane loop; a bad edit is reported (`describe()`, the log) and the
    last good snapshot stays in force; nothing stops the watch."""

    def __init__(self, path: str | Path, first: LocalFile) -> None:
        self.path = Path(path)
        self.current = first
        self.error: str | None = None
        self.reloads = 0
        self._seen = _fingerprint(first.files or (self.path,))

    def changed(self) -> bool:
        return _fingerprint(self.current.files or (self.path,)) != self._seen

    async def watch(
        self, on_snapshot: Callable[[Snapshot], Any], interval: float = POLL_INTERVAL
    ) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            try:
                await self.poll(loop, on_snapshot)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # the watch must never die
                log.exception("local file watch: unexpected %s; still watching", type(e).__name__)

    async def poll(
        self, loop: asyncio.AbstractEventLoop, on_snapshot: Callable[[Snapshot], Any]
    ) -> bool:
        """Reload if any watched file changed; True if a new snapshot was applied."""
        if not self.changed():
            return False
        seen = _fingerprint(self.current.files or (self.path,))
        try:
            lf = await loop.run_in_executor(None, load, self.path)
        except ConfigError as e:
            self._seen = seen
            self.error = str(e)
            log.error("config reload failed, keeping the last good one: %s", e)
            return False
        # Files seen before the read keep their earlier stamp, so an edit made
        # while we were reading shows as a change at the next poll.
        before = {f[0]: f for f in seen}
        self._seen = tuple(before.get(f[0], f) for f in _fingerprint(lf.files))
        self.current, self.error = lf, None
        self.reloads += 1
        result = on_snapshot(lf.snapshot)
        if asyncio.iscoroutine(result):
            await result
        return True

    def describe(self) -> dict[str, Any]:
        return {
            "file": str(self.path),
            "watched": [str(f) for f in self.current.files],
            "reloads": self.reloads,
            "error": self.error,
        }
