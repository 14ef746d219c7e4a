"""The ctypes mirrors in agent/datapath/structs.py match bpf/lib/types.h, as compiled.

The Cilium way: the real header is compiled for the BPF target by BCC's clang,
and a program run once with BPF_PROG_TEST_RUN writes every sizeof / offsetof
(and every constant the agent mirrors) into an array map, so the numbers are
the compiler's, not a re-parse of the header.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from collections.abc import Iterator

import pytest

from agent.datapath import bpfsys, structs
from agent.datapath.loader import bpf_dir

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0, reason="bpf tier needs root (bpf(2), bpffs, cgroup v2)"
)

# C expression -> what the Python side says it is
Probe = tuple[str, int]


def _struct_probes(cname: str) -> list[Probe]:
    cls = structs.MIRRORS[cname]
    probes: list[Probe] = [
        (f"sizeof(struct {cname})", ctypes.sizeof(cls)),
        (f"__alignof__(struct {cname})", ctypes.alignment(cls)),
    ]
    for fname, *_ in cls._fields_:
        field = getattr(cls, fname)
        probes.append((f"offsetof(struct {cname}, {fname})", field.offset))
        probes.append((f"sizeof(((struct {cname} *)0)->{fname})", field.size))
    return probes


def _layout_probes() -> list[Probe]:
    return [p for cname in structs.MIRRORS for p in _struct_probes(cname)]


def _constant_probes() -> list[Probe]:
    probes: list[Probe] = [
        ("TETHER_POD_OUTBOUND", structs.POD_OUTBOUND),
        ("TETHER_POD_INBOUND", structs.POD_INBOUND),
        ("TETHER_DIR_OUT", structs.DIR_OUT),
        ("TETHER_DIR_IN", structs.DIR_IN),
        ("TETHER_LISTEN_PER_POD", structs.LISTEN_PER_POD),
        ("TETHER_CFG_SKMSG", structs.CFG_SKMSG),
        ("TETHER_STAT_MAX", structs.STAT_MAX),
    ]
    probes += [(f"TETHER_LISTEN_{m.name}", int(m)) for m in structs.Listen]
    probes += [(f"TETHER_STAT_{m.name}", int(m)) for m in structs.Stat]
    return probes


PROBES = _layout_probes() + _constant_probes()


def _program(probes: list[Probe]) -> str:
    header = (bpf_dir() / "lib" / "types.h").resolve()
    body = "".join(
        f"\tk = {i}; v = (u64)({expr}); layout.update(&k, &v);\n"
        for i, (expr, _) in enumerate(probes)
    )
    return (
        f'#include "{header}"\n'
        f"BPF_ARRAY(layout, u64, {len(probes)});\n"
        "int export_layout(struct __sk_buff *skb)\n{\n"
        "\tu32 k;\n\tu64 v;\n"
        f"{body}"
        "\treturn 0;\n}\n"
    )


@pytest.fixture(scope="module")
def compiled() -> Iterator[dict[str, int]]:
    """expr -> value as the BPF compiler computed it."""
    import bcc

    b = bcc.BPF(text=_program(PROBES).encode())
    try:
        fn = b.load_func(b"export_layout", bcc.BPF.SCHED_CLS)
        res = bpfsys.prog_test_run(fn.fd, bytes(64))
        assert res.retval == 0
        fd = b[b"layout"].get_fd()
        out: dict[str, int] = {}
        for i, (expr, _) in enumerate(PROBES):
            v = bpfsys.map_lookup(fd, i.to_bytes(4, sys.byteorder), 8)
            assert v is not None
            out[expr] = int.from_bytes(v, sys.byteorder)
        yield out
    finally:
        b.cleanup()


def test_every_mirrored_struct_is_probed() -> None:
    # the header's structs are exactly the mirrored ones (a new struct needs a mirror)
    text = (bpf_dir() / "lib" / "types.h").read_text()
    in_header = set(re.findall(r"^struct (\w+) \{", text, re.M))
    assert in_header == set(structs.MIRRORS)


@pytest.mark.parametrize("cname", sorted(structs.MIRRORS))
def test_struct_layout_matches_header(compiled: dict[str, int], cname: str) -> None:
    cls = structs.MIRRORS[cname]
    mismatches = [
        f"{expr}: C {compiled[expr]} != Python {want}"
        for expr, want in _struct_probes(cname)
        if compiled[expr] != want
    ]
    assert not mismatches, "\n".join(mismatches)
    # and no implicit padding: members tile the struct exactly
    total = sum(compiled[f"sizeof(((struct {cname} *)0)->{f})"] for f, *_ in cls._fields_)
    assert total == compiled[f"sizeof(struct {cname})"], f"struct {cname} has padding"


@pytest.mark.parametrize(
    ("expr", "want"), _constant_probes(), ids=[e for e, _ in _constant_probes()]
)
def test_constant_matches_header(compiled: dict[str, int], expr: str, want: int) -> None:
    assert compiled[expr] == want


def test_stat_enum_is_dense() -> None:
    assert [int(s) for s in structs.Stat] == list(range(structs.STAT_MAX))
