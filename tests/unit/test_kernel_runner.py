"""The kernel runner's judgement of a VM that produced no report: a kernel
that crashed before any of the project ran is booted once more (an emulator
fault under TCG), a crash after the guest started is a result and stands."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

RUNNER = Path(__file__).resolve().parents[2] / "vagrant" / "kernels" / "run.py"

OOPS = "[    1.080606] Oops: int3: 0000 [#1] PREEMPT SMP NOPTI"
EARLY = f"[    0.000000] Linux version 6.12\n{OOPS}\n[    1.157992] Kernel panic - not syncing\n"
LATE = (
    "[    0.000000] Linux version 6.12\nguest: 6.12.117+deb13-amd64, 2 cpus\n"
    f"{OOPS}\n[    9.1] Kernel panic - not syncing\n"
)


@pytest.fixture(scope="module")
def runner() -> Any:
    spec = importlib.util.spec_from_file_location("tether_kernel_runner_unit", RUNNER)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_crash_before_the_guest_started_is_a_boot_crash(runner: Any, tmp_path: Path) -> None:
    (tmp_path / "c.log").write_text(EARLY)
    assert runner.boot_crash(tmp_path / "c.log") == OOPS.strip()


def test_crash_after_the_guest_started_is_not(runner: Any, tmp_path: Path) -> None:
    (tmp_path / "c.log").write_text(LATE)
    assert runner.boot_crash(tmp_path / "c.log") is None


def test_boot_is_retried_once_and_the_retry_is_reported(
    runner: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    consoles = [EARLY, EARLY, EARLY]
    calls = []

    def fake_boot(img: Path, proj: Path, rundir: Path, *a: Any) -> dict[str, Any]:
        calls.append(1)
        (rundir / "console.log").write_text(consoles.pop(0))
        return {"vm_error": "no report from the VM (qemu exited 0)"}

    monkeypatch.setattr(runner, "boot", fake_boot)
    r = runner.boot_with_retry(tmp_path, tmp_path, tmp_path, "2G", 2, 10.0)
    assert len(calls) == 2, "retried exactly once"
    assert r["boot_retried"] == OOPS.strip()
    assert not runner.verdict(r), "a second crash still fails the kernel"
    assert (tmp_path / "console.first-boot.log").read_text() == EARLY
    assert any("booted again" in n for n in runner.notes("6.12", r))


def test_crash_inside_the_guest_is_never_retried(
    runner: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_boot(img: Path, proj: Path, rundir: Path, *a: Any) -> dict[str, Any]:
        calls.append(1)
        (rundir / "console.log").write_text(LATE)
        return {"vm_error": "no report from the VM (qemu exited 0)"}

    monkeypatch.setattr(runner, "boot", fake_boot)
    r = runner.boot_with_retry(tmp_path, tmp_path, tmp_path, "2G", 2, 10.0)
    assert len(calls) == 1
    assert "boot_retried" not in r and not runner.verdict(r)


def test_tcg_is_single_threaded(runner: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TETHER_QEMU_ACCEL", raising=False)
    monkeypatch.delenv("TETHER_QEMU_KVM", raising=False)
    assert runner.accel()[:2] == ["-accel", "tcg,thread=single"]
