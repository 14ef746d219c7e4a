"""netns tier: the agent's own links across agent pods.

On a real node (tests/node) a deleted agent pod's successor crash-looped:
the agent's getsockopt/sockops/connect4 hooks were pinned under one fixed
name on the *first* pod's cgroup, the successor updated that link instead of
attaching to its own cgroup, and once the first pod's cgroup was freed the
kernel severed the link: BPF_LINK_UPDATE failed with ENOLINK at every start.
Here, on real cgroups and bpffs pins (per-run names), without a cluster:

- an agent restarted in the same cgroup adopts its links (same ids);
- an agent in a new cgroup gets links of its own, and the old cgroup's are
  kept while it lives and unpinned once the kernel has severed them;
- a severed link under a fixed name (the kubelet's cgroup, recreated) is
  replaced, not fatal.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import cgroupfs
from agent.datapath import bpfsys
from agent.datapath.datapath import AGENT_LINKS, Datapath, DatapathConfig, detach_pins
from agent.datapath.loader import BuildOptions
from agent.sim.topology import random_prefix

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="netns tier needs root")


def _severed(pin: Path, prog_fd: int) -> bool:
    fd = bpfsys.obj_get(str(pin))
    try:
        bpfsys.link_update(fd, prog_fd)
        return False
    except OSError as e:
        if e.errno == errno.ENOLINK:
            return True
        raise
    finally:
        os.close(fd)


def _wait_severed(pin: Path, prog_fd: int, timeout: float = 20.0) -> None:
    """The kernel frees a removed cgroup (and severs its links) asynchronously."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _severed(pin, prog_fd):
            return
        time.sleep(0.1)
    raise AssertionError(f"{pin} not severed {timeout:g} s after its cgroup was removed")


class Run:
    def __init__(self, tmp: Path) -> None:
        self.prefix = random_prefix("tl")
        root = cgroupfs.cgroup2_root()
        self.cgroups = {name: root / f"{self.prefix}-{name}" for name in ("a", "b", "kubelet")}
        self.pins = Path("/sys/fs/bpf") / self.prefix
        self.opts = BuildOptions(pin_dir=str(self.pins))
        self.state = tmp
        self.progs = None
        self.dps: list[Datapath] = []

    def datapath(self, agent: str, kubelet: bool = False) -> Datapath:
        cfg = DatapathConfig(
            build=self.opts,
            state_dir=str(self.state),
            agent_cgroup=str(self.cgroups[agent]),
            kubelet_cgroups=(str(self.cgroups["kubelet"]),) if kubelet else (),
        )
        dp = Datapath(cfg)
        dp.progs = self.progs  # one compile for the module: prepare() keeps them
        dp.start()
        self.progs = dp.progs
        self.dps.append(dp)
        return dp

    def links(self) -> set[str]:
        return {p.name for p in (self.pins / "links").iterdir()}

    def close(self) -> None:
        with contextlib.suppress(OSError):
            detach_pins(self.pins / "links")
        if self.progs is not None:
            self.progs.close()
        for p in sorted(self.pins.glob("*"), reverse=True):
            with contextlib.suppress(OSError):
                p.unlink()
        with contextlib.suppress(OSError):
            self.pins.rmdir()
        for cg in self.cgroups.values():
            if cg.exists():
                cgroupfs.remove_cgroup(cg)


@pytest.fixture
def run(tmp_path: Path) -> Iterator[Run]:
    r = Run(tmp_path)
    try:
        for cg in r.cgroups.values():
            cgroupfs.make_cgroup(cg)
        yield r
    finally:
        r.close()


def test_agent_links_follow_the_agent_cgroup_and_severed_links_do_not_stop_a_start(
    run: Run,
) -> None:
    ino = {name: cg.stat().st_ino for name, cg in run.cgroups.items()}
    first = run.datapath("a", kubelet=True)
    assert run.links() == {f"{n}-{ino['a']}" for n in AGENT_LINKS} | {"probe0"}
    # restarted in its own pod (same cgroup): the links are adopted
    again = run.datapath("a", kubelet=True)
    assert again.node_links == first.node_links

    # a new agent pod: links of its own; the old pod's kept while it lives
    second = run.datapath("b", kubelet=True)
    assert {second.node_links[n] for n in AGENT_LINKS}.isdisjoint(
        first.node_links[n] for n in AGENT_LINKS
    )
    assert run.links() == {f"{n}-{c}" for n in AGENT_LINKS for c in (ino["a"], ino["b"])} | {
        "probe0"
    }

    # the old pod goes: its cgroup is freed and the kernel severs its links
    assert run.progs is not None
    sockopt_fd = run.progs.prog_fds["tether_sockopt"]
    cgroupfs.remove_cgroup(run.cgroups["a"])
    _wait_severed(run.pins / "links" / f"sockopt-{ino['a']}", sockopt_fd)
    # the kubelet restarts: its cgroup is made anew, the pinned probe link is severed
    probe_fd = run.progs.prog_fds["tether_probe"]
    cgroupfs.remove_cgroup(run.cgroups["kubelet"])
    _wait_severed(run.pins / "links" / "probe0", probe_fd)
    cgroupfs.make_cgroup(run.cgroups["kubelet"])

    # what crash-looped on the real node: this start must succeed
    third = run.datapath("b", kubelet=True)
    assert run.links() == {f"{n}-{ino['b']}" for n in AGENT_LINKS} | {"probe0"}
    assert {third.node_links[n] for n in AGENT_LINKS} == {second.node_links[n] for n in AGENT_LINKS}
    assert third.node_links["probe0"] != second.node_links["probe0"]  # attached anew
    assert not _severed(run.pins / "links" / "probe0", probe_fd)
