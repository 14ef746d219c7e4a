#!/usr/bin/env python3
"""Run tether's bpf tier (and a netns smoke) on other kernels, offline, in QEMU.

    vagrant/kernels/run.py [--kernels 5.10,6.1,6.12] [--tiers bpf,netns-smoke]

For each kernel line: build or reuse its image (build-image.sh: Debian's own
kernel, its linux-headers, a bookworm userspace with BCC and the project's
venv), copy the working tree onto a small project disk, boot the kernel under
qemu-system-x86_64 (KVM if /dev/kvm works, else TCG), and collect the guest's
JSON report from the second serial port.  Prints one summary row per kernel
and, for every failure, the kernel, the program or test, and the verifier's
or pytest's message.  Exit status 1 if any kernel failed.

Stdlib only: it runs on the host before any venv exists.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CACHE = Path(os.environ.get("TETHER_CACHE", "/var/cache/tether")) / "kernels"
DEFAULT_KERNELS = ("5.10", "6.1", "6.12")
# netns smoke: one real capture through the agent per family, and cleanup.
# In a guest every BCC compile runs under TCG (35-40 s each, idle): the bpf
# tier there leaves out what does not depend on the kernel and is checked on
# the host by `make presubmit` (the compiler's error text reaching the agent,
# a failing compile child, the packaged-headers fallback), and builds
# debug=True once, as the superset (ipv6 and skmsg on), rather than in all
# four combinations.
GUEST_DESELECT = [
    "tests/bpf/test_compile_matrix.py::test_compile_error_carries_compiler_text",
    "tests/bpf/test_compile_matrix.py::test_errors_in_the_compile_child_reach_the_agent",
    "tests/bpf/test_compile_matrix.py::test_node_without_headers_compiles_against_the_image_headers",
    "tests/bpf/test_compile_matrix.py::test_node_without_any_headers_names_the_fix",
    *(
        "tests/bpf/test_compile_matrix.py::test_build_loads_every_program_and_map"
        f"[ipv6={a}-skmsg={b}-debug=True]"
        for a, b in (("True", "False"), ("False", "True"), ("False", "False"))
    ),
]
TIERS = {
    "bpf": ["tests/bpf", *(f"--deselect={t}" for t in GUEST_DESELECT)],
    "netns-smoke": [
        "tests/netns/test_capture.py::test_enrolled_to_enrolled_is_captured_both_ways",
        "tests/netns/test_capture.py::test_cleanup_leaves_nothing_in_the_kernel",
    ],
    "netns": ["tests/netns"],
}
EXCLUDE_DIRS = {
    ".venv",
    ".git",
    "__pycache__",
    ".mypy_cache",
    ".ruff_cache",
    ".pytest_cache",
    ".hypothesis",
    "build",
    ".cache",
    ".kernel-run",
}


def log(msg: str) -> None:
    print(f"kernels: {msg}", file=sys.stderr, flush=True)


# -- images -------------------------------------------------------------------


def build_image(line: str) -> tuple[Path, float]:
    t0 = time.monotonic()
    r = subprocess.run(
        [str(HERE / "build-image.sh"), line], stdout=subprocess.PIPE, text=True, check=False
    )
    if r.returncode != 0:
        raise RuntimeError(f"build-image.sh {line} failed (exit {r.returncode}); see its log above")
    return Path(r.stdout.strip().splitlines()[-1]), time.monotonic() - t0


def project_files() -> list[str]:
    """The working tree as git sees it (tracked and untracked, not ignored)."""
    try:
        out = subprocess.run(
            [
                "git",
                "-C",
                str(REPO),
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
            ],
            capture_output=True,
            check=True,
        ).stdout.decode()
        return [f for f in out.split("\0") if f and (REPO / f).is_file()]
    except (OSError, subprocess.CalledProcessError):
        files = []
        for dirpath, dirnames, filenames in os.walk(REPO):
            dirnames[:] = [
                d for d in dirnames if d not in EXCLUDE_DIRS and not d.endswith(".egg-info")
            ]
            files += [os.path.relpath(os.path.join(dirpath, f), REPO) for f in filenames]
        return files


def project_disk(path: Path, config: dict[str, Any]) -> None:
    """An ext4 image of the working tree plus the run's config, built without a loop mount."""
    with tempfile.TemporaryDirectory(prefix="tether-proj-") as tmp:
        stage = Path(tmp) / "tether"
        for rel in project_files():
            dst = stage / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, dst)
        (stage / ".kernel-run").mkdir(parents=True, exist_ok=True)
        (stage / ".kernel-run" / "config.json").write_text(json.dumps(config))
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", "-L", "tether-proj", "-d", str(stage), str(path), "256M"],
            check=True,
            stdout=subprocess.DEVNULL,
        )


