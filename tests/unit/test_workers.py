"""The worker processes (agent/workerproc.py), through the podnet worker:
the netlink step of an enrollment and the certificate work run in child
processes the agent's event loop awaits, so neither pyroute2 nor
cryptography loads in the agent, and one pod's failure (or a hung or dead
worker) is that request's error.  Runs unprivileged: the requests here fail
on purpose or never reach netlink; tests/netns/test_podnet.py installs real
routing, tests/unit/test_identity_worker.py issues certificates."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent import workerproc
from agent.datapath import podnet

REPO = Path(__file__).resolve().parents[2]
MISSING = "/run/netns/tether-no-such-netns-for-this-test"


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def _loaded(modules: str, of: set[str]) -> list[str]:
    """Which packages of `of` a fresh interpreter holds after importing `modules`."""
    code = (
        f"import sys, {modules}; print(sorted({{m.split('.')[0] for m in sys.modules}} & {of!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-P", "-c", code],
        cwd=REPO,
        env={"PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        check=True,
    )
    return list(json.loads(out.stdout.replace("'", '"')))


def test_the_agent_never_imports_pyroute2_or_cryptography() -> None:
    """Both run in worker processes (podnet, identity/issuer): ~11 and ~8.6
    MiB resident that the agent does not keep.  grpc and kubernetes load
    only with a remote CA and --kube."""
    modules = (
        "agent.app, agent.pods, agent.cli, agent.datapath.datapath, agent.identity.setup,"
        " agent.identity.embedded, agent.waypoints, waypoint.sds"
    )
    assert _loaded(modules, {"pyroute2", "cryptography", "grpc", "kubernetes"}) == []


def test_the_remote_ca_client_does_not_import_cryptography_either() -> None:
    assert (
        _loaded("agent.identity.setup, agent.identity.client", {"cryptography", "pyroute2"}) == []
    )


def test_a_failed_request_is_that_requests_error_and_the_worker_serves_on() -> None:
    async def main() -> None:
        w = podnet.Worker(idle=30)
        try:
            with pytest.raises(podnet.RoutingError, match=f"prepare in {MISSING}: .*No such file"):
                await w.call("prepare", MISSING)
            assert w.running and w.started == 1
            with pytest.raises(podnet.RoutingError, match="installed in"):
                await w.call("installed", MISSING)
            assert w.started == 1  # the same process answered both
        finally:
            await w.aclose()
        assert not w.running

    run(main())


def test_a_bad_request_line_gets_an_answer_not_the_workers_end() -> None:
    out = subprocess.run(
        workerproc.command(podnet.MODULE, "serve"),
        env=workerproc.env(),
        input='not json\n{"op": "frobnicate", "netns": "/x"}\n{"netns": "/x"}\n',
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    replies = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["ok"] for r in replies] == [False, False, False]
    assert "bad request" in replies[0]["error"]
    assert "unknown op 'frobnicate'" in replies[1]["error"]
    assert "unknown op None" in replies[2]["error"]


def _killed_then_started_again(w: podnet.Worker, first: str, second: str | None) -> None:
    """A worker whose call fails as `first` says is not kept; the next call
    starts another, which fails as `second` says."""

    async def main() -> None:
        try:
            with pytest.raises(podnet.RoutingError, match=first):
                await w.call("prepare", "/x")
            assert not w.running
            with pytest.raises(podnet.RoutingError, match=second):
                await w.call("prepare", "/x")
            assert w.started == 2
        finally:
            await w.aclose()

    run(main())


def test_a_hung_worker_times_out_and_the_next_call_starts_a_fresh_one() -> None:
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    _killed_then_started_again(
        podnet.Worker(timeout=0.5, command=hang), r"no answer in 0\.5 s", "no answer"
    )


def test_a_worker_that_dies_is_an_error_naming_the_netns() -> None:
    async def main() -> None:
        w = podnet.Worker(command=[sys.executable, "-c", "pass"])
        try:
            with pytest.raises(
                podnet.RoutingError, match=r"unprepare in /x: worker (exited|failed)"
            ):
                await w.call("unprepare", "/x")
        finally:
            await w.aclose()

    run(main())


def test_the_worker_exits_once_idle_and_is_started_again_on_demand() -> None:
    async def main() -> None:
        w = podnet.Worker(idle=0.2)
        try:
            with pytest.raises(podnet.RoutingError):
                await w.call("installed", MISSING)
            proc = w._proc
            assert proc is not None
            await asyncio.wait_for(proc.wait(), 10)  # it exited by itself
            assert proc.returncode == 0 and not w.running
            with pytest.raises(podnet.RoutingError):
                await w.call("installed", MISSING)
            assert w.started == 2
        finally:
            await w.aclose()

    run(main())


def test_run_once_and_unknown_ops() -> None:
    with pytest.raises(podnet.RoutingError, match=f"unprepare in {MISSING}"):
        podnet.run_once("unprepare", MISSING)
    with pytest.raises(ValueError, match="unknown podnet op"):
        podnet.run_once("frobnicate", MISSING)
    with pytest.raises(ValueError, match="unknown podnet op"):
        run(podnet.Worker().call("frobnicate", MISSING))


def test_a_worker_out_of_step_is_killed_not_reused() -> None:
    junk = [sys.executable, "-c", "import sys\nfor _ in sys.stdin: print('hello', flush=True)"]
    _killed_then_started_again(podnet.Worker(command=junk), "prepare in /x: worker failed", None)


def test_what_a_library_prints_never_reaches_the_answers() -> None:
    code = (
        "import sys, agent.datapath.podnet as p, agent.workerproc as w\n"
        "def noisy(req):\n"
        "    print('a library talking')\n"
        "    return p._handle(req)\n"
        "sys.exit(w.serve(noisy))\n"
    )
    out = subprocess.run(
        [sys.executable, "-P", "-c", code],
        env=workerproc.env(),
        input=json.dumps({"op": "installed", "netns": MISSING}) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert [json.loads(line)["ok"] for line in out.stdout.splitlines()] == [False]
    assert "a library talking" in out.stderr
