"""What tether holds in the kernel, read from the kernel itself (not from the
agent's bookkeeping), so tests and the demo can prove cleanup left nothing."""

from __future__ import annotations

import dataclasses
import errno
import os
import time
from pathlib import Path

from agent.datapath import bpfsys


@dataclasses.dataclass
class Inventory:
    links: set[int] = dataclasses.field(default_factory=set)
    progs: set[int] = dataclasses.field(default_factory=set)
    maps: set[int] = dataclasses.field(default_factory=set)

    def counts(self) -> dict[str, int]:
        return {"links": len(self.links), "programs": len(self.progs), "maps": len(self.maps)}


def from_pins(pin_dir: str | os.PathLike[str]) -> Inventory:
    """Every link and map pinned under pin_dir, and the programs behind the links."""
    inv = Inventory()
    root = Path(pin_dir)
    if not root.exists():
        return inv
    for pin in root.rglob("*"):
        if pin.is_dir():
            continue
        fd = bpfsys.obj_get(str(pin))
        try:
            info = bpfsys.obj_info(fd)
        finally:
            os.close(fd)
        if isinstance(info, bpfsys.LinkInfo):
            inv.links.add(info.id)
            inv.progs.add(info.prog_id)
        elif isinstance(info, bpfsys.MapInfo):
            inv.maps.add(info.id)
    return inv


def _alive(get_fd: object, ident: int) -> bool:
    try:
        fd = get_fd(ident)  # type: ignore[operator]
    except OSError as e:
        if e.errno == errno.ENOENT:
            return False
        raise
    os.close(fd)
    return True


def remaining(inv: Inventory, pin_dir: str | os.PathLike[str], wait: float = 5.0) -> dict[str, int]:
    """How many of inv's objects still exist, and whether pins remain.  The
    kernel frees programs and maps asynchronously (RCU), so poll briefly."""
    deadline = time.monotonic() + wait
    while True:
        left = {
            "links": sum(_alive(bpfsys.link_get_fd_by_id, i) for i in inv.links),
            "programs": sum(_alive(bpfsys.prog_get_fd_by_id, i) for i in inv.progs),
            "maps": sum(_alive(bpfsys.map_get_fd_by_id, i) for i in inv.maps),
            "pins": 0,
        }
        if Path(pin_dir).exists():
            left["pins"] = 1 + sum(1 for _ in Path(pin_dir).rglob("*"))
        if not any(left.values()) or time.monotonic() > deadline:
            return left
        time.sleep(0.05)
