"""Network namespace helpers built on raw syscalls (ctypes), usable by any package.

Python 3.11 has no ``os.setns``/``os.unshare`` and iproute2's ``ip netns`` forks a
process per call, so the few syscalls we need are called through libc directly.
Namespace membership is per *thread*: every helper here acts on the calling
thread only, which lets one thread work inside a pod's netns while the rest of
the process stays where it was.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
from collections.abc import Iterator
from pathlib import Path

CLONE_NEWNET = 0x40000000
MS_REC = 0x4000
MS_BIND = 0x1000
MS_SHARED = 1 << 20
MNT_DETACH = 0x2

#: Where named network namespaces live (same place as ``ip netns``).
NETNS_RUN_DIR = Path("/run/netns")

_THREAD_NETNS = "/proc/thread-self/ns/net"

_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """libc, loaded once with errno capture so failures carry the real reason.

    Call it before fork() if a child will use these helpers: loading a library
    in a forked child of a threaded process can deadlock.
    """
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c") or "libc.so.6"
        _libc = ctypes.CDLL(name, use_errno=True)
    return _libc


def _check(ret: int, what: str, target: str | os.PathLike[str] | None = None) -> None:
    """Turn a failed libc return value into an OSError naming the operation."""
    if ret != 0:
        err = ctypes.get_errno()
        detail = f"{what}: {os.strerror(err)}"
        if target is not None:
            raise OSError(err, detail, str(target))
        raise OSError(err, detail)


def setns_fd(fd: int) -> None:
    """Move the calling thread into the network namespace behind ``fd``."""
    _check(libc().setns(fd, CLONE_NEWNET), "setns(CLONE_NEWNET)")


def setns_path(path: str | os.PathLike[str]) -> None:
    """Move the calling thread into the network namespace file at ``path``.

    ``path`` is a bind-mounted netns (``/run/netns/NAME``) or ``/proc/PID/ns/net``.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(libc().setns(fd, CLONE_NEWNET), "setns(CLONE_NEWNET)", path)
    finally:
        os.close(fd)


def netns_inode(path: str | os.PathLike[str] = _THREAD_NETNS) -> tuple[int, int]:
    """Identity (st_dev, st_ino) of a netns; equal tuples mean the same namespace."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


@contextlib.contextmanager
def entered(path: str | os.PathLike[str]) -> Iterator[None]:
    """Run the ``with`` body in the netns at ``path`` (calling thread only).

    An fd of the original namespace is held for the whole block, so the thread
    always gets back even if the original namespace has no name; failing to get
    back is fatal to correctness, so it raises rather than being swallowed.
    Sockets created inside the block stay bound to ``path``'s namespace.
    """
    home = os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns_path(path)
        try:
            yield
        finally:
            setns_fd(home)
    finally:
        os.close(home)


def netns_path(name: str) -> Path:
    """Path of the named netns ``name`` (no check that it exists)."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"invalid netns name {name!r}")
    return NETNS_RUN_DIR / name


def _share_run_dir() -> None:
    """Make NETNS_RUN_DIR a shared mount, as ``ip netns add`` does.

    The netns bind mounts then propagate to other mount namespaces (e.g. ones
    made by ``ip netns exec``), so every tool sees the same names.
    """
    NETNS_RUN_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    c = libc()
    run = bytes(NETNS_RUN_DIR)
    if c.mount(b"none", run, None, MS_SHARED | MS_REC, None) == 0:
        return
    if ctypes.get_errno() != errno.EINVAL:  # EINVAL: not a mount point yet
        _check(-1, "mount --make-rshared", NETNS_RUN_DIR)
    _check(c.mount(run, run, b"none", MS_BIND | MS_REC, None), "bind mount", NETNS_RUN_DIR)
    _check(
        c.mount(b"none", run, None, MS_SHARED | MS_REC, None),
        "mount --make-rshared",
        NETNS_RUN_DIR,
    )


def create_netns(name: str) -> Path:
    """Create the named netns ``name`` like ``ip netns add`` and return its path.

    The calling thread unshares into a fresh namespace, pins it with a bind
    mount and returns to where it was; no process is forked.
    """
    path = netns_path(name)
    _share_run_dir()
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444)
    os.close(fd)
    home = os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _check(libc().unshare(CLONE_NEWNET), "unshare(CLONE_NEWNET)", path)
            try:
                _check(
                    libc().mount(_THREAD_NETNS.encode(), bytes(path), b"none", MS_BIND, None),
                    "bind mount netns",
                    path,
                )
            finally:
                setns_fd(home)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise
    finally:
        os.close(home)
    return path


def delete_netns(name_or_path: str | os.PathLike[str]) -> bool:
    """Remove a named netns like ``ip netns del``; False if it did not exist.

    The namespace itself lives on while processes or sockets still use it.
    """
    path = Path(name_or_path)
    if not path.is_absolute():
        path = netns_path(str(name_or_path))
    if not os.path.lexists(path):
        return False
    ret = libc().umount2(bytes(path), MNT_DETACH)
    if ret != 0 and ctypes.get_errno() not in (errno.EINVAL, errno.ENOENT):
        _check(ret, "umount netns", path)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def list_netns() -> list[str]:
    """Names of all named network namespaces, sorted."""
    try:
        return sorted(p.name for p in NETNS_RUN_DIR.iterdir())
    except FileNotFoundError:
        return []
