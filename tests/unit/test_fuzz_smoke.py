"""A short, deterministic run of every fuzz target (tests/fuzz/) in process:
the seed corpus, then random and mutated inputs.  `make fuzz` runs the same
targets under atheris for a million inputs each.

A target raises when a parser does anything but return a well-formed value or
raise its documented error.  Known findings (bugs not fixed yet) each have a
minimal reproducer in tests/fuzz/findings/<target>/<signature>.input; this
test checks they still reproduce (xfail; an XPASS means the bug is fixed: move
the file into tests/fuzz/corpus/<target>/) and fails on any other finding.
"""

from __future__ import annotations

import importlib
import random
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("atheris")

# Import the code under test before the targets, so that their
# atheris.instrument_imports() leaves the modules other tests use as they are.
import agent.policy
import agent.sources.localfile
import agent.tunnel.hbone  # noqa: F401
from tests.fuzz._common import STRUCTURED, signature
from tests.fuzz.run import TARGETS

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
RANDOM_INPUTS = 2000
# load() parses with PyYAML's pure-Python loader, ~3 ms a kilobyte.
RANDOM_INPUTS_OF = {"localfile_load": 500}
# localfile_load ends in the same parse() as localfile: the same findings.
SAME_PARSER = {"localfile_load": ("localfile",)}
SEED = 20261130


def _module(target: str) -> ModuleType:
    return importlib.import_module(f"tests.fuzz.fuzz_{target}")


def _known(target: str) -> list[tuple[str, Path]]:
    """(coarse signature, reproducer) of the known findings: files named
    `ExcType@function--what.input`."""
    d = FUZZ / "findings" / target
    return [(p.stem.split("--")[0], p) for p in sorted(d.glob("*.input"))]


def _inputs(target: str) -> list[bytes]:
    seeds = [p.read_bytes() for p in sorted((FUZZ / "corpus" / target).iterdir())]
    rng = random.Random(f"{SEED}-{target}")
    out = list(seeds)
    for i in range(RANDOM_INPUTS_OF.get(target, RANDOM_INPUTS)):
        if i % 2 == 0:  # structured: the FuzzedDataProvider decodes random bytes
            out.append(STRUCTURED + rng.randbytes(rng.randrange(1, 200)))
        else:  # a seed with a few bytes changed, inserted or cut
            b = bytearray(rng.choice(seeds))
            for _ in range(rng.randrange(1, 5)):
                op, at = rng.randrange(3), rng.randrange(len(b) + 1)
                if op == 0 and at < len(b):
                    b[at] = rng.randrange(256)
                elif op == 1:
                    b[at:at] = rng.randbytes(rng.randrange(1, 8))
                else:
                    del b[at : at + rng.randrange(1, 8)]
            out.append(bytes(b))
    return out


@pytest.mark.parametrize("target", TARGETS)
def test_smoke(target: str) -> None:
    fuzz_one = _module(target).TestOneInput
    known = {sig for t in (target, *SAME_PARSER.get(target, ())) for sig, _ in _known(t)}
    new: dict[str, str] = {}
    for data in _inputs(target):
        try:
            fuzz_one(data)
        except Exception as e:
            sig = signature(e)
            if sig not in known:
                new.setdefault(sig, f"{e!r} on input {data[:200]!r}")
    assert not new, f"new fuzz findings in {target}: {new}"


KNOWN = [(t, sig, p) for t in TARGETS for sig, p in _known(t)]


@pytest.mark.parametrize(
    ("target", "sig", "path"), KNOWN, ids=[f"{t}-{p.stem}" for t, _, p in KNOWN]
)
def test_known_finding_reproduces(target: str, sig: str, path: Path) -> None:
    try:
        _module(target).TestOneInput(path.read_bytes())
    except Exception as e:
        assert signature(e) == sig, f"{path.name} now fails differently: {e!r}"
        pytest.xfail(f"known finding {sig}: {e!r}")
    pytest.fail(f"{path} no longer fails: fixed? Move it into tests/fuzz/corpus/{target}/")
