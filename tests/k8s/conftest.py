"""k8s tier: a real kube-apiserver + etcd per test session, on loopback.

Binaries: tests/k8s/build.sh builds pinned kube-apiserver and etcd from Go
modules into ${TETHER_CACHE:-/var/cache/tether}/k8s/<version>/bin (cached; a
cold build takes many minutes on 2 cores, a warm one is a no-op).

When they are not built yet the fixture builds them, unless
TETHER_K8S_BUILD=0. If that is impossible (no Go toolchain, no module proxy,
build error) the tier is skipped with the reason, except in CI
(TETHER_REQUIRE_ALL_TIERS=1), where it fails instead.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.k8s.cluster import BUILD_SH, Cluster, bin_dir, binaries_built, build


def _require_all() -> bool:
    return os.environ.get("TETHER_REQUIRE_ALL_TIERS") == "1"


def _unavailable(reason: str) -> None:
    if _require_all():
        pytest.fail(f"k8s tier required (TETHER_REQUIRE_ALL_TIERS=1): {reason}", pytrace=False)
    pytest.skip(f"k8s tier: {reason}")


def _binaries() -> Path:
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        _unavailable("the `kubernetes` Python client is not installed (pip install kubernetes)")
    if binaries_built():
        return bin_dir()
    if os.environ.get("TETHER_K8S_BUILD") == "0" and not _require_all():
        _unavailable(f"kube-apiserver/etcd not built and TETHER_K8S_BUILD=0; run {BUILD_SH}")
    go = shutil.which("go") or (
        "/usr/local/go/bin/go" if os.path.exists("/usr/local/go/bin/go") else None
    )
    if go is None:
        _unavailable(
            f"kube-apiserver/etcd not built and no Go toolchain to build them ({BUILD_SH})"
        )
    log = Path(tempfile.gettempdir()) / "tether-k8s-build.log"
    try:
        return build(log)
    except subprocess.CalledProcessError as e:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        _unavailable(f"{BUILD_SH} failed (exit {e.returncode}); log {log}:\n{tail}")
    except subprocess.TimeoutExpired:
        _unavailable(f"{BUILD_SH} timed out; log {log}")
    raise AssertionError("unreachable")


@pytest.fixture(scope="session")
def k8s_bin_dir() -> Path:
    return _binaries()


@pytest.fixture(scope="session")
def k8s_cluster(k8s_bin_dir: Path) -> Iterator[Cluster]:
    """The session's API server (admin client, CA, tokens); see tests/k8s/cluster.py.

    CRDs from tests/k8s/crds are installed. Tests share this cluster: use your
    own namespaces (the `k8s_namespace` fixture) and do not stop it for long
    without starting it again (`stop_apiserver`/`start_apiserver`).
    """
    cluster = Cluster(k8s_bin_dir)
    try:
        cluster.start()
    except Exception as e:
        if _require_all():
            raise
        pytest.skip(f"k8s tier: control plane did not start: {e}")
    try:
        cluster.install_crds()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def k8s_cluster_running(k8s_cluster: Cluster) -> Iterator[Cluster]:
    """The session cluster, with its API server restarted afterwards if a test stopped it."""
    yield k8s_cluster
    if not k8s_cluster.apiserver_running:
        k8s_cluster.start_apiserver()


_ns_counter = iter(range(1, 1_000_000))


@pytest.fixture
def k8s_namespace(k8s_cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace (with its default ServiceAccount), deleted afterwards.

    There is no namespace controller, so deletion leaves it Terminating; names
    are unique per session so that does not matter.
    """
    from kubernetes import client

    base = request.node.name.lower().replace("_", "-")
    name = f"t{next(_ns_counter)}-{''.join(c for c in base if c.isalnum() or c == '-')}"[:63]
    name = name.rstrip("-")
    k8s_cluster.ensure_namespace(name)
    yield name
    if k8s_cluster.apiserver_running:
        with contextlib.suppress(client.ApiException):
            client.CoreV1Api(k8s_cluster.api_client()).delete_namespace(name)
