"""Run the fuzz targets with atheris (libFuzzer), one after another.

    python -m tests.fuzz.run [--runs N] [target ...]     # all targets by default

Each target runs in its own process for N inputs (libFuzzer -runs=N) over its
seed corpus (tests/fuzz/corpus/<target>/, read only) and a working corpus
under build/fuzz/<target>/.  A finding does not stop the run: the first input
of each distinct finding (exception type and the function it came from) is
saved to build/fuzz/<target>/findings/ with its traceback, and the run goes
on.  A libFuzzer crash (timeout, out of memory, signal) ends that target and
counts as a finding; its input is saved by libFuzzer in the same directory.

Prints, per target, the inputs executed, the time, and the findings; exits 1
if any target had a finding.
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

TARGETS = ("hbone_request", "authority", "policy", "localfile", "localfile_load")
ROOT = Path(__file__).resolve().parents[2]
CORPUS = ROOT / "tests" / "fuzz" / "corpus"
WORK = ROOT / "build" / "fuzz"


def _one(target: str, findings: Path, libfuzzer_args: list[str]) -> None:
    """In the child: fuzz one target, recording findings instead of stopping."""
    import atheris

    from tests.fuzz._common import signature

    mod = importlib.import_module(f"tests.fuzz.fuzz_{target}")
    seen: set[str] = set()
    findings.mkdir(parents=True, exist_ok=True)

    def wrapped(data: bytes) -> None:
        try:
            mod.TestOneInput(data)
        except Exception as e:
            sig = signature(e, fine=True)
            if sig in seen:
                return
            seen.add(sig)
            (findings / f"{sig}.input").write_bytes(data)
            tb = "".join(traceback.format_exception(e))
            (findings / f"{sig}.txt").write_text(tb)
            print(f"FINDING {sig}\n{tb}", file=sys.stderr, flush=True)

    atheris.Setup([sys.argv[0], *libfuzzer_args], wrapped)
    atheris.Fuzz()


def _run(target: str, runs: int, extra: list[str]) -> tuple[int, float, list[str], bool]:
    """Fuzz one target in a child process: (inputs, seconds, findings, stopped early)."""
    work = WORK / target
    corpus, findings = work / "corpus", work / "findings"
    corpus.mkdir(parents=True, exist_ok=True)
    findings.mkdir(parents=True, exist_ok=True)
    for old in findings.iterdir():
        old.unlink()
    args = [
        f"-runs={runs}",
        "-max_len=2048",
        "-timeout=20",
        "-rss_limit_mb=3072",
        "-print_final_stats=1",
        f"-artifact_prefix={findings}/",
        *extra,
        str(corpus),
        str(CORPUS / target),
    ]
    cmd = [sys.executable, "-m", "tests.fuzz.run", "--one", target, "--", *args]
    start = time.monotonic()
    with (work / "log").open("w") as log:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=False)
    elapsed = time.monotonic() - start
    out = (work / "log").read_text(errors="replace")
    done = re.search(r"Done (\d+) runs in", out)
    execs = re.findall(r"stat::number_of_executed_units:\s*(\d+)", out)
    progress = re.findall(r"^#(\d+)\s", out, re.MULTILINE)  # last status line, if cut short
    n = (
        int(done.group(1))
        if done
        else int(execs[-1])
        if execs
        else int(progress[-1])
        if progress
        else 0
    )
    crashed = proc.returncode != 0 or not done
    sigs = sorted(p.stem for p in findings.glob("*.input"))
    sigs += sorted(p.name for p in findings.iterdir() if p.suffix not in (".input", ".txt"))
    return n, elapsed, sigs, crashed


def main() -> int:
    if sys.argv[1:2] == ["--one"]:  # the child: --one TARGET -- LIBFUZZER_ARGS...
        target = sys.argv[2]
        _one(target, WORK / target / "findings", sys.argv[4:])
        return 0
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1_000_000)
    ap.add_argument(
        "--max-time", type=int, default=0, help="also stop each target after this many seconds"
    )
    ap.add_argument("targets", nargs="*", help=f"some of {', '.join(TARGETS)} (default: all)")
    ns = ap.parse_args()
    if unknown := set(ns.targets) - set(TARGETS):
        ap.error(f"unknown target(s) {sorted(unknown)}; known: {', '.join(TARGETS)}")
    targets = ns.targets or list(TARGETS)
    total = 0
    rows = []
    for t in targets:
        print(f"fuzz {t}: {ns.runs} inputs ...", flush=True)
        extra = [f"-max_total_time={ns.max_time}"] if ns.max_time else []
        n, secs, sigs, crashed = _run(t, ns.runs, extra)
        total += len(sigs)
        rows.append((t, n, secs, sigs))
        state = "libFuzzer stopped early (see log)" if crashed else "done"
        print(f"fuzz {t}: {n} inputs in {secs:.0f} s, {len(sigs)} finding(s), {state}")
        for s in sigs:
            print(f"    {s}  (build/fuzz/{t}/findings/)")
    print("\nsummary:")
    for t, n, secs, sigs in rows:
        print(f"  {t:15} {n:>9} inputs {secs:7.0f} s  {len(sigs)} finding(s)")
    print(f"  total findings: {total}")
    return 1 if total else 0


if __name__ == "__main__":
    sys.exit(main())
