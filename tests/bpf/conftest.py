"""Fixtures for the bpf tier: compiled programs, pin dirs, scratch netns and cgroups.

Every kernel-global name (pin dir, netns, cgroup dir) carries a random
per-test (or per-module) prefix, and every fixture undoes what it made even
when the test fails.  Sockets that must belong to a cgroup come from a
"socket factory": a tiny child process that joins the cgroup and the netns,
creates sockets on request and hands their fds back over SCM_RIGHTS.  The
cgroup hooks act on the cgroup and netns a socket was *created* in, so the
test process can then drive those sockets itself (connect, accept,
getsockopt) and the programs behave exactly as for the real process.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent import netns
from agent.datapath import bpfsys
from agent.datapath.loader import MAPS, BuildOptions, Programs
from agent.datapath.structs import STAT_MAX, Stat

try:  # the cgroup helpers moved between modules while this tier was written
    from agent.cgroupfs import cgroup2_root, make_cgroup, remove_cgroup
except ImportError:  # pragma: no cover
    from agent.sim.cgroup import cgroup2_root, make_cgroup, remove_cgroup  # type: ignore[no-redef]

BPFFS = Path("/sys/fs/bpf")
ROOT_REASON = "bpf tier needs root (bpf(2), bpffs, cgroup v2)"


def random_prefix(stem: str = "tb") -> str:
    return stem + secrets.token_hex(3)[:5]


@pytest.fixture
def prefix() -> str:
    """A fresh per-test prefix for kernel-global names."""
    return random_prefix()


# -- pins and programs --------------------------------------------------------


@pytest.fixture
def pin_dir(prefix: str) -> Iterator[Path]:
    """A unique, not yet existing directory under /sys/fs/bpf, removed afterwards."""
    d = BPFFS / f"{prefix}-pins"
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def built(opts: BuildOptions) -> Iterator[Programs]:
    """Programs(opts), closed and its pin dir removed afterwards, on failure too."""
    progs: Programs | None = None
    try:
        progs = Programs(opts)
        yield progs
    finally:
        if progs is not None:
            progs.close()
        shutil.rmtree(opts.pin_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def programs() -> Iterator[Programs]:
    """The default build, compiled once per module into its own pin dir."""
    if os.geteuid() != 0:
        pytest.skip(ROOT_REASON)
    with built(BuildOptions(pin_dir=str(BPFFS / f"{random_prefix('tm')}-pins"))) as progs:
        yield progs


# -- maps ---------------------------------------------------------------------

# maps whose entries tests add; emptied before and after each test using `maps`
_RESET = (
    "tether_pods",
    "tether_podips",
    "tether_orig",
    "tether_tuple",
    "tether_bypass",
    "tether_ports",
    "tether_nets",
)


def raw(obj: object) -> bytes:
    return obj if isinstance(obj, bytes) else bytes(obj)  # type: ignore[call-overload]


def u32(n: int) -> bytes:
    return n.to_bytes(4, sys.byteorder)


class Maps:
    """Map access by name on a Programs object, with the value sizes from loader.MAPS."""

    def __init__(self, progs: Programs) -> None:
        self.progs = progs
        self._socks: list[tuple[str, bytes]] = []

    def fd(self, name: str) -> int:
        return self.progs.map_fds[name]

    def put(self, name: str, key: object, value: object) -> None:
        _, ksize, vsize = MAPS[name]
        k, v = raw(key), raw(value)
        assert (len(k), len(v)) == (ksize, vsize), f"{name}: key/value sizes {len(k)}/{len(v)}"
        bpfsys.map_update(self.fd(name), k, v)

    def put_sock(self, name: str, key: object, sock: socket.socket) -> None:
        k = raw(key)
        bpfsys.sockmap_update(self.fd(name), k, sock.fileno())
        self._socks.append((name, k))

    def get(self, name: str, key: object) -> bytes | None:
        return bpfsys.map_lookup(self.fd(name), raw(key), MAPS[name][2])

    def delete(self, name: str, key: object) -> bool:
        return bpfsys.map_delete(self.fd(name), raw(key))

    def keys(self, name: str) -> list[bytes]:
        return list(bpfsys.map_keys(self.fd(name), MAPS[name][1]))

    def stats(self) -> dict[Stat, int]:
        """tether_stats summed over CPUs."""
        ncpu = bpfsys.possible_cpus()
        out: dict[Stat, int] = {}
        for s in Stat:
            v = bpfsys.map_lookup(self.fd("tether_stats"), u32(s), 8 * ncpu)
            assert v is not None
            out[s] = sum(int.from_bytes(v[8 * i : 8 * i + 8], sys.byteorder) for i in range(ncpu))
        assert len(out) == STAT_MAX
        return out

    def reset(self) -> None:
        for name in _RESET:
            for k in self.keys(name):
                bpfsys.map_delete(self.fd(name), k)
        bpfsys.map_update(self.fd("tether_cfg"), u32(0), bytes(8))
        for name, k in self._socks:
            with contextlib.suppress(OSError):
                bpfsys.map_delete(self.fd(name), k)
        self._socks.clear()


@pytest.fixture
def maps(programs: Programs) -> Iterator[Maps]:
    """The module's maps, emptied of test entries before and after the test."""
    m = Maps(programs)
    m.reset()
    try:
        yield m
    finally:
        m.reset()


