"""Compile tether's C programs with BCC and load them.

This is the only module that imports bcc.  It composes one translation unit
from the per-hook files in bpf/ (BCC shares maps only within one module, and
rewrites map calls only in the main file, so the lib/ headers are inlined with
#line markers that keep compiler and verifier messages pointing at the real
files), passes configuration as -D cflags, and returns program and map fds.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import importlib.resources
import io
import json
import logging
import os
import platform
import re
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.datapath.errors import DatapathError, KernelTooOld

log = logging.getLogger(__name__)

# Order matters only for readability of the composed text.
HOOK_FILES = ("sock_connect.c", "sock_peer.c", "sockops.c", "sockopt.c", "sk_lookup.c", "sk_msg.c")


@dataclasses.dataclass(frozen=True)
class ProgSpec:
    """A BPF entry point: its program type, the attach type it is loaded for,
    and the oldest kernel that has the hook."""

    name: str
    hook: str
    prog_type: int
    attach_type: int
    kernel: tuple[int, int]
    needs_ipv6: bool = False
    needs_skmsg: bool = False


# Program and attach type numbers from include/uapi/linux/bpf.h.
PROGRAMS: dict[str, ProgSpec] = {
    p.name: p
    for p in (
        # netns cookie in sock_addr programs: 5.7
        ProgSpec("tether_connect4", "cgroup/connect4", 18, 10, (5, 7)),
        ProgSpec("tether_connect6", "cgroup/connect6", 18, 11, (5, 7), needs_ipv6=True),
        ProgSpec("tether_nsprobe", "cgroup/connect4 (agent)", 18, 10, (5, 7)),
        ProgSpec("tether_peer4", "cgroup/getpeername4", 18, 29, (5, 8)),
        ProgSpec("tether_peer6", "cgroup/getpeername6", 18, 30, (5, 8), needs_ipv6=True),
        ProgSpec("tether_sockops", "sockops", 13, 3, (5, 3)),
        ProgSpec("tether_probe", "sockops (kubelet)", 13, 3, (5, 3)),
        ProgSpec("tether_agent_ops", "sockops (agent)", 13, 3, (5, 3)),
        ProgSpec("tether_sockopt", "cgroup/getsockopt", 25, 21, (5, 3)),
        ProgSpec("tether_lookup", "sk_lookup", 30, 36, (5, 9)),
        ProgSpec("tether_sk_msg", "sk_msg", 16, 7, (4, 17), needs_skmsg=True),
    )
}

# Maps: name -> (map type, key size, value size); checked against pinned maps
# before they are adopted.
MAPS: dict[str, tuple[int, int, int]] = {
    "tether_pods": (1, 8, 8),
    "tether_podips": (1, 20, 8),
    "tether_orig": (9, 8, 20),
    "tether_tuple": (9, 40, 20),
    "tether_bypass": (9, 40, 1),
    "tether_ports": (1, 8, 1),
    "tether_nets": (11, 28, 1),
    "tether_cfg": (2, 4, 8),
    "tether_stats": (6, 4, 8),
    "tether_listen": (15, 4, 4),
    "tether_socks": (18, 40, 4),
    "tether_nscookie": (9, 8, 8),
}
PINNED_MAPS = tuple(
    n for n, (t, _, _) in MAPS.items() if t not in (15, 18) and n != "tether_nscookie"
)


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """Everything that is compiled into the programs (-D cflags)."""

    pin_dir: str = "/sys/fs/bpf/tether"
    outbound_port: int = 15001
    inbound_port: int = 15006
    hbone_port: int = 15008
    max_pods: int = 1024
    max_conns: int = 65536
    ipv6: bool = True
    skmsg: bool = True
    debug: bool = False

    def cflags(self) -> list[str]:
        return [
            f'-DTETHER_PIN_DIR="{self.pin_dir}"',
            f"-DTETHER_OUTBOUND_PORT={self.outbound_port}",
            f"-DTETHER_INBOUND_PORT={self.inbound_port}",
            f"-DTETHER_HBONE_PORT={self.hbone_port}",
            f"-DTETHER_MAX_PODS={self.max_pods}",
            f"-DTETHER_MAX_CONNS={self.max_conns}",
            f"-DTETHER_ENABLE_IPV6={int(self.ipv6)}",
            f"-DTETHER_ENABLE_SKMSG={int(self.skmsg)}",
            f"-DTETHER_DEBUG={int(self.debug)}",
        ]

    def programs(self) -> list[ProgSpec]:
        return [
            p
            for p in PROGRAMS.values()
            if (self.ipv6 or not p.needs_ipv6) and (self.skmsg or not p.needs_skmsg)
        ]


def bpf_dir() -> Path:
    """The installed C sources (package data), resolved to an absolute path:
    BCC resolves relative paths against sys.argv[0]."""
    return Path(str(importlib.resources.files("agent.bpf"))).resolve()


_INCLUDE = re.compile(r'^\s*#include\s+"([\w./]+)"')


def compose_source(opts: BuildOptions, directory: Path | None = None) -> str:
    """The single translation unit BCC compiles (what `tether bpf-source` prints)."""
    base = directory or bpf_dir()
    seen: set[Path] = set()

    def inline(path: Path) -> str:
        out = [f'#line 1 "{path}"\n']
        for lineno, line in enumerate(path.read_text().splitlines(keepends=True), 1):
            m = _INCLUDE.match(line)
            if not m:
                out.append(line)
                continue
            inc = (path.parent / m.group(1)).resolve()
            if not inc.exists():
                inc = (base / "lib" / m.group(1)).resolve()
            if inc not in seen:
                seen.add(inc)
                out.append(inline(inc))
            out.append(f'#line {lineno + 1} "{path}"\n')
        return "".join(out)

    files = [f for f in HOOK_FILES if opts.skmsg or f != "sk_msg.c"]
    return "".join(inline(base / f) for f in files)


def kernel_version() -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", platform.release())
    if not m:
        raise DatapathError(f"cannot parse kernel version {platform.release()!r}")
    return int(m.group(1)), int(m.group(2))


# Where the tether image keeps Debian's kernel headers for nodes that have none
# (daemonset/image/kernel-headers.sh): `build` and `source` as in
# /lib/modules/<release>.  Outside /usr/src, because the DaemonSet mounts the
# node's /usr/src (where the node's own /lib/modules links point) over it.
IMAGE_HEADERS = "/usr/lib/tether/kernel-headers"


def _has_build(d: Path) -> bool:
    """`d` (laid out as /lib/modules/<release>) has a configured build tree."""
    return (d / "build" / "include" / "generated" / "autoconf.h").exists()


def _has_node_headers() -> bool:
    modules = Path("/lib/modules") / platform.release()
    return _has_build(modules) or Path("/sys/kernel/kheaders.tar.xz").exists()


def image_headers() -> Path | None:
    """The packaged headers' directory ($TETHER_KERNEL_HEADERS, else
    IMAGE_HEADERS) if it holds a build and a source tree, else None."""
    d = Path(os.environ.get("TETHER_KERNEL_HEADERS") or IMAGE_HEADERS)
    if _has_build(d) and (d / "source" / "include" / "linux" / "kconfig.h").exists():
        return d
    return None


def check_headers() -> Path | None:
    """BCC needs kernel headers at /lib/modules/$(uname -r)/build (or the
    kernel's built-in /sys/kernel/kheaders.tar.xz).  None when the node has
    them; the packaged headers' directory when only those exist (the compile
    child mounts them, see use_image_headers); DatapathError otherwise."""
    if _has_node_headers():
        return None
    fallback = image_headers()
    if fallback is not None:
        return fallback
    kdir = Path("/lib/modules") / platform.release()
    raise DatapathError(
        f"no kernel headers for {platform.release()} in {kdir}/build: BCC cannot compile. "
        "Run `vagrant/provision.sh` (installs the distribution's headers and links them "
        "for kernels that have none packaged), or install linux-headers-$(uname -r); "
        "the tether image carries Debian's in "
        f"{IMAGE_HEADERS} (TETHER_KERNEL_HEADERS names another directory)."
    )


_CLONE_NEWNS = 0x00020000
_MS_REC = 0x4000
_MS_PRIVATE = 1 << 18


def use_image_headers(headers: Path) -> None:
    """In the compile child only: a private mount namespace whose
    /lib/modules/<release> holds `build` and `source` links to the packaged
    headers, where BCC looks.  BCC needs headers that parse; the verifier
    checks the programs against the running kernel, as on hosts where
    provision.sh links Debian's 6.1 headers for a newer kernel.  Nothing
    outside this process sees the mount, and it goes away when it exits."""
    libc = ctypes.CDLL(None, use_errno=True)

    def check(rc: int, what: str) -> None:
        if rc != 0:
            err = ctypes.get_errno()
            raise DatapathError(
                f"using the image's kernel headers in {headers}: {what}: {os.strerror(err)} "
                "(needs CAP_SYS_ADMIN, as the agent has; or install the node's headers)"
            )

    check(libc.unshare(_CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    check(libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None), "mount --make-rprivate /")
    mods = Path("/lib/modules")
    mods.mkdir(exist_ok=True)
    check(
        libc.mount(b"tether-headers", b"/lib/modules", b"tmpfs", 0, b"mode=0755,size=64k"),
        "tmpfs on /lib/modules",
    )
    rel = mods / platform.release()
    rel.mkdir()
    (rel / "build").symlink_to((headers / "build").resolve())
    (rel / "source").symlink_to((headers / "source").resolve())


def _import_bcc() -> Any:
    try:
        import bcc
    except ImportError as e:
        raise DatapathError(
            "BCC's Python module is not importable: install Debian's python3-bpfcc and use "
            "a venv built from /usr/bin/python3 with --system-site-packages "
            f"(vagrant/provision.sh does both). ({e})"
        ) from e
    return bcc


@contextlib.contextmanager
def _capture_fd2() -> Iterator[io.StringIO]:
    """BCC prints compiler and verifier messages to fd 2 from C; keep them for
    the error we raise instead of letting them scatter over the agent's log.
    A temporary file, not a pipe: a verifier log can exceed a pipe's buffer."""
    buf = io.StringIO()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield buf
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            buf.write(tmp.read().decode(errors="replace"))


