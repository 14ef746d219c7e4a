"""kernels tier: the bpf tier (and a netns smoke) inside VMs booting other kernels.

Runs vagrant/kernels/run.py once for every kernel line (Debian's own 5.10, 6.1
and 6.12 kernels under QEMU, TCG when KVM is not usable) and asserts each one
passed: every program loaded or was refused as too old with the loader's own
reason, and no test failed.  A failure names the kernel, the program or test,
and the verifier's or pytest's message.  The per-kernel summary table is
printed in the terminal summary, on success too.

Opt-in: it takes tens of minutes (under TCG each guest runs about 12x slower
than the host; the runner boots the guests side by side, one per host core,
once the images are cached) and builds images from Debian's mirror on
first use, so it runs only with TETHER_KERNELS=1 (`make test-kernels`, which
CI runs).  When opted in, a missing prerequisite (not root, no qemu) fails
instead of skipping.

TETHER_KERNEL_LINES picks the lines (default 5.10,6.1,6.12);
TETHER_KERNEL_TIERS the tiers (default bpf,netns-smoke).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNNER = REPO / "vagrant" / "kernels" / "run.py"
LINES = [k for k in os.environ.get("TETHER_KERNEL_LINES", "5.10,6.1,6.12").split(",") if k]
TIERS = os.environ.get("TETHER_KERNEL_TIERS", "bpf,netns-smoke")

pytestmark = pytest.mark.skipif(
    os.environ.get("TETHER_KERNELS") != "1",
    reason="kernels tier is opt-in: TETHER_KERNELS=1 (make test-kernels) boots each kernel in QEMU",
)


class _Summary:
    """A plugin the fixture registers so the table lands in the terminal summary."""

    def __init__(self, text: str) -> None:
        self.text = text

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        terminalreporter.section("kernel matrix")
        terminalreporter.write(self.text)


def _load_runner() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("tether_kernel_runner", RUNNER)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def matrix(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Any]]:
    if os.geteuid() != 0:
        pytest.fail("TETHER_KERNELS=1 but not root: building images needs debootstrap and chroot")
    if not shutil.which("qemu-system-x86_64"):
        pytest.fail(
            "TETHER_KERNELS=1 but qemu-system-x86_64 is missing: apt-get install qemu-system-x86"
        )
    out = tmp_path_factory.mktemp("kernels") / "results.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(RUNNER),
            "--kernels",
            ",".join(LINES),
            "--tiers",
            TIERS,
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    request.config.pluginmanager.register(_Summary(proc.stdout), "tether-kernel-summary")
    if not out.exists():
        pytest.fail(
            f"the runner wrote no results (exit {proc.returncode}):\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    results: dict[str, dict[str, Any]] = json.loads(out.read_text())
    return results


@pytest.mark.parametrize("line", LINES)
def test_kernel_passes_bpf_tier(matrix: dict[str, dict[str, Any]], line: str) -> None:
    runner = _load_runner()
    r = matrix.get(line)
    assert r is not None, f"no result for kernel {line}"
    assert runner.verdict(r), "\n\n".join(runner.problems(line, r)) or f"kernel {line} failed"
    # every program the kernel did not load was refused with the loader's reason
    for name, p in r["programs"].items():
        assert p["status"] in ("loaded", "too_old"), (name, p)
        if p["status"] == "too_old":
            assert "needs Linux" in p["message"], (name, p["message"])
