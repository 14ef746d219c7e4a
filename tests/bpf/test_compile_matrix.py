"""Every build configuration compiles, verifies and yields all its programs and maps."""

from __future__ import annotations

import itertools
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.datapath import bpfsys, loader
from agent.datapath.errors import DatapathError
from agent.datapath.loader import (
    HOOK_FILES,
    MAPS,
    PROGRAMS,
    BuildOptions,
    Programs,
    bpf_dir,
    compose_source,
)

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="bpf tier needs root (bpf(2), bpffs, cgroup v2)"
)

MATRIX = list(itertools.product([True, False], [True, False], [False, True]))
LIB_HEADERS = ("common.h", "maps.h", "types.h")
_LINE = re.compile(r'^#line (\d+) "([^"]+)"$')


@pytest.mark.parametrize(
    ("ipv6", "skmsg", "debug"),
    MATRIX,
    ids=[f"ipv6={a}-skmsg={b}-debug={c}" for a, b, c in MATRIX],
)
def test_build_loads_every_program_and_map(
    pin_dir: Path, ipv6: bool, skmsg: bool, debug: bool
) -> None:
    opts = BuildOptions(pin_dir=str(pin_dir), ipv6=ipv6, skmsg=skmsg, debug=debug)
    try:
        progs = Programs(opts)
    except DatapathError as e:  # carries the compiler / verifier text
        pytest.fail(f"build {opts} failed:\n{e}")
    try:
        wanted = {p.name for p in opts.programs()}
        assert set(progs.prog_fds) == wanted
        if not ipv6:
            assert not wanted & {"tether_connect6", "tether_peer6"}
        if not skmsg:
            assert "tether_sk_msg" not in wanted
        for name, fd in progs.prog_fds.items():
            info = bpfsys.prog_info(fd)
            assert info.type == PROGRAMS[name].prog_type, name
            assert name.startswith(info.name), (name, info.name)  # names cut at 15 chars
        assert set(progs.map_fds) == set(MAPS)
        for name, fd in progs.map_fds.items():
            info = bpfsys.map_info(fd)
            assert (info.type, info.key_size, info.value_size) == MAPS[name], name
        # the pinned maps are really pinned under this build's pin dir
        for name in MAPS:
            pinned = pin_dir / name
            if name not in loader.PINNED_MAPS:  # socket maps, the netns-cookie probe
                assert not pinned.exists(), name
                continue
            fd = bpfsys.obj_get(pinned)
            try:
                assert bpfsys.map_info(fd).id == bpfsys.map_info(progs.map_fds[name]).id
            finally:
                os.close(fd)
    finally:
        progs.close()


@pytest.mark.parametrize("skmsg", [True, False])
def test_compose_source_line_markers(skmsg: bool) -> None:
    opts = BuildOptions(skmsg=skmsg)
    text = compose_source(opts)
    base = bpf_dir()
    starts: list[Path] = []
    cur_file: Path | None = None
    cur_line = 0
    lines_of: dict[Path, list[str]] = {}
    for out_line in text.splitlines():
        m = _LINE.match(out_line)
        if m:
            cur_file, cur_line = Path(m.group(2)), int(m.group(1))
            assert cur_file.is_absolute() and cur_file.is_file(), f"#line names {cur_file}"
            if cur_line == 1:
                starts.append(cur_file.resolve())
            if cur_file not in lines_of:
                lines_of[cur_file] = cur_file.read_text().splitlines()
            continue
        # every text line is the line of the real file the last marker points at
        assert cur_file is not None, "text before the first #line marker"
        real = lines_of[cur_file]
        assert cur_line <= len(real), f"{cur_file}:{cur_line} past the end"
        assert out_line == real[cur_line - 1], f"{cur_file}:{cur_line} mismatch"
        cur_line += 1

    hooks = [f for f in HOOK_FILES if skmsg or f != "sk_msg.c"]
    for f in hooks:
        assert starts.count((base / f).resolve()) == 1, f
    if not skmsg:
        assert (base / "sk_msg.c").resolve() not in starts
    for h in LIB_HEADERS:
        assert starts.count((base / "lib" / h).resolve()) == 1, h
    assert len(starts) == len(hooks) + len(LIB_HEADERS)
    # every quoted include was inlined; only system (<...>) includes remain
    assert not re.search(r'^\s*#include\s+"', text, re.M)


