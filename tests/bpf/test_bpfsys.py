"""bpfsys against the running kernel: maps, pins, sockmaps, attach/query, links, test runs."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.datapath import bpfsys as b
from agent.datapath.loader import kernel_version

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="bpf tier needs root (bpf(2), bpffs)")

BPFFS = Path("/sys/fs/bpf")
CLONE_NEWNET = 0x40000000
NO_SUCH_ID = 0x7FFFFFFF  # ids are allocated from 1 upwards; this one is never reached in a test

PROGS = r"""
int cls(struct __sk_buff *skb) { return 7; }
int so1(struct bpf_sock_ops *ops) { return 1; }
int so2(struct bpf_sock_ops *ops) { return 1; }
int so3(struct bpf_sock_ops *ops) { return 1; }
int msg(struct sk_msg_md *md) { return 1; }
int look1(void *ctx) { return 1; }
int look2(void *ctx) { return 1; }
"""


def u32(n: int) -> bytes:
    return n.to_bytes(4, "little")


def u64(n: int) -> bytes:
    return n.to_bytes(8, "little")


def fdinfo(fd: int) -> dict[str, str]:
    lines = Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in lines)}


def raised(exc: pytest.ExceptionInfo[b.BpfError], err: int) -> str:
    assert exc.value.errno == err
    return str(exc.value)


@pytest.fixture
def fds() -> Iterator[list[int]]:
    """fds appended here are closed after the test."""
    owned: list[int] = []
    yield owned
    for fd in reversed(owned):
        with contextlib.suppress(OSError):
            os.close(fd)


@pytest.fixture
def new_map(fds: list[int]) -> Callable[..., int]:
    def make(
        map_type: int,
        key_size: int,
        value_size: int,
        max_entries: int = 8,
        name: str = "",
        flags: int = 0,
    ) -> int:
        fd = b.map_create(map_type, key_size, value_size, max_entries, name, flags)
        fds.append(fd)
        return fd

    return make


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    if not os.path.ismount(BPFFS):  # left mounted: it is the node's normal state
        subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], check=True)
    d = BPFFS / f"tether-test-{os.getpid()}-{secrets.token_hex(4)}"
    d.mkdir()
    try:
        yield d
    finally:
        for pin in d.iterdir():
            pin.unlink()
        d.rmdir()


@pytest.fixture
def tcp_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        server, _ = listener.accept()
        with client, server:
            yield client, server


@pytest.fixture(scope="module")
def progs() -> Iterator[dict[str, int]]:
    """Program fds by function name, loaded with BCC (bpfsys itself never compiles)."""
    bcc = pytest.importorskip("bcc")
    P, A = b.ProgType, b.AttachType
    specs = {  # name: (prog type, expected attach type; SK_LOOKUP needs one at load, -1 = none)
        "cls": (P.SCHED_CLS, -1),
        "so1": (P.SOCK_OPS, -1),
        "so2": (P.SOCK_OPS, -1),
        "so3": (P.SOCK_OPS, -1),
        "msg": (P.SK_MSG, -1),
        "look1": (P.SK_LOOKUP, A.SK_LOOKUP),
        "look2": (P.SK_LOOKUP, A.SK_LOOKUP),
    }
    with bcc.BPF(text=PROGS.encode()) as bpf:
        yield {
            name: bpf.load_func(name.encode(), prog_type, attach_type=attach_type).fd
            for name, (prog_type, attach_type) in specs.items()
        }


@pytest.fixture
def cgroup() -> Iterator[int]:
    """An empty cgroup2 directory fd (no process ever joins it)."""
    with open("/proc/mounts") as f:
        roots = [line.split()[1] for line in f if line.split()[2] == "cgroup2"]
    if not roots:
        pytest.skip("no cgroup2 mount")
    d = Path(roots[0]) / f"tether-test-{os.getpid()}-{secrets.token_hex(4)}"
    d.mkdir()
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)
        d.rmdir()


@pytest.fixture
def netns() -> Iterator[int]:
    """A fresh network namespace fd, made by a throwaway thread so this process stays put."""
    got: dict[str, int] = {}

    def enter() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.unshare(CLONE_NEWNET) != 0:
            got["errno"] = ctypes.get_errno()
            return
        got["fd"] = os.open("/proc/thread-self/ns/net", os.O_RDONLY)

    t = threading.Thread(target=enter)
    t.start()
    t.join()
    assert "fd" in got, os.strerror(got.get("errno", 0))
    try:
        yield got["fd"]
    finally:
        os.close(got["fd"])


def test_hash_update_lookup_delete_keys(new_map: Callable[..., int]) -> None:
    fd = new_map(b.MapType.HASH, 4, 8, name="t_hash")
    b.map_update(fd, u32(1), u64(10))
    b.map_update(fd, u32(2), u64(20), b.BPF_NOEXIST)
    b.map_update(fd, u32(2), u64(21), b.BPF_EXIST)
    assert b.map_lookup(fd, u32(1), 8) == u64(10)
    assert b.map_lookup(fd, u32(2), 8) == u64(21)
    assert sorted(b.map_keys(fd, 4)) == [u32(1), u32(2)]

    with pytest.raises(b.BpfError) as exc:
        b.map_update(fd, u32(1), u64(11), b.BPF_NOEXIST)
    assert raised(exc, errno.EEXIST) == f"BPF_MAP_UPDATE_ELEM on map fd {fd}: File exists"
    with pytest.raises(OSError) as os_exc:
        b.map_update(fd, u32(3), u64(30), b.BPF_EXIST)
    assert isinstance(os_exc.value, b.BpfError)
    assert str(os_exc.value) == f"BPF_MAP_UPDATE_ELEM on map fd {fd}: No such file or directory"

    assert b.map_delete(fd, u32(1)) is True
    assert b.map_delete(fd, u32(1)) is False
    assert b.map_lookup(fd, u32(1), 8) is None
    assert list(b.map_keys(fd, 4)) == [u32(2)]


def test_lru_hash_evicts_instead_of_failing(new_map: Callable[..., int]) -> None:
    fd = new_map(b.MapType.LRU_HASH, 4, 4, max_entries=16, name="t_lru")
    for i in range(64):
        b.map_update(fd, u32(i), u32(i * 2))
    keys = list(b.map_keys(fd, 4))
    assert 0 < len(keys) <= 16
    assert u32(63) in keys
    assert b.map_lookup(fd, u32(63), 4) == u32(126)


def test_array_keys_are_all_indices(new_map: Callable[..., int]) -> None:
    fd = new_map(b.MapType.ARRAY, 4, 4, max_entries=4, name="t_array")
    assert list(b.map_keys(fd, 4)) == [u32(i) for i in range(4)]
    assert b.map_lookup(fd, u32(3), 4) == bytes(4)
    b.map_update(fd, u32(3), u32(99))
    assert b.map_lookup(fd, u32(3), 4) == u32(99)
    assert b.map_lookup(fd, u32(4), 4) is None
    with pytest.raises(b.BpfError) as exc:
        b.map_delete(fd, u32(0))
    assert raised(exc, errno.EINVAL).startswith("BPF_MAP_DELETE_ELEM on map fd")


def test_percpu_array_value_spans_all_cpus(new_map: Callable[..., int]) -> None:
    fd = new_map(b.MapType.PERCPU_ARRAY, 4, 4, max_entries=2, name="t_percpu")
    ncpus = b.possible_cpus()
    value = b"".join(u64(cpu + 1) for cpu in range(ncpus))  # each slot is round_up(4, 8)
    b.map_update(fd, u32(1), value)
    assert b.map_lookup(fd, u32(1), 8 * ncpus) == value
    assert b.map_lookup(fd, u32(0), 8 * ncpus) == bytes(8 * ncpus)


def test_lpm_trie_longest_prefix(new_map: Callable[..., int]) -> None:
    fd = new_map(b.MapType.LPM_TRIE, 8, 4, max_entries=8, name="t_lpm", flags=b.BPF_F_NO_PREALLOC)

    def key(prefixlen: int, ip: str) -> bytes:
        return u32(prefixlen) + socket.inet_aton(ip)

    b.map_update(fd, key(8, "10.0.0.0"), u32(8))
    b.map_update(fd, key(16, "10.1.0.0"), u32(16))
    assert b.map_lookup(fd, key(32, "10.1.2.3"), 4) == u32(16)
    assert b.map_lookup(fd, key(32, "10.2.0.1"), 4) == u32(8)
    assert b.map_lookup(fd, key(32, "11.0.0.1"), 4) is None
    assert sorted(b.map_keys(fd, 8)) == sorted([key(8, "10.0.0.0"), key(16, "10.1.0.0")])
    assert b.map_delete(fd, key(16, "10.1.0.0"))
    assert b.map_lookup(fd, key(32, "10.1.2.3"), 4) == u32(8)


def test_pin_and_reopen(new_map: Callable[..., int], fds: list[int], pin_dir: Path) -> None:
    fd = new_map(b.MapType.HASH, 4, 4, name="t_pin")
    path = pin_dir / "map"
    b.obj_pin(fd, path)
    again = b.obj_get(path)
    fds.append(again)
    assert again != fd
    assert b.map_info(again) == b.map_info(fd)
    b.map_update(again, u32(1), u32(5))
    assert b.map_lookup(fd, u32(1), 4) == u32(5)

    ro = b.obj_get(str(path), b.BPF_F_RDONLY)
    fds.append(ro)
    assert b.map_lookup(ro, u32(1), 4) == u32(5)
    with pytest.raises(b.BpfError) as exc:
        b.map_update(ro, u32(1), u32(6))
    raised(exc, errno.EPERM)

    with pytest.raises(b.BpfError) as exc:
        b.obj_pin(fd, path)
    assert raised(exc, errno.EEXIST) == f"BPF_OBJ_PIN on fd {fd} at {path}: File exists"
    missing = pin_dir / "missing"
    with pytest.raises(b.BpfError) as exc:
        b.obj_get(missing)
    assert raised(exc, errno.ENOENT) == f"BPF_OBJ_GET on {missing}: No such file or directory"


def test_map_info_ids_and_get_fd_by_id(new_map: Callable[..., int], fds: list[int]) -> None:
    fd = new_map(b.MapType.LRU_HASH, 8, 16, max_entries=32, name="t_info")
    info = b.obj_info(fd)
    assert isinstance(info, b.MapInfo)
    assert (info.type, info.name, info.key_size, info.value_size, info.max_entries) == (
        b.MapType.LRU_HASH,
        "t_info",
        8,
        16,
        32,
    )
    kernel = fdinfo(fd)
    assert (kernel["map_id"], kernel["map_type"], kernel["map_flags"]) == (
        str(info.id),
        str(int(b.MapType.LRU_HASH)),
        f"0x{info.flags:x}",
    )
    assert b.fd_kind(fd) == "map"

    assert info.id in set(b.map_ids())
    by_id = b.map_get_fd_by_id(info.id)
    fds.append(by_id)
    assert b.map_info(by_id) == info
    with pytest.raises(b.BpfError) as exc:
        b.map_get_fd_by_id(NO_SUCH_ID)
    assert raised(exc, errno.ENOENT) == (
        f"BPF_MAP_GET_FD_BY_ID on map id {NO_SUCH_ID}: No such file or directory"
    )
    with pytest.raises(b.BpfError) as exc:
        b.prog_info(fd)
    raised(exc, errno.EINVAL)


@pytest.mark.parametrize("value_size", [4, 8])
@pytest.mark.parametrize("map_type", [b.MapType.SOCKMAP, b.MapType.SOCKHASH])
def test_sockmap_holds_connected_tcp_sockets(
    new_map: Callable[..., int],
    tcp_pair: tuple[socket.socket, socket.socket],
    map_type: b.MapType,
    value_size: int,
) -> None:
    client, server = tcp_pair
    fd = new_map(map_type, 4, value_size, max_entries=4)
    b.sockmap_update(fd, u32(0), client.fileno())
    b.sockmap_update(fd, u32(1), server.fileno(), b.BPF_NOEXIST)

    if value_size == 8:  # userspace lookups return the socket cookie, which needs 8 bytes
        assert b.map_lookup(fd, u32(0), 8) == u64(b.socket_cookie(client))
        assert b.map_lookup(fd, u32(1), 8) == u64(b.socket_cookie(server))
    else:
        with pytest.raises(b.BpfError) as exc:
            b.map_lookup(fd, u32(0), 4)
        raised(exc, errno.ENOSPC)

    keys = list(b.map_keys(fd, 4))
    if map_type == b.MapType.SOCKMAP:  # an array: every index is a key
        assert keys == [u32(i) for i in range(4)]
    else:
        assert sorted(keys) == [u32(0), u32(1)]

    assert b.map_delete(fd, u32(0)) is True
    if map_type == b.MapType.SOCKHASH:
        assert b.map_delete(fd, u32(0)) is False
    else:  # an empty SOCKMAP slot is EINVAL, not ENOENT
        with pytest.raises(b.BpfError) as exc:
            b.map_delete(fd, u32(0))
        raised(exc, errno.EINVAL)

    with socket.socket() as unconnected, pytest.raises(b.BpfError) as exc:
        b.sockmap_update(fd, u32(2), unconnected.fileno())
    raised(exc, errno.EOPNOTSUPP)


def test_socket_and_netns_cookies(tcp_pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = tcp_pair
    assert b.socket_cookie(client) > 0 and b.socket_cookie(server) > 0
    assert b.socket_cookie(client) != b.socket_cookie(server)
    assert b.socket_cookie(client) == b.socket_cookie(client)
    if kernel_version() < (5, 14):  # SO_NETNS_COOKIE arrived in 5.14: a clear OSError
        with pytest.raises(OSError) as e:
            b.netns_cookie(client)
        assert e.value.errno == errno.ENOPROTOOPT and "SO_NETNS_COOKIE" in str(e.value)
        return
    assert b.netns_cookie(client) == b.netns_cookie(server) > 0


def test_prog_test_run_info_and_pin(progs: dict[str, int], fds: list[int], pin_dir: Path) -> None:
    fd = progs["cls"]
    run = b.prog_test_run(fd, bytes(64))
    assert (run.retval, run.data_out, run.ctx_out) == (7, bytes(64), b"")
    run = b.prog_test_run(fd, bytes(64), ctx_size_out=1024, repeat=50)
    assert run.retval == 7
    assert 0 < len(run.ctx_out) < 1024  # the kernel's struct __sk_buff
    with pytest.raises(b.BpfError) as exc:
        b.prog_test_run(fd, bytes(64), data_size_out=16)
    assert raised(exc, errno.ENOSPC).startswith(f"BPF_PROG_TEST_RUN on prog fd {fd}:")

    info = b.prog_info(fd)
    kernel = fdinfo(fd)
    assert (info.name, info.type) == ("cls", b.ProgType.SCHED_CLS)
    assert (str(info.id), info.tag) == (kernel["prog_id"], kernel["prog_tag"])
    assert len(bytes.fromhex(info.tag)) == 8
    assert b.fd_kind(fd) == "prog" and b.obj_info(fd) == info

    assert info.id in set(b.prog_ids())
    by_id = b.prog_get_fd_by_id(info.id)
    fds.append(by_id)
    assert b.prog_info(by_id) == info
    b.obj_pin(fd, pin_dir / "prog")
    pinned = b.obj_get(pin_dir / "prog")
    fds.append(pinned)
    assert b.prog_info(pinned) == info
    assert b.prog_test_run(pinned, bytes(64)).retval == 7


def test_cgroup_attach_query_replace_detach(progs: dict[str, int], cgroup: int) -> None:
    so1, so2, so3 = progs["so1"], progs["so2"], progs["so3"]
    ids = {fd: b.prog_info(fd).id for fd in (so1, so2, so3)}
    ops = b.AttachType.CGROUP_SOCK_OPS
    assert b.prog_query(cgroup, ops) == []

    b.prog_attach(cgroup, so1, ops, b.BPF_F_ALLOW_MULTI)
    b.prog_attach(cgroup, so2, ops, b.BPF_F_ALLOW_MULTI)
    assert b.prog_query(cgroup, ops) == [ids[so1], ids[so2]]
    assert b.prog_query(cgroup, ops, effective=True) == [ids[so1], ids[so2]]
    b.prog_attach(cgroup, so3, ops, b.BPF_F_ALLOW_MULTI, replace_prog_fd=so2)
    assert b.prog_query(cgroup, ops) == [ids[so1], ids[so3]]

    b.prog_detach(cgroup, ops, so1)
    b.prog_detach(cgroup, ops, so3)
    assert b.prog_query(cgroup, ops) == []
    with pytest.raises(b.BpfError) as exc:
        b.prog_detach(cgroup, ops, so3)
    assert raised(exc, errno.ENOENT) == (
        f"BPF_PROG_DETACH on prog fd {so3} -> fd {cgroup} (CGROUP_SOCK_OPS): "
        "No such file or directory"
    )


def test_cgroup_link_update_pin_detach(
    progs: dict[str, int], cgroup: int, fds: list[int], pin_dir: Path
) -> None:
    so1, so2 = progs["so1"], progs["so2"]
    ops = b.AttachType.CGROUP_SOCK_OPS
    link = b.link_create(so1, cgroup, ops)
    fds.append(link)
    info = b.link_info(link)
    assert (info.type, info.prog_id, info.attach_type) == (
        b.LinkType.CGROUP,
        b.prog_info(so1).id,
        ops,
    )
    assert (info.cgroup_id, info.netns_ino) == (os.fstat(cgroup).st_ino, None)
    assert fdinfo(link)["link_id"] == str(info.id)
    assert b.prog_query(cgroup, ops) == [info.prog_id]

    b.link_update(link, so2)
    assert b.link_info(link).prog_id == b.prog_info(so2).id
    with pytest.raises(b.BpfError) as exc:  # so1 is no longer the link's program
        b.link_update(link, so1, old_prog_fd=so1)
    raised(exc, errno.EPERM)
    b.link_update(link, so1, old_prog_fd=so2)
    assert b.link_info(link) == info

    assert info.id in set(b.link_ids())
    by_id = b.link_get_fd_by_id(info.id)
    fds.append(by_id)
    b.obj_pin(link, pin_dir / "link")
    pinned = b.obj_get(pin_dir / "link")
    fds.append(pinned)
    for fd in (link, by_id, pinned):
        assert b.fd_kind(fd) == "link"
        assert b.obj_info(fd) == info

    b.link_detach(link)
    assert b.prog_query(cgroup, ops) == []
    assert b.link_info(link).cgroup_id == 0


def test_netns_link_for_sk_lookup(progs: dict[str, int], netns: int, fds: list[int]) -> None:
    look1, look2 = progs["look1"], progs["look2"]
    link = b.link_create(look1, netns, b.AttachType.SK_LOOKUP)
    fds.append(link)
    info = b.link_info(link)
    assert (info.type, info.attach_type, info.netns_ino, info.cgroup_id) == (
        b.LinkType.NETNS,
        b.AttachType.SK_LOOKUP,
        os.fstat(netns).st_ino,
        None,
    )
    assert b.prog_query(netns, b.AttachType.SK_LOOKUP) == [b.prog_info(look1).id]
    b.link_update(link, look2)
    assert b.prog_query(netns, b.AttachType.SK_LOOKUP) == [b.prog_info(look2).id]
    b.link_detach(link)
    assert b.link_info(link).netns_ino == 0


def test_sk_msg_verdict_on_sockhash(progs: dict[str, int], new_map: Callable[..., int]) -> None:
    fd = new_map(b.MapType.SOCKHASH, 4, 8, max_entries=4)
    verdict = b.AttachType.SK_MSG_VERDICT
    b.prog_attach(fd, progs["msg"], verdict)
    # BPF_PROG_QUERY on a sock map answers from Linux 6.0 on
    query = kernel_version() >= (6, 0)
    if query:
        assert b.prog_query(fd, verdict) == [b.prog_info(progs["msg"]).id]
    b.prog_detach(fd, verdict, progs["msg"])
    if query:
        assert b.prog_query(fd, verdict) == []
    with pytest.raises(OSError):  # detached: a second detach finds nothing
        b.prog_detach(fd, verdict, progs["msg"])
