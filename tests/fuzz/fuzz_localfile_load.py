"""Fuzz target: agent.sources.localfile.load(path) on any file content.

The bytes of the input are the local file.  load() must return a well-formed
LocalConfig or raise ConfigError, whatever the bytes: not UTF-8, YAML that
does not parse, YAML that parses to values the pure-Python loader (which
load() uses) builds oddly.  Slow: PyYAML's pure-Python parser takes a few
milliseconds per kilobyte.

    python -m tests.fuzz.fuzz_localfile_load -runs=100000 tests/fuzz/corpus/localfile_load
"""

from __future__ import annotations

import sys

import atheris
import yaml

with atheris.instrument_imports():
    # The one place the module under test is named (see fuzz_localfile).
    from agent.sources.localfile import ConfigError, load

from tests.fuzz._common import FAST_LOADER
from tests.fuzz.fuzz_localfile import SCRATCH, _files_confined, check_config

CONFIG = SCRATCH / "config.yaml"


def TestOneInput(data: bytes) -> None:
    if b"olicyFiles" in data or b"\\" in data:
        try:
            pre = yaml.load(data.decode(), Loader=FAST_LOADER)
        except Exception:
            pre = None
        if not _files_confined(pre):
            return
    CONFIG.write_bytes(data)
    try:
        cfg = load(CONFIG)
    except ConfigError:
        return
    check_config(cfg)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
