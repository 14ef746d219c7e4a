"""bpf(2) via ctypes: BCC has no pin/link/sockhash API, and restarts must not need compiling.

(Over 600 lines on purpose: one ctypes layout per bpf(2) command, each checked
against the kernel UAPI in tests/unit/test_bpfsys_layout.py; split by command
it would scatter the attr union.)"""

import ctypes
import errno
import os
import platform
import socket
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from typing import Literal, TypeVar

# Unknown machines get -1, which the kernel answers with ENOSYS on the first call.
_NR_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), -1)
# Each attr goes to the kernel in a zeroed buffer this size, so output fields that newer
# kernels add past the ones declared here (e.g. query.revision) land in it, not past it.
_ATTR_SIZE = 128
_syscall = ctypes.CDLL(None, use_errno=True).syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_long)

BPF_ANY, BPF_NOEXIST, BPF_EXIST = 0, 1, 2  # map_update flags
BPF_F_ALLOW_OVERRIDE, BPF_F_ALLOW_MULTI, BPF_F_REPLACE = 1, 2, 4  # prog_attach flags
BPF_F_NO_PREALLOC = 1  # map_create flag (required for LPM_TRIE)
BPF_F_RDONLY, BPF_F_WRONLY = 8, 16  # obj_get flags
BPF_F_QUERY_EFFECTIVE = 1  # prog_query flag
_SO_COOKIE, _SO_NETNS_COOKIE = 57, 71


class _Cmd(IntEnum):
    MAP_CREATE = 0
    MAP_LOOKUP_ELEM = 1
    MAP_UPDATE_ELEM = 2
    MAP_DELETE_ELEM = 3
    MAP_GET_NEXT_KEY = 4
    OBJ_PIN = 6
    OBJ_GET = 7
    PROG_ATTACH = 8
    PROG_DETACH = 9
    PROG_TEST_RUN = 10
    PROG_GET_NEXT_ID = 11
    MAP_GET_NEXT_ID = 12
    PROG_GET_FD_BY_ID = 13
    MAP_GET_FD_BY_ID = 14
    OBJ_GET_INFO_BY_FD = 15
    PROG_QUERY = 16
    LINK_CREATE = 28
    LINK_UPDATE = 29
    LINK_GET_FD_BY_ID = 30
    LINK_GET_NEXT_ID = 31
    LINK_DETACH = 34


class MapType(IntEnum):
    HASH = 1
    ARRAY = 2
    PROG_ARRAY = 3
    PERF_EVENT_ARRAY = 4
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    LRU_HASH = 9
    LRU_PERCPU_HASH = 10
    LPM_TRIE = 11
    ARRAY_OF_MAPS = 12
    HASH_OF_MAPS = 13
    DEVMAP = 14
    SOCKMAP = 15
    CPUMAP = 16
    XSKMAP = 17
    SOCKHASH = 18
    SK_STORAGE = 24
    RINGBUF = 27


class ProgType(IntEnum):
    SOCKET_FILTER = 1
    SCHED_CLS = 3
    SCHED_ACT = 4
    XDP = 6
    CGROUP_SKB = 8
    CGROUP_SOCK = 9
    SOCK_OPS = 13
    SK_SKB = 14
    SK_MSG = 16
    CGROUP_SOCK_ADDR = 18
    SK_REUSEPORT = 21
    CGROUP_SOCKOPT = 25
    SK_LOOKUP = 30


class AttachType(IntEnum):
    CGROUP_INET_INGRESS = 0
    CGROUP_INET_EGRESS = 1
    CGROUP_INET_SOCK_CREATE = 2
    CGROUP_SOCK_OPS = 3
    SK_SKB_STREAM_PARSER = 4
    SK_SKB_STREAM_VERDICT = 5
    SK_MSG_VERDICT = 7
    CGROUP_INET4_BIND = 8
    CGROUP_INET6_BIND = 9
    CGROUP_INET4_CONNECT = 10
    CGROUP_INET6_CONNECT = 11
    CGROUP_INET4_POST_BIND = 12
    CGROUP_INET6_POST_BIND = 13
    CGROUP_UDP4_SENDMSG = 14
    CGROUP_UDP6_SENDMSG = 15
    CGROUP_UDP4_RECVMSG = 19
    CGROUP_UDP6_RECVMSG = 20
    CGROUP_GETSOCKOPT = 21
    CGROUP_SETSOCKOPT = 22
    CGROUP_INET4_GETPEERNAME = 29
    CGROUP_INET6_GETPEERNAME = 30
    CGROUP_INET4_GETSOCKNAME = 31
    CGROUP_INET6_GETSOCKNAME = 32
    CGROUP_INET_SOCK_RELEASE = 34
    SK_LOOKUP = 36
    XDP = 37
    SK_SKB_VERDICT = 38