def test_compile_error_carries_compiler_text(
    pin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = compose_source

    def broken(opts: BuildOptions, directory: Path | None = None) -> str:
        return good(opts, directory) + "\nint tether_broken(void *ctx) { return undeclared_x; }\n"

    monkeypatch.setattr(loader, "compose_source", broken)
    with pytest.raises(DatapathError) as exc:
        loader.BccPrograms(BuildOptions(pin_dir=str(pin_dir)))  # in process: monkeypatched
    assert "undeclared_x" in str(exc.value), str(exc.value)


def test_errors_in_the_compile_child_reach_the_agent(pin_dir: Path) -> None:
    """The agent compiles in a child process; its failure comes back whole."""
    with pytest.raises(DatapathError) as exc:
        Programs(BuildOptions(pin_dir=str(pin_dir), max_conns=0))  # maps of size 0
    assert "BPF compile failed" in str(exc.value) or "rejected" in str(exc.value), exc.value


def test_verifier_rejection_carries_verifier_log(
    pin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = compose_source

    def rejected(opts: BuildOptions, directory: Path | None = None) -> str:
        # a load through a scalar: compiles, but the verifier refuses it
        return good(opts, directory) + (
            "\nint tether_bad(struct __sk_buff *skb){ return *(volatile int *)(long)skb->len; }\n"
        )

    monkeypatch.setattr(loader, "compose_source", rejected)
    monkeypatch.setitem(
        loader.PROGRAMS, "tether_bad", loader.ProgSpec("tether_bad", "tc", 3, 0, (4, 1))
    )
    progs = None
    with pytest.raises(DatapathError) as exc:
        progs = loader.BccPrograms(BuildOptions(pin_dir=str(pin_dir)))
    if progs is not None:  # pragma: no cover - only if the kernel accepted it
        progs.close()
    msg = str(exc.value)
    assert "tether_bad" in msg
    assert "verifier log" in msg and "invalid mem access" in msg, msg


def _compile_without_node_headers(pin_dir: Path, headers: Path) -> dict[str, object]:
    """Programs() in a process whose /lib/modules is an empty tmpfs (a node
    with no headers for its kernel), with TETHER_KERNEL_HEADERS=headers."""
    code = f"""
import json
from agent.datapath.errors import DatapathError
from agent.datapath.loader import BuildOptions, Programs
try:
    p = Programs(BuildOptions(pin_dir={str(pin_dir)!r}))
except DatapathError as e:
    print(json.dumps({{"error": str(e)}}))
else:
    print(json.dumps({{"headers": p.image_headers, "progs": sorted(p.prog_fds)}}))
    p.close()
"""
    script = 'mount -t tmpfs tether-test /lib/modules && exec "$0" -c "$1"'
    env = {**os.environ, "TETHER_KERNEL_HEADERS": str(headers)}
    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]
    out = subprocess.run(
        [*cmd, sys.executable, code],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def test_node_without_headers_compiles_against_the_image_headers(
    pin_dir: Path, tmp_path: Path
) -> None:
    """The DaemonSet hides the image's /usr/src under the node's; on a node
    with no headers for its kernel the compile child mounts the image's copy
    (daemonset/image/kernel-headers.sh's layout: build and source links) in a
    private mount namespace, and every program still loads.  The host's own
    headers stand in for the image's here."""
    mods = Path("/lib/modules") / platform.release()
    packaged = tmp_path / "kernel-headers"
    packaged.mkdir()
    (packaged / "build").symlink_to((mods / "build").resolve())
    # Debian splits a build tree and a source tree; a merged tree is both
    source = mods / "source" if (mods / "source").exists() else mods / "build"
    (packaged / "source").symlink_to(source.resolve())
    before = sorted(p.name for p in mods.iterdir())
    got = _compile_without_node_headers(pin_dir, packaged)
    assert got.get("headers") == str(packaged), got
    assert got.get("progs") == sorted(p.name for p in BuildOptions().programs()), got
    # the mount was the child's alone
    assert sorted(p.name for p in mods.iterdir()) == before


def test_node_without_any_headers_names_the_fix(pin_dir: Path, tmp_path: Path) -> None:
    got = _compile_without_node_headers(pin_dir, tmp_path / "none")
    err = str(got.get("error", ""))
    assert f"no kernel headers for {platform.release()}" in err, got
    assert "TETHER_KERNEL_HEADERS" in err and "linux-headers-$(uname -r)" in err, got
