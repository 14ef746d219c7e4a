"""Find a running pod's cgroup v2 directory and network namespace on this node
from its UID, the way container runtimes lay them out.

Assumptions (checked, with a clear error per pod when they do not hold):
- cgroup v2 (unified or hybrid); the kubelet's pod directory name contains
  the pod UID: cgroupfs driver `kubepods/<qos>/pod<uid>` (containerd and
  CRI-O alike), systemd driver `kubepods-<qos>-pod<uid_with_underscores>.slice`.
- some process of the pod (the sandbox's pause process at least) lives in
  that directory or below it; its /proc/<pid>/ns/net is the pod's netns.
The cgroup hooks go on the pod directory: programs attached there apply to
every container's cgroup below it.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from agent.cgroupfs import cgroup2_root

MAX_DEPTH = 6


class PodNotFound(LookupError):
    """The pod's cgroup or netns is not on this node (yet)."""


@dataclasses.dataclass(frozen=True)
class PodPaths:
    cgroup: str
    netns: str


def _names(uid: str) -> tuple[str, str]:
    return f"pod{uid}", f"pod{uid.replace('-', '_')}.slice"


def find_cgroup(uid: str, root: Path | None = None) -> Path:
    """The pod-level cgroup directory (bounded walk under the kubepods trees)."""
    base = root or cgroup2_root()
    plain, systemd = _names(uid)
    starts = [p for p in (base / "kubepods", base / "kubepods.slice") if p.is_dir()] or [base]
    for start in starts:
        for dirpath, dirnames, _ in os.walk(start):
            depth = Path(dirpath).relative_to(start).parts
            if len(depth) >= MAX_DEPTH:
                dirnames[:] = []
                continue
            for d in dirnames:
                if d == plain or d.endswith(systemd):  # ...-pod<uid_>.slice
                    return Path(dirpath) / d
    raise PodNotFound(
        f"no cgroup v2 directory for pod UID {uid} under {base} "
        "(kubepods/<qos>/pod<uid> or kubepods-<qos>-pod<uid>.slice): is the pod "
        "on this node and running, and is the kubelet on cgroup v2?"
    )


def pids_in(cgroup: Path) -> list[int]:
    out: list[int] = []
    for dirpath, _, files in os.walk(cgroup):
        if "cgroup.procs" in files:
            try:
                text = (Path(dirpath) / "cgroup.procs").read_text()
            except OSError:
                continue
            out += [int(x) for x in text.split()]
    return out


def find(uid: str, root: Path | None = None) -> PodPaths:
    cg = find_cgroup(uid, root)
    for pid in pids_in(cg):
        ns = f"/proc/{pid}/ns/net"
        if os.path.exists(ns):
            return PodPaths(str(cg), ns)
    raise PodNotFound(f"pod UID {uid}: cgroup {cg} has no process (sandbox not started?)")