def wait_for(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.01)


# -- network namespaces ---------------------------------------------------------


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {r.stderr.strip()}")


@pytest.fixture
def scratch_netns(prefix: str) -> Iterator[Callable[..., Path]]:
    """make(addrs=()) -> path of a fresh named netns with lo up and addrs on lo.

    IPv6 addresses are added nodad so they are usable at once.  All are
    deleted after the test.
    """
    made: list[str] = []

    def make(addrs: tuple[str, ...] = ()) -> Path:
        name = f"{prefix}-ns{len(made)}"
        path = netns.create_netns(name)
        made.append(name)
        _ip("-n", name, "link", "set", "lo", "up")
        for a in addrs:
            extra = ["nodad"] if ":" in a else []
            _ip("-n", name, "addr", "add", a, "dev", "lo", *extra)
        return path

    try:
        yield make
    finally:
        for name in reversed(made):
            netns.delete_netns(name)


def netns_cookie(path: Path) -> int:
    """SO_NETNS_COOKIE (5.14+); on older kernels the way the agent does it: a
    UDP connect() from a process in a scratch cgroup carrying tether_nsprobe."""
    from agent.datapath.datapath import netns_cookie as project_cookie

    try:
        return project_cookie(str(path))  # no probe map: raises where 5.14 is missing
    except OSError as e:
        if e.errno != errno.ENOPROTOOPT:
            raise
    return _probe_cookie(path)


def _probe_cookie(path: Path) -> int:
    from agent.cgroupfs import cgroup2_root, make_cgroup, remove_cgroup
    from agent.datapath.datapath import NSPROBE_PORT
    from agent.sim.topology import spawn_in

    pin = Path(f"/sys/fs/bpf/tbprobe-{secrets.token_hex(3)}")
    cg = make_cgroup(cgroup2_root() / f"tbprobe-{secrets.token_hex(3)}")
    progs = Programs(BuildOptions(pin_dir=str(pin)))
    link = -1
    try:
        fd = os.open(cg, os.O_RDONLY)
        try:
            link = bpfsys.link_create(
                progs.prog_fds["tether_nsprobe"], fd, bpfsys.AttachType.CGROUP_INET4_CONNECT
            )
        finally:
            os.close(fd)

        class Target:
            netns_path, cgroup_path = path, cg

        code = (
            "import contextlib, socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "with contextlib.suppress(OSError):\n"
            f"    s.connect(('127.0.0.1', {NSPROBE_PORT}))\n"
            "print(int.from_bytes(s.getsockopt(socket.SOL_SOCKET, 57, 8), 'little'))"
        )
        proc = spawn_in(Target(), [sys.executable, "-c", code], stdout=subprocess.PIPE)
        out, _ = proc.communicate(timeout=30)
        key = int(out.decode().strip()).to_bytes(8, sys.byteorder)
        raw = bpfsys.map_lookup(progs.map_fds["tether_nscookie"], key, 8)
        assert raw is not None, "tether_nsprobe did not answer"
        return int.from_bytes(raw, sys.byteorder)
    finally:
        if link >= 0:
            os.close(link)
        progs.close()
        shutil.rmtree(pin, ignore_errors=True)
        remove_cgroup(cg)


