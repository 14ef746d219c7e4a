"""`tether bench h2` compares hyperframe's DataFrame repr as shipped with the
agent's O(1) one.  Before, the agent's patch was applied at import, so the
"as is" measurement saved the already-patched function and compared the fix
with itself."""

from __future__ import annotations

import os
from typing import Any

import hyperframe.frame
import pytest

from agent import bench
from agent.tunnel import h2conn


def _body(frame: hyperframe.frame.DataFrame) -> str:
    return frame._body_repr()  # type: ignore[no-any-return]


def test_the_unpatched_path_is_hyperframes_own() -> None:
    f = hyperframe.frame.DataFrame(1, data=b"\xab\xcd" * 4)
    assert _body(f) == "<8 bytes>"  # the agent's patch is in force
    with bench.data_body_repr(h2conn.HYPERFRAME_DATA_BODY_REPR):
        assert "abcd" in _body(f)  # hyperframe hex-encodes the payload
    with bench.data_body_repr(h2conn.data_body_repr):
        assert _body(f) == "<8 bytes>"
    assert _body(f) == "<8 bytes>"  # restored


def _hexlify_calls(frame: int, nbytes: int) -> int:
    """How many times the transfer hex-encoded a frame body (hyperframe's
    DATA repr does, once per DATA frame logged; the agent's does not).  A call count,
    not a time share: the bench reports the time, the test must not flake on
    a loaded machine."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(bench._h2_transfer, frame, nbytes)
    raw = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    return sum(nc for (_f, _l, name), (_cc, nc, *_rest) in raw.items() if "hexlify" in name)


def test_the_two_measurements_differ_in_repr_cost() -> None:
    with bench.data_body_repr(h2conn.HYPERFRAME_DATA_BODY_REPR):
        slow = _hexlify_calls(16384, 4 << 20)
    with bench.data_body_repr(h2conn.data_body_repr):
        fast = _hexlify_calls(16384, 4 << 20)
    assert slow >= (4 << 20) // 16384, slow  # at least once per DATA frame
    # the agent's repr never hex-encodes DATA; what is left is a couple of
    # control frames whose repr is still hyperframe's
    assert fast * 10 < slow, (fast, slow)


def test_the_message_benchmark_compares_the_two_paths_not_one_with_itself(
    monkeypatch: Any,
) -> None:
    """`tether bench h2`'s 1 KiB row: "h2 as shipped" must run h2's DATA code
    and "fast path" must not (the switch is restored after either)."""
    import h2.stream

    sends = []
    orig = h2.stream.H2Stream.send_data

    def counting(self: Any, *a: Any, **k: Any) -> Any:
        sends.append(1)
        return orig(self, *a, **k)

    monkeypatch.setattr(h2.stream.H2Stream, "send_data", counting)
    before = h2conn.FAST_DATA
    assert bench._h2_messages(False, 50)["us_per_message"] > 0
    assert len(sends) == 50
    assert h2conn.FAST_DATA is before
    sends.clear()
    assert bench._h2_messages(True, 50)["us_per_message"] > 0
    assert not sends
    assert h2conn.FAST_DATA is before


def test_busy_loops_spin_for_the_run_and_are_gone_after() -> None:
    import time

    with bench.busy_loops(1):
        kids = [
            int(p)
            for p in os.listdir("/proc")
            if p.isdigit() and _parent(int(p)) == os.getpid() and _cmdline(int(p)).endswith("pass")
        ]
        assert len(kids) == 1
        t0 = _cpu(kids[0])
        time.sleep(0.3)
        assert _cpu(kids[0]) > t0  # it spins
    assert not os.path.exists(f"/proc/{kids[0]}/stat") or _state(kids[0]) == "Z"


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _parent(pid: int) -> int:
    try:
        return int(_stat(pid)[1])
    except OSError:
        return -1


def _state(pid: int) -> str:
    return _stat(pid)[0]


def _cpu(pid: int) -> int:
    s = _stat(pid)
    return int(s[11]) + int(s[12])


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def test_a_variant_naming_another_tree_runs_that_tree(tmp_path: Any) -> None:
    """`bench tunnel --variant NAME:PYTHONPATH=<tree>`: run from a checkout,
    `python -m agent.cli` imported the checkout (the working directory comes
    first on sys.path), so the A/B compared one version with itself.  The
    variant's environment now carries PYTHONSAFEPATH, and the bench checks
    the code each agent reports at start."""
    import subprocess
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    other = tmp_path / "other"
    (other / "agent").mkdir(parents=True)
    (other / "agent" / "__init__.py").write_text("")
    repo = Path(bench.__file__).resolve().parent.parent
    asked = {"PYTHONPATH": str(other)}
    for env, want in ((asked, None), (bench._variant_env(asked), other)):
        out = subprocess.run(
            [sys.executable, "-c", "import agent, os; print(os.path.dirname(agent.__file__))"],
            env={**os.environ, **env},
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        if want is None:
            assert Path(out) == repo / "agent"  # the trap: the checkout wins
        else:
            assert Path(out) == want / "agent"

    def node(name: str, code: Path) -> Any:
        log = f"x INFO agent.app: agent code at {code}; h2 DATA fast path on\n"
        return SimpleNamespace(node=SimpleNamespace(name=name), log_tail=lambda n=0: log)

    env = bench._variant_env(asked)
    good = node("node1", other / "agent")
    assert bench._check_variant_code("v", env, good) == str((other / "agent").resolve())
    with pytest.raises(RuntimeError, match=r"runs .* not"):
        bench._check_variant_code("v", env, good, node("node2", repo / "agent"))
