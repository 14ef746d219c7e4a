"""bpfsys ctypes layouts and constants, checked without root or a kernel call."""

from __future__ import annotations

import ctypes
import errno
import glob
import re
from enum import IntEnum
from pathlib import Path

import pytest

from agent.datapath import bpfsys as b

ATTRS = [
    b._MapCreate,
    b._MapElem,
    b._ObjPath,
    b._ProgAttach,
    b._TestRun,
    b._GetId,
    b._InfoByFd,
    b._Query,
    b._LinkCreate,
    b._LinkUpdate,
    b._LinkDetach,
]
HEADERS = [
    "/usr/include/linux/bpf.h",
    *glob.glob("/usr/src/linux-headers-*/include/uapi/linux/bpf.h"),
]


def offset(struct: type[ctypes.Structure], field: str) -> int:
    return int(getattr(struct, field).offset)


@pytest.mark.parametrize("attr", ATTRS, ids=lambda s: s.__name__)
def test_attr_fits_in_union_bpf_attr(attr: type[ctypes.Structure]) -> None:
    assert ctypes.sizeof(attr) <= b._ATTR_SIZE


@pytest.mark.parametrize(
    ("struct", "field", "expected"),
    [
        (b._MapCreate, "map_flags", 16),
        (b._MapCreate, "map_name", 28),
        (b._MapElem, "key", 8),
        (b._MapElem, "value", 16),
        (b._MapElem, "flags", 24),
        (b._ObjPath, "bpf_fd", 8),
        (b._ObjPath, "file_flags", 12),
        (b._ProgAttach, "replace_bpf_fd", 16),
        (b._TestRun, "data_in", 16),
        (b._TestRun, "repeat", 32),
        (b._TestRun, "duration", 36),
        (b._TestRun, "ctx_in", 48),
        (b._TestRun, "ctx_out", 56),
        (b._GetId, "open_flags", 8),
        (b._InfoByFd, "info", 8),
        (b._Query, "prog_ids", 16),
        (b._Query, "prog_cnt", 24),
        (b._Query, "prog_attach_flags", 32),
        (b._LinkCreate, "flags", 12),
        (b._LinkUpdate, "old_prog_fd", 12),
        (b._ProgInfo, "tag", 8),
        (b._ProgInfo, "map_ids", 56),
        (b._ProgInfo, "name", 64),
        (b._MapInfo, "max_entries", 16),
        (b._MapInfo, "name", 24),
        (b._LinkInfo, "u", 16),
        (b._LinkCgroup, "attach_type", 8),
        (b._LinkNetns, "attach_type", 4),
    ],
)
def test_field_offsets_match_uapi(
    struct: type[ctypes.Structure], field: str, expected: int
) -> None:
    assert offset(struct, field) == expected


def test_struct_rejects_unknown_fields() -> None:
    with pytest.raises(TypeError, match="no fields"):
        b._MapElem(map_fd=1, nxt_key=2)


def test_error_names_command_and_object() -> None:
    err = b.BpfError(errno.ENOENT, "BPF_MAP_UPDATE_ELEM", "map fd 7")
    assert isinstance(err, OSError)
    assert (err.errno, err.strerror) == (errno.ENOENT, "No such file or directory")
    assert str(err) == "BPF_MAP_UPDATE_ELEM on map fd 7: No such file or directory"


def header_text() -> str:
    for path in HEADERS:
        if Path(path).is_file():
            return Path(path).read_text()
    pytest.skip("no uapi linux/bpf.h installed")


def header_enum(text: str, name: str) -> dict[str, int]:
    match = re.search(rf"enum {name} {{(.*?)\n}};", text, re.S)
    assert match, name
    body = re.sub(r"/\*.*?\*/|//[^\n]*", "", match.group(1), flags=re.S)
    values: dict[str, int] = {}
    nxt = 0
    for item in filter(None, (i.strip() for i in body.split(","))):
        ident, _, expr = (part.strip() for part in item.partition("="))
        if expr:
            nxt = values[expr] if expr in values else int(expr, 0)
        values[ident] = nxt
        nxt += 1
    return values


@pytest.mark.parametrize(
    ("enum", "c_name", "prefix"),
    [
        (b._Cmd, "bpf_cmd", "BPF_"),
        (b.MapType, "bpf_map_type", "BPF_MAP_TYPE_"),
        (b.ProgType, "bpf_prog_type", "BPF_PROG_TYPE_"),
        (b.AttachType, "bpf_attach_type", "BPF_"),
        (b.LinkType, "bpf_link_type", "BPF_LINK_TYPE_"),
    ],
)
def test_enums_match_header(enum: type[IntEnum], c_name: str, prefix: str) -> None:
    values = header_enum(header_text(), c_name)
    assert {m.name: m.value for m in enum} == {m.name: values[prefix + m.name] for m in enum}


def test_flags_match_header() -> None:
    text = header_text()
    flags = ["BPF_ANY", "BPF_NOEXIST", "BPF_EXIST", "BPF_F_NO_PREALLOC", "BPF_F_RDONLY"]
    flags += ["BPF_F_WRONLY", "BPF_F_ALLOW_OVERRIDE", "BPF_F_ALLOW_MULTI", "BPF_F_REPLACE"]
    flags += ["BPF_F_QUERY_EFFECTIVE"]  # the first five are enumerators, the rest #defines
    for name in flags:
        match = re.search(rf"\b{name}\s*=?\s*(?:\(1U << (\d+)\)|(\d+)\b)", text)
        assert match, name
        shift, plain = match.groups()
        assert getattr(b, name) == (1 << int(shift) if shift else int(plain)), name