# -- cgroups ------------------------------------------------------------------


@pytest.fixture
def scratch_cgroup(prefix: str) -> Iterator[Callable[[str], Path]]:
    """make(name) -> a fresh cgroup v2 dir <root>/<prefix>/<name>; the tree is removed after."""
    base = cgroup2_root() / prefix
    made = False

    def make(name: str) -> Path:
        nonlocal made
        made = True
        return make_cgroup(base / name)

    try:
        yield make
    finally:
        if made:
            remove_cgroup(base)


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """fds appended here (cgroup dirs, links) are closed after the test, last first."""
    owned: list[int] = []
    try:
        yield owned
    finally:
        for fd in reversed(owned):
            with contextlib.suppress(OSError):
                os.close(fd)


# -- socket factories ---------------------------------------------------------

_FACTORY = r"""
import socket, sys
ctl = socket.socket(fileno=int(sys.argv[1]))
while True:
    req = ctl.recv(64)
    if not req:
        break
    fam, typ = (int(x) for x in req.split())
    s = socket.socket(fam, typ)
    socket.send_fds(ctl, [b"k"], [s.fileno()])
    s.close()
"""


class SocketFactory:
    """A child process living in (netns, cgroup) that makes sockets for the test."""

    def __init__(self, netns_path: Path, cgroup_path: Path) -> None:
        self.netns_path = netns_path
        self.cgroup_path = cgroup_path
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        procs = os.fsencode(cgroup_path / "cgroup.procs")
        ns_fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)

        def enter() -> None:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)
            netns.setns_fd(ns_fd)

        netns.libc()  # load before fork, not in the child
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _FACTORY, str(child.fileno())],
                preexec_fn=enter,
                pass_fds=(child.fileno(),),
            )
        finally:
            os.close(ns_fd)
            child.close()
        self.ctl = parent
        self.ctl.settimeout(10)

    def socket(self, family: int, type_: int = socket.SOCK_STREAM) -> socket.socket:
        self.ctl.send(f"{int(family)} {int(type_)}".encode())
        _, got, _, _ = socket.recv_fds(self.ctl, 16, 1)
        assert len(got) == 1, "socket factory sent no fd"
        return socket.socket(fileno=got[0])

    def close(self) -> None:
        self.ctl.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)


@pytest.fixture
def sock_factory() -> Iterator[Callable[[Path, Path], SocketFactory]]:
    """make(netns_path, cgroup_path) -> SocketFactory; all are stopped after the test."""
    made: list[SocketFactory] = []

    def make(netns_path: Path, cgroup_path: Path) -> SocketFactory:
        f = SocketFactory(netns_path, cgroup_path)
        made.append(f)
        return f

    try:
        yield make
    finally:
        for f in made:
            f.close()


@pytest.fixture
def socks() -> Iterator[list[socket.socket]]:
    """Sockets appended here are closed after the test."""
    owned: list[socket.socket] = []
    try:
        yield owned
    finally:
        for s in owned:
            s.close()


@pytest.fixture
def ns_cookie() -> Callable[[Path], int]:
    """netns_cookie(path): the cookie bpf_get_netns_cookie() returns for that netns."""
    return netns_cookie


@pytest.fixture(name="wait_for")
def wait_for_fixture() -> Callable[..., None]:
    """wait_for(cond, timeout=5.0, what=...): poll cond() until true, or fail."""
    return wait_for