# -- the VM -------------------------------------------------------------------


def accel() -> list[str]:
    if os.environ.get("TETHER_QEMU_ACCEL"):
        return ["-accel", os.environ["TETHER_QEMU_ACCEL"]]
    try:
        fd = os.open("/dev/kvm", os.O_RDWR)
        os.close(fd)
        # /dev/kvm can exist and still not run guests (nested, PVM); the user can force it.
        if os.environ.get("TETHER_QEMU_KVM") == "1":
            return ["-accel", "kvm", "-cpu", "host"]
    except OSError:
        pass
    # Single-threaded TCG (all vCPUs on one host thread), not MTTCG: with
    # thread=multi, Debian's QEMU 7.2 let a 6.12.117 guest hit a stale int3
    # left by the kernel's own live patching (text_poke_bp) on the second
    # vCPU ("Oops: int3" in sched_clock_idle_wakeup_event, panic at 1 s) in
    # 1 of 60 boots measured here, once in CI.
    return ["-accel", "tcg,thread=single", "-cpu", "max"]


# The guest script's first line on the console (vagrant/kernels/guest.sh):
# before it, nothing of the project has run in the VM.
GUEST_STARTED = "guest: "


def boot_crash(console: Path) -> str | None:
    """The emulated kernel's own first Oops/panic line, if it died before the
    guest script started (so nothing of tether's had run yet)."""
    text = console.read_text(errors="replace") if console.exists() else ""
    if GUEST_STARTED in text:
        return None
    for line in text.splitlines():
        if "Oops:" in line or "Kernel panic" in line or "BUG:" in line:
            return line.strip()
    return None


def boot_with_retry(
    img: Path, proj: Path, rundir: Path, memory: str, cpus: int, timeout: float
) -> dict[str, Any]:
    """Boot; if the kernel crashed before any of the project ran (an emulator
    fault, see accel()), boot once more and say so in the report.  A crash
    after the guest script started is a result, never retried."""
    r = boot(img, proj, rundir, memory, cpus, timeout)
    crash = boot_crash(rundir / "console.log") if "vm_error" in r else None
    if crash is None:
        return r
    log(f"kernel crashed during boot, before the guest started ({crash}); booting again")
    (rundir / "console.log").rename(rundir / "console.first-boot.log")
    r = boot(img, proj, rundir, memory, cpus, timeout)
    r["boot_retried"] = crash
    return r


def boot(
    img: Path, proj: Path, rundir: Path, memory: str, cpus: int, timeout: float
) -> dict[str, Any]:
    console, result = rundir / "console.log", rundir / "result.txt"
    result.write_text("")
    cmd = [
        "qemu-system-x86_64",
        *accel(),
        "-m",
        memory,
        "-smp",
        str(cpus),
        "-kernel",
        str(img / "vmlinuz"),
        "-initrd",
        str(img / "initrd.img"),
        "-append",
        "console=ttyS0 loglevel=4 panic=-1 oops=panic rw",
        "-drive",
        f"file={img / 'rootfs.img'},if=virtio,format=raw,snapshot=on",
        "-drive",
        f"file={proj},if=virtio,format=raw,snapshot=on",
        "-nic",
        "none",
        "-display",
        "none",
        "-monitor",
        "none",
        "-no-reboot",
        "-serial",
        f"file:{console}",
        "-serial",
        f"file:{result}",
    ]
    (rundir / "qemu.cmd").write_text(" ".join(cmd) + "\n")
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        qemu_out, _ = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        proc.kill()
        qemu_out, _ = proc.communicate()
        timed_out = True
    seconds = time.monotonic() - t0
    text = result.read_text(errors="replace")
    report: dict[str, Any]
    if "TETHER-RESULT-BEGIN\n" in text and "\nTETHER-RESULT-END" in text:
        body = text.split("TETHER-RESULT-BEGIN\n", 1)[1].split("\nTETHER-RESULT-END", 1)[0]
        report = json.loads(body)
    else:
        tail = console.read_text(errors="replace")[-3000:] if console.exists() else ""
        why = f"timed out after {timeout:.0f} s" if timed_out else f"qemu exited {proc.returncode}"
        report = {
            "vm_error": f"no report from the VM ({why}). qemu: {qemu_out.strip()[-500:]}\n"
            f"console tail:\n{tail}"
        }
    report["vm_seconds"] = round(seconds, 1)
    return report


