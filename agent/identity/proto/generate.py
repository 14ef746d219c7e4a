"""Regenerate ca_pb2.py, ca_pb2.pyi and ca_pb2_grpc.py from ca.proto.

The proto is compiled with the repository root as include path, so the
generated gRPC module imports its messages as ``agent.identity.proto.ca_pb2``
(a bare ``import ca_pb2`` would only work with this folder on sys.path).
A unit test regenerates into a temporary folder and compares bytes, so the
committed modules always match the proto and the pinned grpcio-tools.

Usage: python agent/identity/proto/generate.py [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

PROTO_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTO_DIR.parents[2]
PROTO = PROTO_DIR / "ca.proto"
GENERATED = ("ca_pb2.py", "ca_pb2.pyi", "ca_pb2_grpc.py")


def generate(out_root: Path = REPO_ROOT) -> list[Path]:
    """Compile ca.proto; files land under out_root/agent/identity/proto/."""
    from grpc_tools import protoc

    well_known = resources.files("grpc_tools") / "_proto"
    out_root.mkdir(parents=True, exist_ok=True)
    rel = PROTO.relative_to(REPO_ROOT)
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(rel),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise RuntimeError(f"protoc failed with exit code {rc}: {' '.join(args)}")
    out_dir = out_root / rel.parent
    return [out_dir / name for name in GENERATED]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: repo)")
    ns = parser.parse_args(argv)
    for path in generate(ns.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