class LinkType(IntEnum):
    RAW_TRACEPOINT = 1
    TRACING = 2
    CGROUP = 3
    ITER = 4
    NETNS = 5
    XDP = 6
    PERF_EVENT = 7
    KPROBE_MULTI = 8
    STRUCT_OPS = 9


class BpfError(OSError):
    """A failed bpf(2) command (or socket option); errno is set, str() names command and object."""

    def __init__(self, err: int, command: str, target: str) -> None:
        super().__init__(err, os.strerror(err))
        self.command = command
        self.target = target

    def __str__(self) -> str:
        return f"{self.command} on {self.target}: {self.strerror}"


class _Struct(ctypes.Structure):
    """Rejects unknown field names, which plain ctypes would silently keep as attributes."""

    def __init__(self, **fields: object) -> None:
        unknown = set(fields) - {f[0] for f in self._fields_}
        if unknown:
            raise TypeError(f"{type(self).__name__} has no fields {sorted(unknown)}")
        super().__init__(**fields)


_u32, _u64, _name16 = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_char * 16


# union bpf_attr members, one per command family (include/uapi/linux/bpf.h); pointers are u64.
class _MapCreate(_Struct):
    _fields_ = (
        ("map_type", _u32),
        ("key_size", _u32),
        ("value_size", _u32),
        ("max_entries", _u32),
        ("map_flags", _u32),
        ("inner_map_fd", _u32),
        ("numa_node", _u32),
        ("map_name", _name16),
    )


class _MapElem(_Struct):  # value doubles as next_key for MAP_GET_NEXT_KEY
    _fields_ = (("map_fd", _u32), ("key", _u64), ("value", _u64), ("flags", _u64))


class _ObjPath(_Struct):
    _fields_ = (("pathname", _u64), ("bpf_fd", _u32), ("file_flags", _u32))


class _ProgAttach(_Struct):
    _fields_ = (
        ("target_fd", _u32),
        ("attach_bpf_fd", _u32),
        ("attach_type", _u32),
        ("attach_flags", _u32),
        ("replace_bpf_fd", _u32),
    )


class _TestRun(_Struct):
    _fields_ = (
        ("prog_fd", _u32),
        ("retval", _u32),
        ("data_size_in", _u32),
        ("data_size_out", _u32),
        ("data_in", _u64),
        ("data_out", _u64),
        ("repeat", _u32),
        ("duration", _u32),
        ("ctx_size_in", _u32),
        ("ctx_size_out", _u32),
        ("ctx_in", _u64),
        ("ctx_out", _u64),
    )


class _GetId(_Struct):  # start_id / prog_id / map_id / link_id share the first slot
    _fields_ = (("id", _u32), ("next_id", _u32), ("open_flags", _u32))


class _InfoByFd(_Struct):
    _fields_ = (("bpf_fd", _u32), ("info_len", _u32), ("info", _u64))


class _Query(_Struct):
    _fields_ = (
        ("target_fd", _u32),
        ("attach_type", _u32),
        ("query_flags", _u32),
        ("attach_flags", _u32),
        ("prog_ids", _u64),
        ("prog_cnt", _u32),
        ("prog_attach_flags", _u64),
    )


class _LinkCreate(_Struct):
    _fields_ = (("prog_fd", _u32), ("target_fd", _u32), ("attach_type", _u32), ("flags", _u32))


class _LinkUpdate(_Struct):
    _fields_ = (("link_fd", _u32), ("new_prog_fd", _u32), ("flags", _u32), ("old_prog_fd", _u32))


class _LinkDetach(_Struct):
    _fields_ = (("link_fd", _u32),)


