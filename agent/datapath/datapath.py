"""The node's datapath: attach tether's programs to enrolled pods and keep them
there across agent restarts.

Every kernel object is a BPF link pinned under the pin directory, so it
outlives the agent process: a restarted agent compiles the programs again,
adopts the pinned maps (their state carries over), and swaps each pinned
link to the new program atomically with BPF_LINK_UPDATE.  Capture never
stops, and nothing is attached twice.  What the kernel cannot hold (which
pod has which slot, which netns got routing rules) is kept in a small JSON
file in the state directory, written after every change.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from agent import netns
from agent.datapath import bpfsys, podnet
from agent.datapath.errors import DatapathError, PodError
from agent.datapath.loader import MAPS, PINNED_MAPS, PROGRAMS, BuildOptions, Programs
from agent.datapath.structs import (
    CFG_SKMSG,
    DIR_IN,
    DIR_OUT,
    LISTEN_PER_POD,
    POD_INBOUND,
    POD_OUTBOUND,
    Listen,
    Stat,
    TetherCfg,
    TetherIpKey,
    TetherNetKey,
    TetherPod,
    TetherPortKey,
    TetherTuple,
)

log = logging.getLogger(__name__)
#: the agent's own hooks (on its cgroup): pin name -> program
AGENT_LINKS = {
    "sockopt": "tether_sockopt",
    "agentops": "tether_agent_ops",
    "nsprobe": "tether_nsprobe",
}

# Hooks on each pod: pin name -> (program, attach type, target).
POD_CGROUP_HOOKS = {
    "connect4": "tether_connect4",
    "connect6": "tether_connect6",
    "peer4": "tether_peer4",
    "peer6": "tether_peer6",
    "sockops": "tether_sockops",
}
POD_NETNS_HOOKS = {"lookup": "tether_lookup"}
STATE_FILE = "pods.json"


@dataclasses.dataclass(frozen=True)
class PodSpec:
    """What the datapath needs to know of a pod to capture it."""

    key: str  # namespace/name, unique on the node
    netns: str  # netns file: /run/netns/NAME or /proc/PID/ns/net
    cgroup: str  # the pod's cgroup v2 directory
    ips: tuple[str, ...]
    exclude_out_ports: tuple[int, ...] = ()
    exclude_in_ports: tuple[int, ...] = ()
    exclude_out_cidrs: tuple[str, ...] = ()
    outbound: bool = True
    inbound: bool = True

    @property
    def pin_name(self) -> str:
        return self.key.replace("/", "_")


@dataclasses.dataclass
class Enrollment:
    """A captured pod as the kernel has it."""

    spec: PodSpec
    slot: int
    netns_cookie: int
    netns_ino: int
    links: dict[str, int]  # hook -> link id

    def record(self) -> dict[str, Any]:
        return {
            "spec": dataclasses.asdict(self.spec),
            "slot": self.slot,
            "netns_cookie": self.netns_cookie,
            "netns_ino": self.netns_ino,
            "links": self.links,
        }


@dataclasses.dataclass(frozen=True)
class DatapathConfig:
    build: BuildOptions = dataclasses.field(default_factory=BuildOptions)
    state_dir: str = "/run/tether"
    agent_cgroup: str | None = None  # where the agent's listeners are created
    kubelet_cgroups: tuple[str, ...] = ()  # health probes come from here
    skmsg: bool = False  # splice pod<->agent loopback hops with sk_msg


def _ncpus() -> int:
    """Possible CPUs: per-CPU map values have one slot for each."""
    text = Path("/sys/devices/system/cpu/possible").read_text().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


class DeliveryBypass:
    """The tunnel's per-connection write to the kernel, and its only one:
    the 4-tuple of each agent-to-app delivery goes into `tether_bypass`
    before connect() so the destination pod's sk_lookup lets it through
    (instead of steering it back to the agent), and leaves when the
    connection ends.  Everything else in the datapath changes only through
    the reconcile (enroll/unenroll)."""

    def __init__(self, dp: Datapath) -> None:
        self._dp = dp

    def add(self, src: tuple[str, int], dst: tuple[str, int]) -> None:
        bpfsys.map_update(self._dp._map("tether_bypass"), bytes(TetherTuple.of(src, dst)), b"\x01")

    def remove(self, src: tuple[str, int], dst: tuple[str, int]) -> None:
        bpfsys.map_delete(self._dp._map("tether_bypass"), bytes(TetherTuple.of(src, dst)))


class Datapath:
    """One writer of the node's BPF state.  Not thread-safe: call from one thread."""

    def __init__(self, config: DatapathConfig) -> None:
        self.config = config
        self.pin_dir = Path(config.build.pin_dir)
        self.state_dir = Path(config.state_dir)
        self.progs: Programs | None = None
        self.pods: dict[str, Enrollment] = {}
        self._adopted: dict[str, dict[str, Any]] = {}
        self.node_links: dict[str, int] = {}

    # -- lifecycle ---------------------------------------------------------

    def prepare(self) -> None:
        """Compile and load the programs, attaching nothing.

        The slow part of a start (BCC: a second or two on a host, a minute
        under TCG) touches no state a running predecessor uses - its pinned
        maps are opened, not changed - so a restarting agent does it before it
        takes the predecessor's sockets over: relays are frozen from the
        handoff to the first reconcile, and that window must not include a
        compile.  Idempotent; start() calls it if nobody did."""
        if self.progs is not None:
            return
        ensure_bpffs()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._drop_incompatible_pins()
        self.progs = Programs(self.config.build)

    def start(self) -> None:
        """Compile and load (unless prepare() did), adopt pinned state, attach
        the node-wide hooks."""
        self.prepare()
        self._adopted = self._read_state()
        cfg = TetherCfg(flags=CFG_SKMSG if self.config.skmsg else 0)
        bpfsys.map_update(self._map("tether_cfg"), bytes(ctypes.c_uint32(0)), bytes(cfg))
        if self.config.skmsg:
            bpfsys.prog_attach(
                self._map("tether_socks"),
                self._prog("tether_sk_msg"),
                bpfsys.AttachType.SK_MSG_VERDICT,
            )
        if self.config.agent_cgroup:
            self._attach_agent_links(self.config.agent_cgroup)
        for i, cg in enumerate(self.config.kubelet_cgroups):
            self.node_links[f"probe{i}"] = self._attach(
                self.pin_dir / "links" / f"probe{i}", "tether_probe", cg
            )
        log.info(
            "datapath ready: %d programs, pins in %s, %d pods to adopt",
            len(self._progs().prog_fds),
            self.pin_dir,
            len(self._adopted),
        )

    def close(self) -> None:
        """Release this process's fds.  Pinned links keep capturing: a
        successor adopts them; `tether cleanup` removes them."""
        if self.progs:
            self.progs.close()
            self.progs = None

    # -- pods --------------------------------------------------------------

    def enroll(self, spec: PodSpec, listeners: Mapping[Listen, socket.socket]) -> Enrollment:
        """Capture a pod's traffic.  Idempotent: enrolling an enrolled pod
        again (same agent or a restarted one) swaps in the new listeners.

        The listeners go in before the pod's addresses, so no inbound SYN is
        steered to a slot without a socket.  The delivery routing inside the
        pod (podnet) is the caller's to install first, and to remove after
        unenroll: it runs in a worker process the caller awaits (agent/pods.py).
        """
        check_pod(spec)
        cookie = netns_cookie(spec.netns, self._map("tether_nscookie"))
        slot = self._slot_for(spec)
        try:
            self._write_exclusions(slot, spec)
            for kind, sock in listeners.items():
                key = ctypes.c_uint32(slot * LISTEN_PER_POD + int(kind))
                bpfsys.sockmap_update(self._map("tether_listen"), bytes(key), sock.fileno())
            links: dict[str, int] = {}
            pod_pins = self.pin_dir / "pods" / spec.pin_name
            for hook, prog in POD_CGROUP_HOOKS.items():
                if prog in self._progs().prog_fds:
                    links[hook] = self._attach(pod_pins / hook, prog, spec.cgroup)
            if spec.inbound:  # the caller installed the delivery routing (podnet)
                for hook, prog in POD_NETNS_HOOKS.items():
                    links[hook] = self._attach(pod_pins / hook, prog, spec.netns)
            pod = TetherPod(
                slot=slot,
                flags=(POD_OUTBOUND if spec.outbound else 0) | (POD_INBOUND if spec.inbound else 0),
            )
            for ip in spec.ips:
                bpfsys.map_update(self._map("tether_podips"), bytes(TetherIpKey.of(ip)), bytes(pod))
            bpfsys.map_update(self._map("tether_pods"), bytes(ctypes.c_uint64(cookie)), bytes(pod))
        except (OSError, DatapathError) as e:
            with contextlib.suppress(OSError, DatapathError):
                self._remove(spec, slot, cookie)
            if isinstance(e, PodError):
                raise
            raise PodError(spec.key, f"enrollment failed and was rolled back: {e}") from e
        enr = Enrollment(spec, slot, cookie, os.stat(spec.netns).st_ino, links)
        self.pods[spec.key] = enr
        self._adopted.pop(spec.key, None)
        self._write_state()
        log.info("enrolled %s (slot %d, %d hooks)", spec.key, slot, len(links))
        return enr

    def unenroll(self, key: str) -> bool:
        """Stop capturing a pod.  Connections the agent already relays go on."""
        enr = self.pods.pop(key, None)
        rec = self._adopted.pop(key, None)
        if enr is None and rec is None:
            return False
        if enr is not None:
            spec, slot, cookie = enr.spec, enr.slot, enr.netns_cookie
        else:
            assert rec is not None
            spec = PodSpec(**_spec_args(rec["spec"]))
            slot, cookie = rec["slot"], rec["netns_cookie"]
        self._remove(spec, slot, cookie)
        self._write_state()
        log.info("unenrolled %s", key)
        return True

    def leftover_pods(self) -> list[str]:
        """Pods a previous agent enrolled that this one has not claimed yet."""
        return sorted(self._adopted)

    def adopted_netns(self, key: str) -> str | None:
        """The netns a previous agent enrolled pod `key` in (and installed its
        delivery routing in), while this one has not claimed it yet; None if
        that path now names another netns (its inode changed) or none."""
        rec = self._adopted.get(key)
        if not isinstance(rec, dict):
            return None
        ns = rec.get("spec", {}).get("netns")
        if not ns:
            return None
        try:
            same = os.stat(ns).st_ino == rec.get("netns_ino")
        except OSError:
            same = False
        return str(ns) if same else None

    # -- for the tunnel ----------------------------------------------------

    def delivery_bypass(self) -> DeliveryBypass:
        """The one map the tunnel writes per connection: see DeliveryBypass."""
        return DeliveryBypass(self)

    def stats(self) -> dict[str, int]:
        """Counters from tether_stats, summed over CPUs."""
        ncpu = _ncpus()
        out: dict[str, int] = {}
        for st in Stat:
            raw = bpfsys.map_lookup(self._map("tether_stats"), bytes(ctypes.c_uint32(st)), 8 * ncpu)
            out[st.name.lower()] = (
                sum(int.from_bytes(raw[i : i + 8], "little") for i in range(0, len(raw), 8))
                if raw
                else 0
            )
        return out

    def status(self) -> dict[str, Any]:
        return {
            "pin_dir": str(self.pin_dir),
            "programs": {
                name: PROGRAMS[name].hook for name in (self.progs.prog_fds if self.progs else {})
            },
            "node_links": self.node_links,
            "skmsg": self.config.skmsg,
            "pods": {k: e.record() for k, e in sorted(self.pods.items())},
            "stats": self.stats() if self.progs else {},
        }

    # -- internals ---------------------------------------------------------

    def _progs(self) -> Programs:
        if self.progs is None:
            raise DatapathError("datapath not started")
        return self.progs

    def _map(self, name: str) -> int:
        return self._progs().map_fds[name]

    def _prog(self, name: str) -> int:
        return self._progs().prog_fds[name]

    def _attach_agent_links(self, cgroup: str) -> None:
        """The agent's own hooks, on the cgroup its sockets are made in, pinned
        per cgroup (links/<name>-<cgroup id>): a new agent pod has a new
        cgroup, and must not take over the link of the pod it replaces.

        That pod's links stay, on this build's programs, while its cgroup
        lives: the listening sockets a handoff passed over were made there,
        and the getsockopt hook runs by the socket's cgroup.  Once every
        socket of it is gone the kernel severs them; a severed link is
        unpinned here (and by `_attach`), so a deleted agent pod never leaves
        its successor crash-looping on ENOLINK."""
        ours = os.stat(cgroup).st_ino  # a cgroup v2 directory's inode is its id
        links = self.pin_dir / "links"
        for name, prog in AGENT_LINKS.items():
            self.node_links[name] = self._attach(links / f"{name}-{ours}", prog, cgroup)
        for pin in sorted(links.iterdir()):
            name, _, cg = pin.name.partition("-")
            if name not in AGENT_LINKS or cg == str(ours):
                continue  # not an agent link, or ours (an agent restarted in its pod)
            if self._update_pinned(pin, AGENT_LINKS[name]) is None:
                log.info("agent link %s: its cgroup is gone (severed), unpinned", pin.name)

    def _update_pinned(self, pin: Path, prog: str) -> int | None:
        """Point the pinned link at prog; its id, or None when the kernel had
        severed it (its cgroup or netns was freed), which is then unpinned."""
        link = bpfsys.obj_get(str(pin))
        try:
            bpfsys.link_update(link, self._prog(prog))
            return bpfsys.link_info(link).id
        except OSError as e:
            if e.errno != errno.ENOLINK:
                raise
        finally:
            os.close(link)
        pin.unlink()
        return None

    def _attach(self, pin: Path, prog: str, target: str) -> int:
        """Attach prog to a cgroup or netns through a pinned link, or point the
        existing pinned link at prog (a severed one is replaced).  Returns the
        link id."""
        spec = PROGRAMS[prog]
        prog_fd = self._prog(prog)
        if pin.exists():
            link_id = self._update_pinned(pin, prog)
            if link_id is not None:
                return link_id
            log.warning("link %s was severed (its target went away): attaching anew", pin)
        tfd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
        try:
            link = bpfsys.link_create(prog_fd, tfd, spec.attach_type)
        finally:
            os.close(tfd)
        try:
            pin.parent.mkdir(parents=True, exist_ok=True)
            bpfsys.obj_pin(link, str(pin))
            return bpfsys.link_info(link).id
        finally:
            os.close(link)

    def _slot_for(self, spec: PodSpec) -> int:
        if spec.key in self.pods:
            return self.pods[spec.key].slot
        if spec.key in self._adopted:
            return int(self._adopted[spec.key]["slot"])
        used = {e.slot for e in self.pods.values()} | {
            int(r["slot"]) for r in self._adopted.values()
        }
        for slot in range(self.config.build.max_pods):
            if slot not in used:
                return slot
        raise PodError(
            spec.key, f"node is full: {self.config.build.max_pods} pods enrolled (raise --max-pods)"
        )

    def _write_exclusions(self, slot: int, spec: PodSpec) -> None:
        self._clear_exclusions(slot)
        for port, d in [(p, DIR_OUT) for p in spec.exclude_out_ports] + [
            (p, DIR_IN) for p in spec.exclude_in_ports
        ]:
            bpfsys.map_update(
                self._map("tether_ports"),
                bytes(TetherPortKey(slot=slot, port=port, dir=d)),
                b"\x01",
            )
        for cidr in spec.exclude_out_cidrs:
            bpfsys.map_update(self._map("tether_nets"), bytes(TetherNetKey.of(slot, cidr)), b"\x01")

    def _clear_exclusions(self, slot: int) -> None:
        for name, size in (("tether_ports", 8), ("tether_nets", 28)):
            fd = self._map(name)
            for key in list(bpfsys.map_keys(fd, size)):
                kslot = int.from_bytes(key[4:8] if name == "tether_nets" else key[0:4], "little")
                if kslot == slot:
                    bpfsys.map_delete(fd, key)

    def _remove(self, spec: PodSpec, slot: int, cookie: int) -> None:
        """Undo an enrollment in reverse order; every step tolerates absence."""
        for ip in spec.ips:
            bpfsys.map_delete(self._map("tether_podips"), bytes(TetherIpKey.of(ip)))
        bpfsys.map_delete(self._map("tether_pods"), bytes(ctypes.c_uint64(cookie)))
        detach_pins(self.pin_dir / "pods" / spec.pin_name)
        self._clear_exclusions(slot)
        for kind in Listen:
            bpfsys.map_delete(
                self._map("tether_listen"),
                bytes(ctypes.c_uint32(slot * LISTEN_PER_POD + int(kind))),
            )

    def _drop_incompatible_pins(self) -> None:
        """A pinned map whose layout differs from this build's (an upgrade
        changed a struct) cannot be adopted: unpin it so BCC makes a new one."""
        for name in PINNED_MAPS:
            pin = self.pin_dir / name
            if not pin.exists():
                continue
            want = MAPS[name]
            fd = bpfsys.obj_get(str(pin))
            try:
                info = bpfsys.map_info(fd)
            finally:
                os.close(fd)
            if (info.type, info.key_size, info.value_size) != want:
                log.warning(
                    "pinned map %s has layout %s, want %s: starting it afresh",
                    name,
                    (info.type, info.key_size, info.value_size),
                    want,
                )
                pin.unlink()

    def _read_state(self) -> dict[str, dict[str, Any]]:
        path = self.state_dir / STATE_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {}
        except ValueError as e:
            log.warning("ignoring unreadable %s: %s", path, e)
            return {}
        pods = data.get("pods", {})
        return {k: v for k, v in pods.items() if isinstance(v, dict)}

    def _write_state(self) -> None:
        pods = {k: e.record() for k, e in self.pods.items()}
        pods.update(self._adopted)
        path = self.state_dir / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pin_dir": str(self.pin_dir), "pods": pods}, indent=1))
        tmp.replace(path)


