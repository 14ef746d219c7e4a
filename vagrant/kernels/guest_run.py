"""Inside a kernel test VM: load every program, run the test tiers, report.

Started by guest.sh (from /sbin/tether-init) with the project disk mounted at
/tether.  The runner on the host wrote .kernel-run/config.json next to the
project; this writes one JSON report to the second serial port (/dev/ttyS1,
a plain file on the host) and lets the pytest output scroll on the console.

The report, per kernel:
  kernel     uname -r and the Debian package version
  programs   every ProgSpec of the default build: loaded, too_old (the
             loader's KernelTooOld, with its message) or rejected (with the
             verifier log the loader attaches)
  tiers      per pytest run: passed/failed/skipped/errors, seconds, and each
             failure's test id and message, each skip's reason
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

REPO = Path("/tether")
CONFIG = REPO / ".kernel-run" / "config.json"
RESULT_PORT = "/dev/ttyS1"
MAX_TEXT = 6000


def say(msg: str) -> None:
    print(f"guest: {msg}", flush=True)


def probe_programs() -> dict[str, Any]:
    """Compile the default build once and load each program on its own, so one
    rejected program does not hide the others."""
    sys.path.insert(0, str(REPO))
    out: dict[str, Any] = {"programs": {}, "compile_seconds": None, "compile_error": None}
    try:
        import bcc

        from agent.datapath import loader
        from agent.datapath.errors import DatapathError, KernelTooOld
    except Exception as e:
        out["compile_error"] = f"import failed: {e!r}"
        return out
    out["bcc_version"] = getattr(bcc, "__version__", "?")
    opts = loader.BuildOptions(pin_dir="/sys/fs/bpf/tether-probe")
    Path(opts.pin_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        loader.check_headers()
        with loader._capture_fd2() as log:
            try:
                mod = bcc.BPF(text=loader.compose_source(opts).encode(), cflags=opts.cflags())
            except Exception as e:
                mod = None
                err: Exception | None = e
        if mod is None:
            out["compile_error"] = f"{err}\n{log.getvalue()[-MAX_TEXT:]}"
            return out
    except DatapathError as e:
        out["compile_error"] = str(e)
        return out
    out["compile_seconds"] = round(time.monotonic() - t0, 2)

    class Probe:  # what BccPrograms._load needs: the BCC module and the kernel version
        _bpf = mod
        kernel = loader.kernel_version()

    def load_one(spec: Any) -> None:
        """The loader's own per-program load: its KernelTooOld / verifier-log wording."""
        loader.BccPrograms._load(Probe(), spec)  # type: ignore[arg-type]

    for spec in opts.programs():
        r: dict[str, Any] = {"hook": spec.hook, "needs": ".".join(map(str, spec.kernel))}
        try:
            load_one(spec)
            r["status"] = "loaded"
        except KernelTooOld as e:
            r["status"], r["message"] = "too_old", str(e)
        except DatapathError as e:
            r["status"], r["message"] = "rejected", str(e)[-MAX_TEXT:]
        out["programs"][spec.name] = r
    mod.cleanup()
    return out


def parse_junit(path: Path) -> dict[str, Any]:
    res: dict[str, Any] = {
        "passed": 0,
        "failed": 0,
        "skipped": 0,
        "errors": 0,
        "failures": [],
        "skips": [],
    }
    if not path.exists():
        res["errors"] = 1
        res["failures"].append({"test": "(pytest)", "message": "no junit xml written"})
        return res
    for case in ET.parse(path).getroot().iter("testcase"):
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        kids = {k.tag: k for k in case}
        if "failure" in kids or "error" in kids:
            k = kids.get("failure", kids.get("error"))
            assert k is not None
            res["failed" if k.tag == "failure" else "errors"] += 1
            text = (k.get("message", "") + "\n" + (k.text or "")).strip()
            res["failures"].append({"test": test, "message": text[-MAX_TEXT:]})
        elif "skipped" in kids:
            res["skipped"] += 1
            res["skips"].append({"test": test, "reason": kids["skipped"].get("message", "")})
        else:
            res["passed"] += 1
    return res


def run_tier(name: str, args: list[str], extra: list[str]) -> dict[str, Any]:
    junit = Path(f"/tmp/junit-{name}.xml")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-rfEs",
        "--color=no",
        "-p",
        "no:cacheprovider",
        f"--junitxml={junit}",
        "--durations=15",
        *extra,
        *args,
    ]
    say(f"tier {name}: {' '.join(cmd)}")
    t0 = time.monotonic()
    rc = subprocess.call(cmd, cwd=REPO)
    res = parse_junit(junit)
    res["seconds"] = round(time.monotonic() - t0, 1)
    res["exit_code"] = rc
    say(
        f"tier {name}: rc={rc} passed={res['passed']} failed={res['failed']} "
        f"errors={res['errors']} skipped={res['skipped']} in {res['seconds']} s"
    )
    return res


def main() -> None:
    t_start = time.monotonic()
    cfg = json.loads(CONFIG.read_text()) if CONFIG.exists() else {}
    report: dict[str, Any] = {
        "kernel": platform.release(),
        "kernel_version": Path("/proc/version").read_text().strip(),
        "python": platform.python_version(),
        "uptime_at_start": float(Path("/proc/uptime").read_text().split()[0]),
    }
    try:
        say(f"kernel {report['kernel']}; loading every program")
        try:
            report.update(probe_programs())
        except Exception:  # the tiers still run; the report says what broke
            report["compile_error"] = (
                "program probe crashed:\n" + traceback.format_exc()[-MAX_TEXT:]
            )
            report.setdefault("programs", {})
        for name, r in report["programs"].items():
            say(
                f"  {name:18} {r['status']}" + (f": {r['message'][:200]}" if "message" in r else "")
            )
        if report.get("compile_error"):
            say(f"compile failed: {report['compile_error'][:2000]}")
        report["tiers"] = {}
        for tier in cfg.get("tiers", [{"name": "bpf", "args": ["tests/bpf"]}]):
            report["tiers"][tier["name"]] = run_tier(
                tier["name"], tier["args"], cfg.get("pytest_args", [])
            )
    except Exception:
        report["guest_error"] = traceback.format_exc()[-MAX_TEXT:]
        say(report["guest_error"])
    report["guest_seconds"] = round(time.monotonic() - t_start, 1)
    data = json.dumps(report)
    with open(RESULT_PORT, "w") as port:
        port.write("TETHER-RESULT-BEGIN\n" + data + "\nTETHER-RESULT-END\n")
        port.flush()
    say("report written")


if __name__ == "__main__":
    main()
