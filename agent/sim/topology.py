"""Simulated Kubernetes nodes and pods: one netns and one cgroup v2 dir per node and per pod.

(Over 600 lines on purpose: building and tearing down the testbed is one
lifecycle, and every kernel-global name it makes must be undone here.)

Layout (i = node index from 1, j = pod index on its node from 2)::

    netns <prefix>-fabric       br0 (L2 only), one veth n<i> per node
    netns <prefix>-<node>       fab0 10.99.0.<i>/24 fd00:99::<i>/64
                                br0  10.10.<i>.1/24 fd00:10:<i>::1/64 (pod gateway)
                                veth<j> (port of br0), forwarding on
    netns <prefix>-<node>-<pod> eth0 10.10.<i>.<j>/24 fd00:10:<i>::<j>/64, default routes

    cgroup <root>/<prefix>/<node>/{kubelet,agent}/ and <root>/<prefix>/<node>/pods/<pod>/

The per-run prefix is in every kernel-global name, so concurrent runs never
collide and a crashed run can be swept with :func:`cleanup_prefix`.  Interface
names live inside the namespaces and need no prefix.  Nothing is created in the
caller's own network namespace.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pyroute2 import IPRoute

from agent.cgroupfs import cgroup2_root, make_cgroup, remove_cgroup
from agent.netns import create_netns, delete_netns, entered, libc, list_netns, setns_fd

IFA_F_NODAD = 0x02
IFA_F_TENTATIVE = 0x40
READY_TIMEOUT_S = 5.0
FABRIC_SUBNET4 = "10.99.0.0/24"
FABRIC_SUBNET6 = "fd00:99::/64"
MAX_NODES = 254
MAX_PODS_PER_NODE = 253  # j = 2..254

_PREFIX_RE = re.compile(r"^[a-z0-9]{2,16}$")
_RUN_ID_RE = re.compile(r"^[a-z0-9]+$")
_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
_TERM_WAIT_S = 3.0
_KILL_WAIT_S = 3.0


def random_prefix(stem: str = "tt") -> str:
    """A fresh run prefix: ``stem`` + 5 random hex chars (e.g. ``tt3fa9c``)."""
    return stem + secrets.token_hex(3)[:5]


def _check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix):
        raise ValueError(
            f"invalid prefix {prefix!r}: use 2-16 chars of [a-z0-9] (e.g. random_prefix())"
        )
    return prefix


def _check_name(kind: str, name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(
            f"invalid {kind} name {name!r}: use 1-32 chars of [a-z0-9-], "
            "starting and ending with a letter or digit"
        )
    return name


class SpawnTarget(Protocol):
    """Anything with a netns and a cgroup a process can be started in."""

    @property
    def netns_path(self) -> Path: ...

    @property
    def cgroup_path(self) -> Path: ...


@dataclass(frozen=True)
class NodeRole:
    """A node-level process slot (``kubelet`` or ``agent``): node netns, own cgroup."""

    node: str
    role: str
    netns_path: Path
    cgroup_path: Path


@dataclass(frozen=True)
class Pod:
    """A simulated pod: its identity (as the agent would learn it) and where it lives."""

    name: str
    namespace: str
    service_account: str
    node: str
    index: int
    ip4: str
    ip6: str
    netns_name: str
    netns_path: Path
    cgroup_path: Path
    host_ifname: str  # node-side veth, a port of the node's br0

    def describe(self) -> dict[str, Any]:
        """Plain-dict view for JSON output."""
        return {
            "name": self.name,
            "namespace": self.namespace,
            "service_account": self.service_account,
            "node": self.node,
            "ip4": self.ip4,
            "ip6": self.ip6,
            "netns": self.netns_name,
            "netns_path": str(self.netns_path),
            "cgroup": str(self.cgroup_path),
            "host_ifname": self.host_ifname,
            "ifname": "eth0",
        }


@contextlib.contextmanager
def _rtnl(netns_path: Path) -> Iterator[Any]:
    """An IPRoute whose netlink socket is bound to ``netns_path``.

    The socket is opened by this thread while inside the netns (no fork, unlike
    ``IPRoute(netns=...)``) and keeps working there after the thread leaves.
    """
    with entered(netns_path):
        ipr = IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def _sysctl(netns_path: Path, values: dict[str, str]) -> None:
    """Set net.* sysctls of one netns (/proc/sys/net follows the writing thread's netns)."""
    with entered(netns_path):
        for key, value in values.items():
            Path("/proc/sys", *key.split(".")).write_text(value, encoding="ascii")


def _ifindex(ipr: Any, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise RuntimeError(f"interface {ifname} not found after creating it")
    return int(found[0])


def _add_veth_into(ipr: Any, ifname: str, index: int, peer_ifname: str, peer_netns: Path) -> int:
    """Create veth ``ifname`` (ifindex ``index``) here, its peer directly in ``peer_netns``.

    The peer never appears in this namespace, so its final name (e.g. ``eth0``)
    cannot clash here and no rename is needed.  The explicit ifindex (>= 100,
    peers get small ones) keeps the two ends' ifindexes different: the kernel's
    linkwatch treats a carrier change as urgent only when a device's ifindex
    differs from its iflink (the peer's ifindex), otherwise it is delayed up to
    a second, and so are operstate UP and IPv6 addresses leaving "tentative".
    """
    fd = os.open(peer_netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        ipr.link(
            "add",
            ifname=ifname,
            index=index,
            kind="veth",
            peer={"ifname": peer_ifname, "net_ns_fd": fd},
        )
    finally:
        os.close(fd)
    return _ifindex(ipr, ifname)


def _add_addrs(ipr: Any, index: int, ip4: str, len4: int, ip6: str, len6: int) -> None:
    """Add a v4 and a v6 address; v6 with NODAD so it is usable at once."""
    ipr.addr("add", index=index, address=ip4, prefixlen=len4)
    ipr.addr("add", index=index, address=ip6, prefixlen=len6, flags=IFA_F_NODAD)


def _wait_usable(ipr: Any, index: int, what: str, timeout: float = READY_TIMEOUT_S) -> None:
    """Wait until a link is operationally up and none of its IPv6 addresses is tentative.

    With distinct veth ifindexes (see _add_veth_into) and NODAD this holds at
    once; checking keeps "usable as soon as add_* returns" true regardless.
    """
    deadline = time.monotonic() + timeout
    while True:
        links = ipr.get_links(index)
        oper = links[0].get_attr("IFLA_OPERSTATE") if links else None
        tentative = [
            m.get_attr("IFA_ADDRESS")
            for m in ipr.get_addr(index=index)
            if (m.get_attr("IFA_FLAGS") or m["flags"]) & IFA_F_TENTATIVE
        ]
        if oper == "UP" and not tentative:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{what} not usable after {timeout:g}s: operstate {oper}, tentative {tentative}"
            )
        time.sleep(0.01)


_NO_DAD = {
    "net.ipv6.conf.all.accept_dad": "0",
    "net.ipv6.conf.default.accept_dad": "0",
}


def spawn_in(target: SpawnTarget, argv: Sequence[str], **popen_kw: Any) -> subprocess.Popen[Any]:
    """Start ``argv`` inside ``target``'s netns and cgroup (not recorded anywhere).

    The child joins the cgroup and the netns in ``preexec_fn``, i.e. before it
    execs, so no instant of its program runs outside them.  A caller's own
    ``preexec_fn`` runs afterwards.
    """
    if isinstance(argv, (str, bytes)):
        raise TypeError("argv must be a list of arguments, not a string")
    procs = Path(target.cgroup_path) / "cgroup.procs"
    if not procs.exists():
        raise FileNotFoundError(f"cgroup {target.cgroup_path} does not exist")
    if not Path(target.netns_path).exists():
        raise FileNotFoundError(f"netns {target.netns_path} does not exist")
    user_preexec: Callable[[], object] | None = popen_kw.pop("preexec_fn", None)
    procs_bytes = os.fsencode(procs)
    ns_fd = os.open(target.netns_path, os.O_RDONLY | os.O_CLOEXEC)

    def _enter() -> None:
        fd = os.open(procs_bytes, os.O_WRONLY)
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)
        setns_fd(ns_fd)
        if user_preexec is not None:
            user_preexec()

    try:
        libc()  # loaded lazily; load it before fork, not in the child
        return subprocess.Popen(list(argv), preexec_fn=_enter, **popen_kw)
    finally:
        os.close(ns_fd)


@dataclass
class Node:
    """A simulated node: netns with a pod bridge, linked to the fabric; cgroups per role."""

    testbed: Testbed = field(repr=False)
    name: str
    index: int
    netns_name: str
    netns_path: Path
    cgroup_path: Path
    kubelet: NodeRole
    agent: NodeRole
    pods: dict[str, Pod] = field(default_factory=dict)

    @property
    def fabric_ip4(self) -> str:
        return f"10.99.0.{self.index}"

    @property
    def fabric_ip6(self) -> str:
        return f"fd00:99::{self.index}"

    @property
    def gateway4(self) -> str:
        return f"10.10.{self.index}.1"

    @property
    def gateway6(self) -> str:
        return f"fd00:10:{self.index}::1"

    @property
    def pod_cidr4(self) -> str:
        return f"10.10.{self.index}.0/24"

    @property
    def pod_cidr6(self) -> str:
        return f"fd00:10:{self.index}::/64"

    def add_pod(
        self,
        name: str,
        namespace: str = "default",
        service_account: str = "default",
        uid: str | None = None,
    ) -> Pod:
        """Create a pod on this node (netns, veth to br0, addresses, routes, cgroup).

        With a Kubernetes pod uid, the cgroup is laid out as the kubelet's
        cgroupfs driver does (`<node>/kubepods/besteffort/pod<uid>`), so the
        agent's pod discovery finds it as on a real node."""
        return self.testbed._add_pod(self, name, namespace, service_account, uid)

    def describe(self) -> dict[str, Any]:
        """Plain-dict view for JSON output."""
        return {
            "name": self.name,
            "index": self.index,
            "netns": self.netns_name,
            "netns_path": str(self.netns_path),
            "cgroup": str(self.cgroup_path),
            "kubelet_cgroup": str(self.kubelet.cgroup_path),
            "agent_cgroup": str(self.agent.cgroup_path),
            "fabric_ifname": "fab0",
            "fabric_ip4": self.fabric_ip4,
            "fabric_ip6": self.fabric_ip6,
            "bridge": "br0",
            "gateway4": self.gateway4,
            "gateway6": self.gateway6,
            "pod_cidr4": self.pod_cidr4,
            "pod_cidr6": self.pod_cidr6,
            "pods": [p.describe() for p in self.pods.values()],
        }


@dataclass
class _Spawned:
    proc: subprocess.Popen[Any]
    argv: list[str]
    where: str


class Testbed:
    """A set of simulated nodes and pods, all torn down by :meth:`close`.

    Resources are recorded as soon as they exist, so closing a half-built
    testbed (e.g. after a failed ``add_pod``) still removes everything.  Use
    from one thread at a time for building; ``spawn`` and ``close`` are locked.
    """

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = _check_prefix(prefix if prefix is not None else random_prefix())
        self.cgroup_base = cgroup2_root() / self.prefix
        self.fabric_netns_name = f"{self.prefix}-fabric"
        self.nodes: dict[str, Node] = {}
        self._fabric: Path | None = None
        self._netns: list[str] = []
        self._cgroups: list[Path] = []
        self._spawned: list[_Spawned] = []
        self._lock = threading.RLock()
        self._closed = False

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- building ---------------------------------------------------------

    def _new_netns(self, name: str) -> Path:
        if self._closed:
            raise RuntimeError(f"testbed {self.prefix} is closed")
        try:
            path = create_netns(name)
        except FileExistsError as e:
            raise FileExistsError(
                f"netns {name} already exists (leftover of a crashed run? "
                f"agent.sim.topology.cleanup_prefix({self.prefix!r}))"
            ) from e
        self._netns.append(name)
        return path

    def _new_cgroup(self, path: Path) -> Path:
        made = make_cgroup(path)
        self._cgroups.append(made)
        return made

    def _ensure_fabric(self) -> Path:
        if self._fabric is not None:
            return self._fabric
        if self.cgroup_base.exists():
            raise FileExistsError(
                f"cgroup {self.cgroup_base} already exists (leftover of a crashed run? "
                f"agent.sim.topology.cleanup_prefix({self.prefix!r}))"
            )
        self._new_cgroup(self.cgroup_base)
        path = self._new_netns(self.fabric_netns_name)
        _sysctl(path, _NO_DAD)
        with _rtnl(path) as ipr:
            ipr.link("set", index=_ifindex(ipr, "lo"), state="up")
            ipr.link("add", ifname="br0", kind="bridge")
            ipr.link("set", index=_ifindex(ipr, "br0"), state="up")
        self._fabric = path
        return path

    def add_node(self, name: str) -> Node:
        """Create a node joined to the fabric, with routes to and from every other node."""
        _check_name("node", name)
        if name in self.nodes:
            raise ValueError(f"node {name} already exists in testbed {self.prefix}")
        if name == "fabric":
            raise ValueError("node name 'fabric' is reserved for the fabric netns")
        index = len(self.nodes) + 1
        if index > MAX_NODES:
            raise ValueError(f"at most {MAX_NODES} nodes per testbed")
        fabric = self._ensure_fabric()
        cg = self._new_cgroup(self.cgroup_base / name)
        kubelet = self._new_cgroup(cg / "kubelet")
        agent = self._new_cgroup(cg / "agent")
        self._new_cgroup(cg / "pods")
        ns_name = f"{self.prefix}-{name}"
        path = self._new_netns(ns_name)
        node = Node(
            testbed=self,
            name=name,
            index=index,
            netns_name=ns_name,
            netns_path=path,
            cgroup_path=cg,
            kubelet=NodeRole(name, "kubelet", path, kubelet),
            agent=NodeRole(name, "agent", path, agent),
        )
        _sysctl(
            path,
            {
                **_NO_DAD,
                "net.ipv4.ip_forward": "1",
                "net.ipv6.conf.all.forwarding": "1",
                "net.ipv6.conf.default.forwarding": "1",
            },
        )
        with _rtnl(path) as ipr:
            ipr.link("set", index=_ifindex(ipr, "lo"), state="up")
            ipr.link("add", ifname="br0", kind="bridge")
            br = _ifindex(ipr, "br0")
            ipr.link("set", index=br, state="up")
            _add_addrs(ipr, br, node.gateway4, 24, node.gateway6, 64)
        with _rtnl(fabric) as ipr:
            port = _add_veth_into(ipr, f"n{index}", 100 + index, "fab0", path)
            ipr.link("set", index=port, master=_ifindex(ipr, "br0"), state="up")
        with _rtnl(path) as ipr:
            fab0 = _ifindex(ipr, "fab0")
            _add_addrs(ipr, fab0, node.fabric_ip4, 24, node.fabric_ip6, 64)
            ipr.link("set", index=fab0, state="up")
            _wait_usable(ipr, fab0, f"fab0 of node {name}")
        for other in self.nodes.values():
            self._route_pods(node, other)
            self._route_pods(other, node)
        self.nodes[name] = node
        return node

    @staticmethod
    def _route_pods(src: Node, dst: Node) -> None:
        """In ``src``'s netns, route ``dst``'s pod subnets via ``dst``'s fabric address."""
        with _rtnl(src.netns_path) as ipr:
            ipr.route("add", dst=dst.pod_cidr4, gateway=dst.fabric_ip4)
            ipr.route("add", dst=dst.pod_cidr6, gateway=dst.fabric_ip6)

    def _add_pod(
        self, node: Node, name: str, namespace: str, service_account: str, uid: str | None = None
    ) -> Pod:
        _check_name("pod", name)
        if name in {p.name for n in self.nodes.values() for p in n.pods.values()}:
            raise ValueError(f"pod {name} already exists in testbed {self.prefix}")
        if self.nodes.get(node.name) is not node:
            raise ValueError(f"node {node.name} does not belong to testbed {self.prefix}")
        j = len(node.pods) + 2
        if j > MAX_PODS_PER_NODE + 1:
            raise ValueError(f"at most {MAX_PODS_PER_NODE} pods per node")
        cg = self._new_cgroup(
            node.cgroup_path / "kubepods" / "besteffort" / f"pod{uid}"
            if uid
            else node.cgroup_path / "pods" / name
        )
        ns_name = f"{self.prefix}-{node.name}-{name}"
        path = self._new_netns(ns_name)
        pod = Pod(
            name=name,
            namespace=namespace,
            service_account=service_account,
            node=node.name,
            index=j,
            ip4=f"10.10.{node.index}.{j}",
            ip6=f"fd00:10:{node.index}::{j}",
            netns_name=ns_name,
            netns_path=path,
            cgroup_path=cg,
            host_ifname=f"veth{j}",
        )
        # Before eth0 exists, so it inherits accept_dad=0 from "default".
        _sysctl(path, _NO_DAD)
        with _rtnl(node.netns_path) as ipr:
            host = _add_veth_into(ipr, pod.host_ifname, 100 + j, "eth0", path)
            ipr.link("set", index=host, master=_ifindex(ipr, "br0"), state="up")
        with _rtnl(path) as ipr:
            ipr.link("set", index=_ifindex(ipr, "lo"), state="up")
            eth0 = _ifindex(ipr, "eth0")
            _add_addrs(ipr, eth0, pod.ip4, 24, pod.ip6, 64)
            ipr.link("set", index=eth0, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=node.gateway4)
            ipr.route("add", dst="::/0", gateway=node.gateway6)
            _wait_usable(ipr, eth0, f"eth0 of pod {name}")
        node.pods[name] = pod
        return pod

    # -- use --------------------------------------------------------------

    @property
    def pods(self) -> list[Pod]:
        """All pods, node by node in creation order."""
        return [p for n in self.nodes.values() for p in n.pods.values()]

    def pod(self, name: str) -> Pod:
        """The pod called ``name`` (pod names are unique per testbed)."""
        for p in self.pods:
            if p.name == name:
                return p
        raise KeyError(f"no pod {name} in testbed {self.prefix}")

    def spawn(
        self, target: SpawnTarget, argv: Sequence[str], **popen_kw: Any
    ) -> subprocess.Popen[Any]:
        """Start ``argv`` in ``target``'s netns and cgroup; it is killed on close.

        ``target`` is a :class:`Pod` or a node role (``node.kubelet``, ``node.agent``).
        """
        if isinstance(target, Node):
            raise TypeError(
                f"spawn in a node role, e.g. node.agent or node.kubelet ({target.name})"
            )
        with self._lock:
            if self._closed:
                raise RuntimeError(f"testbed {self.prefix} is closed")
            proc = spawn_in(target, argv, **popen_kw)
            if isinstance(target, Pod):
                where = f"pod {target.name}"
            elif isinstance(target, NodeRole):
                where = f"node {target.node} {target.role}"
            else:
                where = str(target.cgroup_path)
            self._spawned.append(_Spawned(proc, [str(a) for a in argv], where))
            return proc

    def describe(self) -> dict[str, Any]:
        """The whole topology as a plain, JSON-ready dict."""
        with self._lock:
            return {
                "prefix": self.prefix,
                "cgroup_base": str(self.cgroup_base),
                "fabric": {
                    "netns": self.fabric_netns_name,
                    "netns_path": str(self._fabric) if self._fabric else None,
                    "bridge": "br0",
                    "subnet4": FABRIC_SUBNET4,
                    "subnet6": FABRIC_SUBNET6,
                },
                "nodes": [n.describe() for n in self.nodes.values()],
                "processes": [
                    {
                        "pid": s.proc.pid,
                        "argv": s.argv,
                        "where": s.where,
                        "returncode": s.proc.poll(),
                    }
                    for s in self._spawned
                ],
                "closed": self._closed,
            }

    snapshot = describe

    # -- teardown ---------------------------------------------------------

    def _stop_processes(self) -> None:
        live = [s.proc for s in self._spawned if s.proc.poll() is None]
        for p in live:
            with contextlib.suppress(ProcessLookupError):
                p.terminate()
        deadline = time.monotonic() + _TERM_WAIT_S
        for p in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
        for p in live:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=_KILL_WAIT_S)
        for s in self._spawned:
            for stream in (s.proc.stdin, s.proc.stdout, s.proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()

    def close(self) -> None:
        """Kill spawned processes, remove all netns and cgroups made; safe to repeat.

        Every step is attempted even if an earlier one fails; failures are then
        reported together.
        """
        with self._lock:
            self._closed = True
            errors: list[str] = []
            try:
                self._stop_processes()
            except Exception as e:  # keep going: leftovers are worse than a late error
                errors.append(f"stopping processes: {e}")
            try:
                if self._cgroups:
                    remove_cgroup(self.cgroup_base)
                self._cgroups.clear()
            except Exception as e:
                errors.append(f"removing cgroup {self.cgroup_base}: {e}")
            for name in reversed(list(self._netns)):
                try:
                    delete_netns(name)
                    self._netns.remove(name)
                except Exception as e:
                    errors.append(f"deleting netns {name}: {e}")
            if errors:
                raise RuntimeError(
                    f"testbed {self.prefix} teardown incomplete: " + "; ".join(errors)
                )


def cleanup_prefix(prefix: str) -> dict[str, list[str]]:
    """Remove netns and cgroup dirs of runs whose prefix starts with ``prefix``.

    For crashed runs that never reached ``close()``.  A run id is the netns name
    up to its first ``-`` or a top-level cgroup dir name, made of [a-z0-9] only,
    so a stem like ``"tt"`` sweeps every run while systemd's ``*.slice`` and
    ``*.scope`` cgroups can never match.  cgroups go first: that kills the run's
    processes, which would otherwise keep its namespaces alive.
    """
    _check_prefix(prefix)
    removed: dict[str, list[str]] = {"cgroups": [], "netns": []}
    root = cgroup2_root()
    for d in sorted(root.iterdir()):
        is_run = d.is_dir() and d.name.startswith(prefix) and _RUN_ID_RE.match(d.name)
        if is_run and remove_cgroup(d):
            removed["cgroups"].append(str(d))
    for name in list_netns():
        run_id = name.split("-", 1)[0]
        if run_id.startswith(prefix) and _RUN_ID_RE.match(run_id) and delete_netns(name):
            removed["netns"].append(name)
    return removed