def check_pod(spec: PodSpec) -> None:
    """The pod's netns and cgroup must exist before anything is attached."""
    if not os.path.exists(spec.netns):
        raise PodError(
            spec.key, f"network namespace {spec.netns} does not exist (pod gone or not started yet)"
        )
    if not os.path.isdir(spec.cgroup):
        raise PodError(
            spec.key,
            f"cgroup {spec.cgroup} does not exist: is it a cgroup v2 directory of this node?",
        )


def _spec_args(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


NSPROBE_PORT = 9  # TETHER_NSPROBE_PORT


def netns_cookie(path: str, probe_map: int | None = None) -> int:
    """The kernel's cookie for a netns, as bpf_get_netns_cookie() sees it.

    SO_NETNS_COOKIE where the kernel has it (5.14+); before that, a UDP
    connect() from a socket made in the netns, which tether_nsprobe (on the
    agent's cgroup) answers into a map keyed by the socket's cookie."""
    with netns.entered(path):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        try:
            return bpfsys.netns_cookie(s)
        except OSError as e:
            if e.errno != errno.ENOPROTOOPT or probe_map is None:
                raise
        with contextlib.suppress(OSError):  # the hook runs before routing: lo may be down
            s.connect(("127.0.0.1", NSPROBE_PORT))
        key = bytes(ctypes.c_uint64(bpfsys.socket_cookie(s)))
        raw = bpfsys.map_lookup(probe_map, key, 8)
        bpfsys.map_delete(probe_map, key)
        if raw is None:
            raise DatapathError(
                "this kernel has no SO_NETNS_COOKIE (5.14+) and tether_nsprobe did not "
                "answer: is the agent running in the cgroup its hooks are attached to?"
            )
        return int.from_bytes(raw, sys.byteorder)


def ensure_bpffs(root: str = "/sys/fs/bpf") -> None:
    if os.path.ismount(root):
        return
    ret = netns.libc().mount(b"bpf", root.encode(), b"bpf", 0, None)
    if ret != 0:
        err = ctypes.get_errno()
        raise DatapathError(
            f"bpffs is not mounted at {root} and mounting it failed "
            f"({os.strerror(err)}): mount -t bpf bpf {root}"
        )


def detach_pins(directory: Path) -> list[str]:
    """Detach and unpin every link pinned below directory, then remove it."""
    removed: list[str] = []
    if not directory.exists():
        return removed
    for pin in sorted(directory.rglob("*"), reverse=True):
        if pin.is_dir():
            pin.rmdir()
            continue
        with contextlib.suppress(OSError):
            fd = bpfsys.obj_get(str(pin))
            try:
                bpfsys.link_detach(fd)
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOLINK, errno.EOPNOTSUPP):
                    raise
            finally:
                os.close(fd)
        pin.unlink()
        removed.append(str(pin))
    directory.rmdir()
    return removed