class BccPrograms:
    """A compiled and loaded module: program fds by name, map fds by name.
    Owns the BCC object; close() releases every fd it holds.  Runs in the
    compile child (see Programs), or in process for tests that want it."""

    def __init__(self, opts: BuildOptions) -> None:
        bcc = _import_bcc()
        fallback = check_headers()
        if fallback is not None:
            raise DatapathError(
                f"no kernel headers for {platform.release()} on this node: only the compile "
                f"child (Programs) can use the image's, in {fallback}"
            )
        Path(opts.pin_dir).mkdir(parents=True, exist_ok=True)
        self.opts = opts
        self.kernel = kernel_version()
        text = compose_source(opts)
        # The captured text is in `log` only once the with block has exited.
        failed: Exception | None = None
        with _capture_fd2() as log:
            try:
                self._bpf = bcc.BPF(text=text.encode(), cflags=opts.cflags())
            except Exception as e:
                failed = e
        if failed is not None:
            raise DatapathError(
                f"BPF compile failed: {failed}\n{log.getvalue()[-4000:]}"
            ) from failed
        self.prog_fds: dict[str, int] = {}
        self.map_fds: dict[str, int] = {}
        try:
            for spec in opts.programs():
                self.prog_fds[spec.name] = self._load(spec)
            lib = bcc.libbcc.lib
            for name in MAPS:
                fd = lib.bpf_table_fd(self._bpf.module, name.encode())
                if fd < 0:
                    raise DatapathError(f"map {name} missing from the compiled module")
                self.map_fds[name] = fd
        except BaseException:
            self._bpf.cleanup()  # release map and program fds; nothing is attached yet
            raise

    def _load(self, spec: ProgSpec) -> int:
        failed: Exception | None = None
        with _capture_fd2() as log:
            try:
                fn = self._bpf.load_func(
                    spec.name.encode(), spec.prog_type, attach_type=spec.attach_type
                )
            except Exception as e:
                failed = e
        if failed is not None:
            if self.kernel < spec.kernel:
                raise KernelTooOld(spec.hook, spec.kernel, self.kernel) from failed
            raise DatapathError(
                f"the kernel rejected {spec.name} ({spec.hook}): {failed}\n"
                f"verifier log (tail):\n{log.getvalue()[-4000:]}"
            ) from failed
        return int(fn.fd)

    def close(self) -> None:
        self._bpf.cleanup()
        self.prog_fds.clear()
        self.map_fds.clear()


