"""Shared by the fuzz targets: random structured values from the fuzz data, and
the finding signature the runner and the smoke test deduplicate by.

A target's TestOneInput raises `Finding` (or lets an unexpected exception
escape) when the parser does something other than return a well-formed value
or raise its documented error.  The signature of a finding is the exception
type and the innermost function of the code under test (`agent/`) it came
from; line numbers are left out so that it survives edits and file moves.
"""

from __future__ import annotations

import os
import traceback
from collections.abc import Sequence
from typing import Any

import atheris
import yaml

# Where YAML is only the source of documents (not under test), libyaml parses
# it: the pure-Python parser costs ~3.5 ms for a 1 KB file, 6x libyaml, and
# the constructor (Python in both) is the same.
FAST_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

# Inputs that start with this byte are decoded with atheris.FuzzedDataProvider
# into a structured value; the others are the parser's text as it comes (YAML,
# a header list, an authority), which is also the format of the seed corpora.
STRUCTURED = b"\xff"


class Finding(AssertionError):
    """The parser returned something malformed (an assertion of the target failed)."""


def check(cond: object, message: str) -> None:
    if not cond:
        raise Finding(message)


def signature(exc: BaseException, *, fine: bool = False) -> str:
    """`ExcType@function` of the innermost frame under agent/ (else of the
    target); with `fine`, `ExcType@file:line:function`, which tells apart two
    bugs in one function but changes when the code is edited."""
    # Without reading source lines: a RecursionError has a thousand frames.
    walk = traceback.walk_tb(exc.__traceback__)
    frames = traceback.StackSummary.extract(walk, lookup_lines=False)
    ours = [f for f in frames if "/agent/" in f.filename.replace(os.sep, "/")]
    if not ours:  # an assertion of the target (check() itself does not count)
        ours = [
            f
            for f in frames
            if "/tests/fuzz/" in f.filename.replace(os.sep, "/")
            and not f.filename.endswith("_common.py")
        ]
    where = ours[-1] if ours else None
    if where is None:
        return f"{type(exc).__name__}@?"
    if fine:
        file = os.path.basename(where.filename)
        return f"{type(exc).__name__}@{file}:{where.lineno}:{where.name}"
    return f"{type(exc).__name__}@{where.name}"


# Strings the fuzzer is unlikely to build byte by byte but parsers care about.
INTERESTING_STRINGS = (
    "",
    " ",
    "0",
    "-1",
    "65535",
    "65536",
    "99999999999999999999",
    "٣",  # a Unicode decimal digit: str.isdigit() and int() accept it
    "²",  # isdigit() but not a decimal: int() refuses it
    "1e3",
    "true",
    "null",
    "10.0.0.1",
    "10.0.0.0/8",
    "::1",
    "fd00::1",
    "fe80::1%eth0",
    "::ffff:10.0.0.1",
    "0.0.0.0/0",
    "*",
    "a*",
    "*a",
    "cluster.local/ns/default/sa/web",
    "spiffe://cluster.local/ns/default/sa/web",
    "ns/default/sa/web",
    "default",
    "istio-system",
    "x\x00y",
    "é",
    "\udcff",
    "\u202e",
    "a" * 300,
)


def text(fdp: atheris.FuzzedDataProvider, vocab: Sequence[str] = ()) -> str:
    """A string: from the vocabulary, from INTERESTING_STRINGS, or random Unicode."""
    kind = fdp.ConsumeIntInRange(0, 3)
    if kind == 0 and vocab:
        return vocab[fdp.ConsumeIntInRange(0, len(vocab) - 1)]
    if kind == 1:
        return INTERESTING_STRINGS[fdp.ConsumeIntInRange(0, len(INTERESTING_STRINGS) - 1)]
    return str(fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 24)))


def value(
    fdp: atheris.FuzzedDataProvider,
    keys: Sequence[str],
    strings: Sequence[str],
    depth: int = 0,
) -> Any:
    """A random JSON/YAML-like value (None, bool, int, float, str, list, dict),
    whose mapping keys mostly come from `keys` and strings from `strings`.
    A tree: no shared references, whatever the depth."""
    kind = fdp.ConsumeIntInRange(0, 9 if depth < 5 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return fdp.ConsumeBool()
    if kind == 2:
        return fdp.ConsumeIntInRange(-(2**70), 2**70) if fdp.ConsumeBool() else fdp.ConsumeInt(2)
    if kind == 3:
        return fdp.ConsumeRegularFloat() if fdp.ConsumeBool() else fdp.ConsumeFloat()
    if kind in (4, 5):
        return text(fdp, strings)
    if kind in (6, 7):
        return [value(fdp, keys, strings, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 4))]
    out: dict[Any, Any] = {}
    for _ in range(fdp.ConsumeIntInRange(0, 5)):
        k: Any = text(fdp, keys) if fdp.ConsumeProbability() < 0.9 else fdp.ConsumeInt(1)
        out[k] = value(fdp, keys, strings, depth + 1)
    return out


def pick(fdp: atheris.FuzzedDataProvider, options: Sequence[Any]) -> Any:
    return options[fdp.ConsumeIntInRange(0, len(options) - 1)]
