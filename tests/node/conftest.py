"""Node tier: a real Kubernetes node (kubelet, containerd, runc) on this machine.

Opt-in: the cluster tests are skipped unless TETHER_NODE=1 (`make test-node`
sets it), like tests/kernels with TETHER_KERNELS. Static checks
(test_static.py) always run.

Binaries: tests/node/build.sh (kubelet, controller-manager, scheduler,
kubectl, containerd, runc, CNI plugins, umoci; cached by version) and
tests/k8s/build.sh (kube-apiserver, etcd). Images: daemonset/image/build.sh
(cached by content). Cold, all of them take tens of minutes on 2 cores;
TETHER_NODE_BUILD=0 skips instead of building.

The node is module-scoped and shared by the tests of test_node.py, which run
in file order (install, workloads, capture, ..., uninstall).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.node.node import BUILD_SH, IMAGE_BUILD_SH, Node

K8S_BUILD_SH = Path(__file__).resolve().parent.parent / "k8s" / "build.sh"


def _unavailable(reason: str) -> None:
    if os.environ.get("TETHER_REQUIRE_ALL_TIERS") == "1" and os.environ.get("TETHER_NODE") == "1":
        pytest.fail(f"node tier: {reason}", pytrace=False)
    pytest.skip(f"node tier: {reason}")


def _run_build(script: Path, what: str) -> Path:
    check = subprocess.run([str(script), "--check"], capture_output=True)
    if check.returncode != 0 and os.environ.get("TETHER_NODE_BUILD") == "0":
        _unavailable(f"{what} not built and TETHER_NODE_BUILD=0; run {script}")
    log = Path(tempfile.gettempdir()) / f"tether-node-{script.parent.name}-build.log"
    with open(log, "w") as f:
        r = subprocess.run(
            [str(script)], stdout=subprocess.PIPE, stderr=f, text=True, timeout=3 * 3600
        )
    if r.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        _unavailable(f"{script} failed (exit {r.returncode}); log {log}:\n{tail}")
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    if os.environ.get("TETHER_NODE") != "1":
        pytest.skip(
            "node tier is opt-in: set TETHER_NODE=1 (make test-node); it builds a "
            "kubelet/containerd/runc node from Go modules and changes host state"
        )
    if os.geteuid() != 0:
        _unavailable("needs root")
    if (
        not Path("/sys/fs/cgroup/unified").is_dir()
        and not Path("/sys/fs/cgroup/cgroup.controllers").exists()
    ):
        _unavailable("no cgroup v2 hierarchy")
    for tool in ("ip", "debootstrap", "gcc"):
        if shutil.which(tool) is None:
            _unavailable(
                f"{tool} missing (apt-get install iproute2 debootstrap gcc libseccomp-dev)"
            )
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        _unavailable("the `kubernetes` Python client is not installed")
    k8s_bin = _run_build(K8S_BUILD_SH, "kube-apiserver/etcd")
    bin_dir = _run_build(BUILD_SH, "kubelet/containerd/runc")
    env_umoci = os.environ.get("UMOCI")
    os.environ["UMOCI"] = str(bin_dir / "umoci")
    try:
        image_dir = _run_build(IMAGE_BUILD_SH, "tether image")
    finally:
        if env_umoci is None:
            os.environ.pop("UMOCI", None)
    n = Node(bin_dir, k8s_bin, image_dir)
    n.start()
    try:
        yield n
    finally:
        diff = n.teardown()  # test_node.py's last test tears down and checks the host
        if diff:
            print(f"[node tier] host not restored by teardown: {diff}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: object) -> object:
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call" and rep.failed:
        item.session._node_failed = True  # type: ignore[attr-defined]
