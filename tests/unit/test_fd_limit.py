"""The agent raises its soft open-files limit to the hard one at start:
every relayed connection holds two or three descriptors, and a soft limit of
1024 would cap a node at a few hundred connections."""

from __future__ import annotations

import resource
import subprocess
import sys


def test_soft_limit_is_raised_to_the_hard_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(256, hard)

    def lower() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))

    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import resource; from agent.app import raise_fd_limit; "
            "before = resource.getrlimit(resource.RLIMIT_NOFILE)[0]; "
            "print(before, *raise_fd_limit())",
        ],
        preexec_fn=lower,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert [int(x) for x in out] == [low, hard, hard]