class Programs:
    """The programs and maps, compiled in a short-lived child process.

    BCC compiles with LLVM and clang inside the calling process and never
    gives the memory back: an agent that compiled in process kept ~200 MiB
    resident, most of it libLLVM and libclang mappings (measured by
    `tether bench tunnel`).  The child compiles and loads, sends every
    program and map fd over a socket (SCM_RIGHTS) and exits; the kernel
    objects live on through the fds the agent now holds.  Errors come back
    with the compiler or verifier text, as DatapathError or KernelTooOld.
    """

    def __init__(self, opts: BuildOptions) -> None:
        self.opts = opts
        self.kernel = kernel_version()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with ours, theirs:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "agent.datapath.loader",
                    str(theirs.fileno()),
                    json.dumps(dataclasses.asdict(opts)),
                ],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
            )
            theirs.close()
            try:
                header, fds = _recv_bundle(ours)
            finally:
                with contextlib.suppress(OSError):
                    ours.sendall(b"done")
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
        if not header.get("ok"):
            err = header.get("error", "compile child failed")
            if header.get("kind") == "KernelTooOld":
                hook, needs, has = header["args"]
                raise KernelTooOld(hook, (needs[0], needs[1]), (has[0], has[1]))
            raise DatapathError(err)
        # Where BCC found kernel headers: "" the node's, else the image's.
        self.image_headers: str = header.get("headers", "")
        if self.image_headers:
            log.warning(
                "no kernel headers for %s on this node: compiled against the image's "
                "(%s); the kernel verified the programs",
                platform.release(),
                self.image_headers,
            )
        names = header["progs"] + header["maps"]
        by_name = dict(zip(names, fds, strict=True))
        self.prog_fds: dict[str, int] = {n: by_name[n] for n in header["progs"]}
        self.map_fds: dict[str, int] = {n: by_name[n] for n in header["maps"]}

    def close(self) -> None:
        for fd in [*self.prog_fds.values(), *self.map_fds.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.prog_fds.clear()
        self.map_fds.clear()


def _recv_bundle(sock: socket.socket) -> tuple[dict[str, Any], list[int]]:
    sock.settimeout(300)  # a cold BCC compile under TCG is slow
    buf = b""
    fds: list[int] = []
    while b"\n" not in buf:
        msg, got, _, _ = socket.recv_fds(sock, 65536, 64)
        if not msg and not got:
            raise DatapathError(
                "the BPF compile child exited without an answer (see its stderr above)"
            )
        buf += msg
        fds += got
    line = buf.partition(b"\n")[0]
    header: dict[str, Any] = json.loads(line)
    want = len(header.get("progs", [])) + len(header.get("maps", []))
    while len(fds) < want:
        _, got, _, _ = socket.recv_fds(sock, 1, 64)
        if not got:
            raise DatapathError("the BPF compile child sent fewer fds than it announced")
        fds += got
    return header, fds


def _child_main(fd: int, opts_json: str) -> int:
    """In the compile child: build, then hand every fd to the parent."""
    sock = socket.socket(fileno=fd)
    opts = BuildOptions(**json.loads(opts_json))
    headers = ""
    try:
        fallback = check_headers()
        if fallback is not None:
            use_image_headers(fallback)
            headers = str(fallback)
        progs = BccPrograms(opts)
    except KernelTooOld as e:
        header = {
            "ok": False,
            "kind": "KernelTooOld",
            "error": str(e),
            "args": [e.hook, list(e.needs), list(e.has)],
        }
        sock.sendall(json.dumps(header).encode() + b"\n")
        return 0
    except Exception as e:  # anything: the parent must get words, not a dead pipe
        msg = str(e) if isinstance(e, DatapathError) else f"{type(e).__name__}: {e}"
        sock.sendall(json.dumps({"ok": False, "error": msg}).encode() + b"\n")
        return 0
    names_p, names_m = list(progs.prog_fds), list(progs.map_fds)
    header = {"ok": True, "progs": names_p, "maps": names_m, "headers": headers}
    fds = [progs.prog_fds[n] for n in names_p] + [progs.map_fds[n] for n in names_m]
    socket.send_fds(sock, [json.dumps(header).encode() + b"\n"], fds[:64])
    for i in range(64, len(fds), 64):
        socket.send_fds(sock, [b"+"], fds[i : i + 64])
    sock.settimeout(60)
    with contextlib.suppress(OSError):
        sock.recv(16)  # the parent holds its copies now
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(int(sys.argv[1]), sys.argv[2]))