# Leading parts of struct bpf_{prog,map,link}_info; the kernel fills min(info_len, its size).
class _ProgInfo(_Struct):
    _fields_ = (
        ("type", _u32),
        ("id", _u32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", _u32),
        ("xlated_prog_len", _u32),
        ("jited_prog_insns", _u64),
        ("xlated_prog_insns", _u64),
        ("load_time", _u64),
        ("created_by_uid", _u32),
        ("nr_map_ids", _u32),
        ("map_ids", _u64),
        ("name", _name16),
    )


class _MapInfo(_Struct):
    _fields_ = (
        ("type", _u32),
        ("id", _u32),
        ("key_size", _u32),
        ("value_size", _u32),
        ("max_entries", _u32),
        ("map_flags", _u32),
        ("name", _name16),
    )


class _LinkCgroup(_Struct):
    _fields_ = (("cgroup_id", _u64), ("attach_type", _u32))


class _LinkNetns(_Struct):
    _fields_ = (("netns_ino", _u32), ("attach_type", _u32))


class _LinkUnion(ctypes.Union):
    _fields_ = (("cgroup", _LinkCgroup), ("netns", _LinkNetns))


class _LinkInfo(_Struct):
    _fields_ = (("type", _u32), ("id", _u32), ("prog_id", _u32), ("u", _LinkUnion))


@dataclass(frozen=True, slots=True)
class ProgInfo:
    id: int
    type: int
    name: str
    tag: str  # 16 hex digits, as in bpftool and /proc/<pid>/fdinfo


@dataclass(frozen=True, slots=True)
class MapInfo:
    id: int
    type: int
    name: str
    key_size: int
    value_size: int
    max_entries: int
    flags: int


@dataclass(frozen=True, slots=True)
class LinkInfo:
    id: int
    type: int
    prog_id: int
    attach_type: int | None = None  # cgroup and netns links
    cgroup_id: int | None = None
    netns_ino: int | None = None


@dataclass(frozen=True, slots=True)
class TestRunResult:
    __test__ = False  # not a pytest test class, despite the name
    retval: int
    duration_ns: int  # mean per run
    data_out: bytes
    ctx_out: bytes


def _bpf(cmd: _Cmd, target: str, attr: _Struct) -> int:
    """Run one command; output fields are copied back into attr, on failure too."""
    size = ctypes.sizeof(attr)
    buf = (ctypes.c_uint8 * _ATTR_SIZE)()
    ctypes.memmove(buf, ctypes.addressof(attr), size)
    while True:
        ret = int(_syscall(_NR_BPF, cmd, ctypes.addressof(buf), _ATTR_SIZE))
        err = ctypes.get_errno()
        ctypes.memmove(ctypes.addressof(attr), buf, size)
        if ret >= 0:
            return ret
        if err != errno.EINTR:
            raise BpfError(err, f"BPF_{cmd.name}", target)


def _buf(data: bytes) -> ctypes.Array[ctypes.c_char]:
    return ctypes.create_string_buffer(data, len(data))


def _addr(buf: ctypes.Array[ctypes.c_char] | None) -> int:
    return ctypes.addressof(buf) if buf is not None else 0


def _attach_name(attach_type: int) -> str:
    try:
        return AttachType(attach_type).name
    except ValueError:
        return f"attach type {attach_type}"


def map_create(
    map_type: int, key_size: int, value_size: int, max_entries: int, name: str = "", flags: int = 0
) -> int:
    attr = _MapCreate(
        map_type=map_type,
        key_size=key_size,
        value_size=value_size,
        max_entries=max_entries,
        map_flags=flags,
        map_name=name.encode(),
    )
    return _bpf(_Cmd.MAP_CREATE, f"new map {name!r} (type {int(map_type)})", attr)


def map_update(map_fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    """key and value must be exactly the map's sizes (the kernel reads that many bytes)."""
    k, v = _buf(key), _buf(value)
    attr = _MapElem(map_fd=map_fd, key=_addr(k), value=_addr(v), flags=flags)
    _bpf(_Cmd.MAP_UPDATE_ELEM, f"map fd {map_fd}", attr)


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """value_size must cover the whole value: per-CPU maps need round_up(size, 8) * ncpus."""
    k, v = _buf(key), ctypes.create_string_buffer(value_size)
    try:
        _bpf(
            _Cmd.MAP_LOOKUP_ELEM,
            f"map fd {map_fd}",
            _MapElem(map_fd=map_fd, key=_addr(k), value=_addr(v)),
        )
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return None
        raise
    return v.raw


def map_delete(map_fd: int, key: bytes) -> bool:
    k = _buf(key)
    try:
        _bpf(_Cmd.MAP_DELETE_ELEM, f"map fd {map_fd}", _MapElem(map_fd=map_fd, key=_addr(k)))
    except BpfError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    return True


def map_keys(map_fd: int, key_size: int) -> Iterator[bytes]:
    """Walk keys with MAP_GET_NEXT_KEY, yielding at most max_entries of them.

    Collect into a list before deleting: a hash walk whose current key vanishes restarts.
    """
    cur: ctypes.Array[ctypes.c_char] | None = None
    for _ in range(map_info(map_fd).max_entries):
        nxt = ctypes.create_string_buffer(key_size)
        try:
            _bpf(
                _Cmd.MAP_GET_NEXT_KEY,
                f"map fd {map_fd}",
                _MapElem(map_fd=map_fd, key=_addr(cur), value=_addr(nxt)),
            )
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return
            raise
        yield nxt.raw
        cur = nxt


def sockmap_update(map_fd: int, key: bytes, sock_fd: int, flags: int = BPF_ANY) -> None:
    """Insert a socket into a SOCKMAP/SOCKHASH of value_size 4 or 8.

    The fd goes in as a little-endian u64; a value_size 4 map reads its low half.
    """
    map_update(map_fd, key, sock_fd.to_bytes(8, "little"), flags)


def obj_pin(fd: int, path: str | os.PathLike[str]) -> None:
    p = _buf(os.fsencode(path) + b"\0")
    _bpf(_Cmd.OBJ_PIN, f"fd {fd} at {os.fspath(path)}", _ObjPath(pathname=_addr(p), bpf_fd=fd))


def obj_get(path: str | os.PathLike[str], flags: int = 0) -> int:
    """Open a pinned object; flags 0, BPF_F_RDONLY or BPF_F_WRONLY. The fd is O_CLOEXEC."""
    p = _buf(os.fsencode(path) + b"\0")
    return _bpf(_Cmd.OBJ_GET, os.fspath(path), _ObjPath(pathname=_addr(p), file_flags=flags))


def prog_attach(
    target_fd: int, prog_fd: int, attach_type: int, flags: int = 0, replace_prog_fd: int = 0
) -> None:
    """Legacy attach (cgroup, sockmap, netns); a replace_prog_fd implies BPF_F_REPLACE."""
    if replace_prog_fd:
        flags |= BPF_F_REPLACE
    attr = _ProgAttach(
        target_fd=target_fd,
        attach_bpf_fd=prog_fd,
        attach_type=attach_type,
        attach_flags=flags,
        replace_bpf_fd=replace_prog_fd,
    )
    target = f"prog fd {prog_fd} -> fd {target_fd} ({_attach_name(attach_type)})"
    _bpf(_Cmd.PROG_ATTACH, target, attr)


def prog_detach(target_fd: int, attach_type: int, prog_fd: int = 0) -> None:
    attr = _ProgAttach(target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type)
    target = f"prog fd {prog_fd} -> fd {target_fd} ({_attach_name(attach_type)})"
    _bpf(_Cmd.PROG_DETACH, target, attr)


def prog_query(target_fd: int, attach_type: int, effective: bool = False) -> list[int]:
    """Ids of programs attached (effective: also inherited from parent cgroups), in run order."""
    cnt = 64
    while True:
        ids = (_u32 * cnt)()
        attr = _Query(
            target_fd=target_fd,
            attach_type=attach_type,
            query_flags=BPF_F_QUERY_EFFECTIVE if effective else 0,
            prog_ids=ctypes.addressof(ids),
            prog_cnt=cnt,
        )
        try:
            _bpf(_Cmd.PROG_QUERY, f"fd {target_fd} ({_attach_name(attach_type)})", attr)
        except BpfError as e:
            if e.errno == errno.ENOSPC and attr.prog_cnt > cnt:
                cnt = attr.prog_cnt
                continue
            raise
        return list(ids[: attr.prog_cnt])


def link_create(prog_fd: int, target_fd: int, attach_type: int, flags: int = 0) -> int:
    attr = _LinkCreate(prog_fd=prog_fd, target_fd=target_fd, attach_type=attach_type, flags=flags)
    target = f"prog fd {prog_fd} -> fd {target_fd} ({_attach_name(attach_type)})"
    return _bpf(_Cmd.LINK_CREATE, target, attr)


def link_update(link_fd: int, new_prog_fd: int, old_prog_fd: int = 0, flags: int = 0) -> None:
    """Swap a link's program atomically; an old_prog_fd implies BPF_F_REPLACE."""
    if old_prog_fd:
        flags |= BPF_F_REPLACE
    attr = _LinkUpdate(
        link_fd=link_fd, new_prog_fd=new_prog_fd, flags=flags, old_prog_fd=old_prog_fd
    )
    _bpf(_Cmd.LINK_UPDATE, f"link fd {link_fd}", attr)


def link_detach(link_fd: int) -> None:
    _bpf(_Cmd.LINK_DETACH, f"link fd {link_fd}", _LinkDetach(link_fd=link_fd))


def prog_get_fd_by_id(prog_id: int) -> int:
    return _bpf(_Cmd.PROG_GET_FD_BY_ID, f"prog id {prog_id}", _GetId(id=prog_id))


def map_get_fd_by_id(map_id: int) -> int:
    return _bpf(_Cmd.MAP_GET_FD_BY_ID, f"map id {map_id}", _GetId(id=map_id))


def link_get_fd_by_id(link_id: int) -> int:
    return _bpf(_Cmd.LINK_GET_FD_BY_ID, f"link id {link_id}", _GetId(id=link_id))


def _ids(cmd: _Cmd, kind: str) -> Iterator[int]:
    cur = 0
    while True:
        attr = _GetId(id=cur)
        try:
            _bpf(cmd, f"{kind} id {cur}", attr)
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return
            raise
        cur = attr.next_id
        yield cur


def prog_ids() -> Iterator[int]:
    return _ids(_Cmd.PROG_GET_NEXT_ID, "prog")


def map_ids() -> Iterator[int]:
    return _ids(_Cmd.MAP_GET_NEXT_ID, "map")


def link_ids() -> Iterator[int]:
    return _ids(_Cmd.LINK_GET_NEXT_ID, "link")


_KINDS: dict[str, Literal["map", "prog", "link"]] = {
    "anon_inode:bpf-map": "map",
    "anon_inode:bpf-prog": "prog",
    "anon_inode:bpf_link": "link",  # from link_create
    "anon_inode:bpf-link": "link",  # from obj_get / link_get_fd_by_id
}


def fd_kind(fd: int) -> Literal["map", "prog", "link"]:
    """What a bpf fd refers to, from its /proc/self/fd link (the kernel has no call for it)."""
    try:
        what = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        raise BpfError(errno.EBADF, "fd_kind", f"fd {fd}") from e
    if what not in _KINDS:
        raise BpfError(errno.EINVAL, "fd_kind", f"fd {fd} ({what})")
    return _KINDS[what]


def _info(fd: int, kind: str, info: _Struct) -> None:
    attr = _InfoByFd(bpf_fd=fd, info_len=ctypes.sizeof(info), info=ctypes.addressof(info))
    _bpf(_Cmd.OBJ_GET_INFO_BY_FD, f"{kind} fd {fd}", attr)


def _prog_info(fd: int) -> ProgInfo:
    i = _ProgInfo()
    _info(fd, "prog", i)
    return ProgInfo(i.id, i.type, i.name.decode(), bytes(i.tag).hex())


def _map_info(fd: int) -> MapInfo:
    i = _MapInfo()
    _info(fd, "map", i)
    return MapInfo(
        i.id, i.type, i.name.decode(), i.key_size, i.value_size, i.max_entries, i.map_flags
    )


def _link_info(fd: int) -> LinkInfo:
    i = _LinkInfo()
    _info(fd, "link", i)
    if i.type == LinkType.CGROUP:
        c = i.u.cgroup
        return LinkInfo(i.id, i.type, i.prog_id, c.attach_type, cgroup_id=c.cgroup_id)
    if i.type == LinkType.NETNS:
        n = i.u.netns
        return LinkInfo(i.id, i.type, i.prog_id, n.attach_type, netns_ino=n.netns_ino)
    return LinkInfo(i.id, i.type, i.prog_id)


_READERS: dict[str, Callable[[int], ProgInfo | MapInfo | LinkInfo]] = {
    "prog": _prog_info,
    "map": _map_info,
    "link": _link_info,
}
_Info = TypeVar("_Info", ProgInfo, MapInfo, LinkInfo)


def obj_info(fd: int) -> ProgInfo | MapInfo | LinkInfo:
    return _READERS[fd_kind(fd)](fd)


def _typed_info(fd: int, cls: type[_Info]) -> _Info:
    info = obj_info(fd)
    if not isinstance(info, cls):
        raise BpfError(
            errno.EINVAL,
            "BPF_OBJ_GET_INFO_BY_FD",
            f"fd {fd} (not a {cls.__name__.removesuffix('Info').lower()})",
        )
    return info


def prog_info(fd: int) -> ProgInfo:
    return _typed_info(fd, ProgInfo)


def map_info(fd: int) -> MapInfo:
    return _typed_info(fd, MapInfo)


def link_info(fd: int) -> LinkInfo:
    return _typed_info(fd, LinkInfo)


def prog_test_run(
    prog_fd: int,
    data_in: bytes,
    ctx_in: bytes | None = None,
    ctx_size_out: int = 0,
    repeat: int = 1,
    data_size_out: int | None = None,
) -> TestRunResult:
    """Run a program once or repeat times on data_in (and ctx_in) without attaching it.

    data_out has room for len(data_in) + 256 bytes unless data_size_out says otherwise; output
    larger than that, or than ctx_size_out, fails with ENOSPC. No data_in means no data_out.
    """
    out_size = (len(data_in) + 256 if data_size_out is None else data_size_out) if data_in else 0
    din, dout = _buf(data_in), ctypes.create_string_buffer(out_size)
    cin, cout = _buf(ctx_in or b""), ctypes.create_string_buffer(ctx_size_out)
    attr = _TestRun(
        prog_fd=prog_fd,
        repeat=repeat,
        data_size_in=len(data_in),
        data_in=_addr(din) if data_in else 0,
        data_size_out=out_size,
        data_out=_addr(dout) if out_size else 0,
        ctx_size_in=len(cin),
        ctx_in=_addr(cin) if ctx_in else 0,
        ctx_size_out=ctx_size_out,
        ctx_out=_addr(cout) if ctx_size_out else 0,
    )
    _bpf(_Cmd.PROG_TEST_RUN, f"prog fd {prog_fd}", attr)
    return TestRunResult(
        attr.retval, attr.duration, dout.raw[: attr.data_size_out], cout.raw[: attr.ctx_size_out]
    )


def possible_cpus() -> int:
    """Number of possible CPUs, the multiplier for per-CPU map values."""
    with open("/sys/devices/system/cpu/possible") as f:
        spans = f.read().strip().split(",")
    return sum(int(s.split("-")[-1]) - int(s.split("-")[0]) + 1 for s in spans)


def _sockopt_u64(sock: socket.socket, opt: int, name: str) -> int:
    try:
        return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, opt, 8), sys.byteorder)
    except OSError as e:
        raise BpfError(
            e.errno or errno.EINVAL, f"getsockopt({name})", f"socket fd {sock.fileno()}"
        ) from e


def netns_cookie(sock: socket.socket) -> int:
    """The socket's network namespace cookie (what bpf_get_netns_cookie returns)."""
    return _sockopt_u64(sock, _SO_NETNS_COOKIE, "SO_NETNS_COOKIE")


def socket_cookie(sock: socket.socket) -> int:
    """The socket's cookie (bpf_get_socket_cookie; SOCKMAP/SOCKHASH lookups return it)."""
    return _sockopt_u64(sock, _SO_COOKIE, "SO_COOKIE")