# -- reporting ----------------------------------------------------------------


def verdict(r: dict[str, Any]) -> bool:
    if r.get("vm_error") or r.get("guest_error") or r.get("compile_error") or r.get("build_error"):
        return False
    if any(p["status"] == "rejected" for p in r.get("programs", {}).values()):
        return False
    tiers = r.get("tiers", {})
    return bool(tiers) and all(
        t["failed"] == 0 and t["errors"] == 0 and t["passed"] > 0 for t in tiers.values()
    )


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = [
        (
            "kernel",
            "release",
            "programs",
            *(f"{t} p/f/s" for t in _tier_names(results)),
            "build s",
            "boot s",
            "compile s",
            "vm s",
            "result",
        )
    ]
    for line, r in results.items():
        progs = r.get("programs", {})
        loaded = sum(p["status"] == "loaded" for p in progs.values())
        too_old = sum(p["status"] == "too_old" for p in progs.values())
        pcell = (
            f"{loaded}/{len(progs)}" + (f" ({too_old} too old)" if too_old else "")
            if progs
            else "-"
        )
        tcells = []
        for t in _tier_names(results):
            x = r.get("tiers", {}).get(t)
            tcells.append(f"{x['passed']}/{x['failed'] + x['errors']}/{x['skipped']}" if x else "-")
        rows.append(
            (
                line,
                r.get("kernel", "?"),
                pcell,
                *tcells,
                f"{r.get('build_seconds', 0):.0f}",
                f"{r.get('uptime_at_start', 0):.0f}",
                f"{r.get('compile_seconds') or 0:.0f}",
                f"{r.get('vm_seconds', 0):.0f}",
                "PASS" if verdict(r) else "FAIL",
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def _tier_names(results: dict[str, dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for r in results.values():
        names += [t for t in r.get("tiers", {}) if t not in names]
    return names


def problems(line: str, r: dict[str, Any]) -> list[str]:
    out = []
    k = f"kernel {line} ({r.get('kernel', '?')})"
    for key in ("build_error", "vm_error", "guest_error", "compile_error"):
        if r.get(key):
            out.append(f"{k}: {key.replace('_', ' ')}:\n{r[key]}")
    for name, p in r.get("programs", {}).items():
        if p["status"] == "rejected":
            out.append(f"{k}: program {name} ({p['hook']}) rejected:\n{p['message']}")
    for tname, t in r.get("tiers", {}).items():
        for f in t["failures"]:
            msg = f["message"]
            if len(msg) > 1500:  # the whole text is in the run's console.log and results.json
                msg = msg[:1500] + "\n[...]"
            out.append(f"{k}: {tname}: {f['test']} failed:\n{msg}")
    return out


def notes(line: str, r: dict[str, Any]) -> list[str]:
    out = []
    if r.get("boot_retried"):
        out.append(
            f"kernel {line}: first boot crashed before the guest started, "
            f"booted again: {r['boot_retried']}"
        )
    for name, p in r.get("programs", {}).items():
        if p["status"] == "too_old":
            out.append(f"kernel {line}: {name} not loaded: {p['message']}")
    for tname, t in r.get("tiers", {}).items():
        for s in t["skips"]:
            out.append(f"kernel {line}: {tname}: skipped {s['test']}: {s['reason']}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--kernels",
        default=os.environ.get("TETHER_KERNEL_LINES", ",".join(DEFAULT_KERNELS)),
        help="comma-separated kernel lines (5.10, 6.1, 6.12, 6.12-bpo)",
    )
    ap.add_argument(
        "--tiers", default="bpf,netns-smoke", help=f"comma-separated, from {sorted(TIERS)}"
    )
    ap.add_argument("--pytest-args", default="", help="extra pytest arguments inside the VM")
    ap.add_argument("--memory", default="2G")
    ap.add_argument("--cpus", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument(
        "--jobs",
        type=int,
        default=int(os.environ.get("TETHER_KERNEL_JOBS", "0")) or (os.cpu_count() or 1),
        help="VMs run at once (TETHER_KERNEL_JOBS; default one per host core: each TCG guest "
        "uses one, and more guests than cores ran slower in all, not just each)",
    )
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per VM")
    ap.add_argument("--json", type=Path, help="also write all reports here")
    ap.add_argument("--build-only", action="store_true", help="build the images and stop")
    args = ap.parse_args()

    lines = [k for k in args.kernels.split(",") if k]
    tiers = [t for t in args.tiers.split(",") if t]
    for t in tiers:
        if t not in TIERS:
            ap.error(f"unknown tier {t}")
    if os.geteuid() != 0:
        log("must run as root (the image build uses debootstrap and chroot)")
        return 2
    if not args.build_only and not shutil.which("qemu-system-x86_64"):
        log("qemu-system-x86_64 not found: apt-get install qemu-system-x86")
        return 2
    config = {
        "tiers": [{"name": t, "args": TIERS[t]} for t in tiers],
        "pytest_args": args.pytest_args.split(),
    }
    rundir_root = CACHE / "runs" / time.strftime("%Y%m%d-%H%M%S")
    rundir_root.mkdir(parents=True, exist_ok=True)
    for old in sorted((CACHE / "runs").iterdir())[:-10]:  # keep the last ten runs' logs
        shutil.rmtree(old, ignore_errors=True)
    results: dict[str, dict[str, Any]] = {}
    t_all = time.monotonic()
    # One snapshot of the working tree for every kernel (others may be editing
    # it meanwhile); each VM writes to a throwaway overlay (snapshot=on).
    proj = rundir_root / "project.img"
    if not args.build_only:
        project_disk(proj, config)
    # Images one after another (they share one base tree, built by the
    # first), then the VMs side by side, one per host core: single-threaded
    # TCG keeps each guest on one core.  Not more: three guests on two cores
    # took 6.1 1.9x and 5.10 about 2.5x their time alone (a descheduled TCG
    # guest loses more than its share).  Lines start in the order given; the
    # slowest (5.10) is first.
    booting: list[tuple[str, Path]] = []
    for line in lines:
        r: dict[str, Any] = {}
        try:
            img, build_s = build_image(line)
            r["build_seconds"] = round(build_s, 1)
            r["image"] = json.loads((img / "info.json").read_text())
        except Exception as e:
            r["build_error"] = str(e)
            results[line] = r
            continue
        results[line] = r
        if args.build_only:
            log(f"{line}: {img}")
            continue
        booting.append((line, img))

    def run_vm(line: str, img: Path) -> None:
        r = results[line]
        rundir = rundir_root / line
        rundir.mkdir(parents=True, exist_ok=True)
        log(f"{line}: booting {r['image']['abi']} (console: {rundir / 'console.log'})")
        r.update(boot_with_retry(img, proj, rundir, args.memory, args.cpus, args.timeout))
        log(f"{line}: {'PASS' if verdict(r) else 'FAIL'} in {r['vm_seconds']} s")

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for fut in [pool.submit(run_vm, line, img) for line, img in booting]:
            fut.result()
    total = time.monotonic() - t_all
    proj.unlink(missing_ok=True)
    if args.build_only:
        return 1 if any("build_error" in r for r in results.values()) else 0
    (rundir_root / "results.json").write_text(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print()
    print(table(results))
    print(f"\ntotal {total:.0f} s; logs in {rundir_root}")
    for line, r in results.items():
        for n in notes(line, r):
            print(n)
    bad = [p for line, r in results.items() for p in problems(line, r)]
    if bad:
        print("\nFAILURES")
        for p in bad:
            print("-" * 72)
            print(p)
    return 0 if all(verdict(r) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