def cleanup(pin_dir: str, state_dir: str) -> dict[str, list[str]]:
    """Remove everything a tether agent left in the kernel: links (programs
    go with them), pinned maps, per-pod routing rules, the state file."""
    report: dict[str, list[str]] = {"links": [], "maps": [], "netns": []}
    pins = Path(pin_dir)
    state = Path(state_dir) / STATE_FILE
    with contextlib.suppress(FileNotFoundError, ValueError):
        for rec in json.loads(state.read_text()).get("pods", {}).values():
            ns = rec.get("spec", {}).get("netns")
            if ns and os.path.exists(ns):
                with contextlib.suppress(OSError):
                    podnet.run_once("unprepare", ns)
                    report["netns"].append(ns)
    for sub in ("pods", "links"):
        report["links"] += detach_pins(pins / sub)
    if pins.exists():
        for pin in pins.iterdir():
            pin.unlink()
            report["maps"].append(str(pin))
        pins.rmdir()
    for name in (STATE_FILE, "handoff.sock"):
        with contextlib.suppress(FileNotFoundError):
            (Path(state_dir) / name).unlink()
    shutil.rmtree(Path(state_dir) / "tls", ignore_errors=True)  # older agents wrote TLS files here
    with contextlib.suppress(OSError):
        Path(state_dir).rmdir()
    return report


__all__: Sequence[str] = (
    "Datapath",
    "DatapathConfig",
    "DeliveryBypass",
    "Enrollment",
    "PodSpec",
    "cleanup",
    "netns_cookie",
)
