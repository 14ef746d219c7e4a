"""cgroup v2 helpers: the agent identifies pods by cgroup, so the simulation makes real ones.

The v2 hierarchy is found through /proc/self/mountinfo rather than assumed at
/sys/fs/cgroup, because hybrid systems mount it elsewhere (e.g.
/sys/fs/cgroup/unified).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from pathlib import Path

#: How long remove_cgroup waits for killed processes to leave and dirs to go.
REMOVE_TIMEOUT_S = 10.0
_POLL_S = 0.02
#: Use cgroup.kill (Linux >= 5.14) when present; False forces the per-pid fallback.
USE_CGROUP_KILL = True


class CgroupError(RuntimeError):
    """A cgroup v2 operation could not be done; the message says what to fix."""


def _unescape_mountinfo(field: str) -> str:
    r"""Decode mountinfo's octal escapes (``\040`` is a space)."""
    out: list[str] = []
    i = 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and all(c in "01234567" for c in code):
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def cgroup2_mounts(mountinfo: str = "/proc/self/mountinfo") -> list[tuple[Path, str]]:
    """All cgroup2 mounts as (mount point, root within the hierarchy), in mount order."""
    found: list[tuple[Path, str]] = []
    with open(mountinfo, encoding="utf-8") as f:
        for line in f:
            left, sep, right = line.partition(" - ")
            if not sep:
                continue
            fields = left.split()
            if len(fields) < 5 or not right.split() or right.split()[0] != "cgroup2":
                continue
            found.append((Path(_unescape_mountinfo(fields[4])), _unescape_mountinfo(fields[3])))
    return found


def cgroup2_root(mountinfo: str = "/proc/self/mountinfo") -> Path:
    """Mount point of the cgroup v2 hierarchy, preferring a mount of its root."""
    mounts = cgroup2_mounts(mountinfo)
    if not mounts:
        raise CgroupError(
            "cgroup v2 not mounted (no cgroup2 entry in "
            f"{mountinfo}): mount -t cgroup2 none /sys/fs/cgroup"
        )
    for point, root in mounts:
        if root == "/":
            return point
    return mounts[0][0]


def own_cgroup() -> Path:
    """Directory of this process's cgroup v2 (the ``0::`` line of /proc/self/cgroup)."""
    with open("/proc/self/cgroup", encoding="utf-8") as f:
        for line in f:
            if line.startswith("0::"):
                rel = line[3:].rstrip("\n")
                return cgroup2_root() / rel.lstrip("/")
    raise CgroupError("no cgroup v2 entry ('0::') in /proc/self/cgroup")


def _require_v2_dir(path: Path) -> None:
    """Fail clearly when a directory is not inside a cgroup v2 hierarchy."""
    if not (path / "cgroup.controllers").exists():
        raise CgroupError(f"{path} is not a cgroup v2 directory (under {cgroup2_root()}?)")


def make_cgroup(path: str | os.PathLike[str]) -> Path:
    """Create a cgroup (and missing parents); fine if it already exists."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CgroupError(f"cannot create cgroup {p}: {e.strerror}") from e
    _require_v2_dir(p)
    return p


def move_pid(cgroup_dir: str | os.PathLike[str], pid: int) -> None:
    """Move process ``pid`` (all its threads) into ``cgroup_dir``."""
    procs = Path(cgroup_dir) / "cgroup.procs"
    try:
        with open(procs, "w", encoding="ascii") as f:
            f.write(f"{pid}\n")
    except OSError as e:
        raise CgroupError(f"cannot move pid {pid} into {cgroup_dir}: {e.strerror}") from e


def cgroup_pids(cgroup_dir: str | os.PathLike[str], recursive: bool = False) -> list[int]:
    """Pids in ``cgroup_dir`` (and, if recursive, its descendants)."""
    root = Path(cgroup_dir)
    dirs = [root]
    if recursive:
        dirs = [Path(d) for d, _, _ in os.walk(root)]
    pids: list[int] = []
    for d in dirs:
        try:
            text = (d / "cgroup.procs").read_text(encoding="ascii")
        except (FileNotFoundError, ProcessLookupError):
            continue
        except OSError as e:
            if e.errno in (errno.ENODEV, errno.ENOENT):
                continue
            raise
        pids.extend(int(x) for x in text.split())
    return pids


def _populated(cgroup_dir: Path) -> bool:
    """True while any process lives in the subtree (cgroup.events ``populated``)."""
    try:
        text = (cgroup_dir / "cgroup.events").read_text(encoding="ascii")
    except FileNotFoundError:
        return False
    except OSError as e:
        if e.errno == errno.ENODEV:  # directory is being removed
            return False
        raise
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key == "populated":
            return value.strip() != "0"
    return bool(cgroup_pids(cgroup_dir, recursive=True))


def _is_within(child: Path, parent: Path) -> bool:
    try:
        child.resolve().relative_to(parent.resolve())
    except ValueError:
        return False
    return True


def _kill_all(cgroup_dir: Path) -> None:
    """SIGKILL every process in the subtree, via cgroup.kill when the kernel has it."""
    kill_file = cgroup_dir / "cgroup.kill"
    if USE_CGROUP_KILL and kill_file.exists():
        try:
            kill_file.write_text("1", encoding="ascii")
            return
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ENODEV):
                return
            # fall through to per-pid kill
    for pid in cgroup_pids(cgroup_dir, recursive=True):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def remove_cgroup(cgroup_dir: str | os.PathLike[str], timeout: float = REMOVE_TIMEOUT_S) -> bool:
    """Kill everything in a cgroup subtree and remove it; False if it did not exist.

    Removal only works on empty cgroups, so processes are killed first (kills are
    repeated while waiting, to catch processes forked in the meantime), then the
    directories are removed deepest first.  Refuses to touch the hierarchy root
    or a cgroup holding this process, which would kill the caller.
    """
    d = Path(cgroup_dir)
    if not d.exists():
        return False
    if d.resolve() == cgroup2_root().resolve():
        raise CgroupError(f"refusing to remove the cgroup v2 root {d}")
    if _is_within(own_cgroup(), d):
        raise CgroupError(f"refusing to remove {d}: it contains this process ({os.getpid()})")
    deadline = time.monotonic() + timeout
    while _populated(d):
        _kill_all(d)
        if time.monotonic() > deadline:
            left = cgroup_pids(d, recursive=True)
            raise CgroupError(f"processes {left} still in {d} after SIGKILL and {timeout:.0f}s")
        time.sleep(_POLL_S)
    while True:
        busy: list[str] = []
        for sub, _, _ in os.walk(d, topdown=False):
            try:
                os.rmdir(sub)
            except FileNotFoundError:
                pass
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise CgroupError(f"cannot remove cgroup {sub}: {e.strerror}") from e
                busy.append(sub)
        if not busy:
            return True
        if time.monotonic() > deadline:
            raise CgroupError(f"cgroups still busy after {timeout:.0f}s: {busy}")
        _kill_all(d)
        time.sleep(_POLL_S)
