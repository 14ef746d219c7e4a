"""Write the smallest initramfs that gets a Debian kernel onto a virtio ext4 root.

Debian builds virtio_blk, virtio_pci and ext4 as modules, so the kernel cannot
mount /dev/vda by itself.  Instead of initramfs-tools inside the image, this
writes a newc cpio with busybox, the modules those three need (dependencies
from the kernel's own modules.dep, decompressed so busybox insmod can load
them), and an /init that loads them, mounts the root and switches to
/sbin/tether-init.  Every other module is loaded later from the root
filesystem by kmod (the kernel's request_module -> /sbin/modprobe).

usage: mkinitrd.py ROOT ABI BUSYBOX OUT
"""

from __future__ import annotations

import gzip
import io
import lzma
import sys
from pathlib import Path

WANTED = ("virtio_pci", "virtio_blk", "ext4", "crc32c_generic", "crc32c_intel")

INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /modules.list); do
  insmod /mods/$m 2>/dev/null || echo "initrd: insmod $m failed"
done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
mkdir -p /newroot
if ! mount -t ext4 -o rw /dev/vda /newroot; then
  echo "initrd: cannot mount /dev/vda"; ls /dev; echo o > /proc/sysrq-trigger; sleep 5
fi
mount --move /dev /newroot/dev
mount --move /proc /newroot/proc
mount --move /sys /newroot/sys
exec switch_root /newroot /sbin/tether-init
"""


def module_index(moddir: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    """name -> relative path, and relative path -> dependencies, from modules.dep."""
    paths: dict[str, str] = {}
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        deps[mod] = rest.split()
        name = Path(mod).name.split(".ko")[0].replace("-", "_")
        paths[name] = mod
    return paths, deps


def load_order(wanted: tuple[str, ...], moddir: Path) -> list[str]:
    paths, deps = module_index(moddir)
    builtin = {
        Path(m).name.split(".ko")[0].replace("-", "_")
        for m in (moddir / "modules.builtin").read_text().split()
    }
    order: list[str] = []

    def visit(mod: str) -> None:
        if mod in order:
            return
        for d in reversed(deps.get(mod, [])):  # modules.dep lists the deepest last
            visit(d)
        order.append(mod)

    for name in wanted:
        if name in paths:
            visit(paths[name])
        elif name not in builtin and name != "crc32c_intel":
            print(
                f"mkinitrd: module {name} is neither built in nor in modules.dep", file=sys.stderr
            )
    return order


class Cpio:
    """A newc archive (what the kernel unpacks as initramfs)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        nb = name.encode() + b"\0"
        hdr = b"070701" + b"".join(
            f"{v:08x}".encode()
            for v in (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nb), 0)
        )
        self.ino += 1
        self.buf.write(hdr + nb)
        self.buf.write(b"\0" * (-(len(hdr) + len(nb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def read_module(path: Path) -> bytes:
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        raise SystemExit(f"mkinitrd: {path}: zstd modules are not supported")
    return data


def main() -> None:
    root, abi, busybox, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
    moddir = root / "lib/modules" / abi
    order = load_order(WANTED, moddir)
    c = Cpio()
    for d in ("bin", "dev", "proc", "sys", "mods", "newroot"):
        c.dir(d)
    c.file("bin/busybox", busybox.read_bytes(), 0o755)
    c.file("init", INIT.encode(), 0o755)
    names = []
    for rel in order:
        name = Path(rel).name.removesuffix(".xz")
        c.file(f"mods/{name}", read_module(moddir / rel))
        names.append(name)
    c.file("modules.list", ("\n".join(names) + "\n").encode())
    out.write_bytes(gzip.compress(c.finish(), compresslevel=6))
    print(f"mkinitrd: {out} with {' '.join(names)}", file=sys.stderr)


if __name__ == "__main__":
    main()
