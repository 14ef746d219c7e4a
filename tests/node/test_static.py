"""Static checks of the node tier's inputs (always run, no cluster):
the Dockerfile and daemonset/image/build.sh install the same packages and
the project the same way; the test overlay changes only what it says."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
IMAGE = REPO / "daemonset" / "image"


def packages() -> list[str]:
    out = []
    for ln in (IMAGE / "packages.txt").read_text().splitlines():
        ln = ln.split("#", 1)[0].strip()
        if ln:
            out.append(ln)
    return out


def test_package_list() -> None:
    pk = packages()
    assert len(pk) == len(set(pk))
    for must in ("python3-bpfcc", "python3-venv", "linux-headers-amd64"):
        assert must in pk


def test_dockerfile_installs_the_shared_package_list() -> None:
    df = (REPO / "daemonset" / "Dockerfile").read_text()
    assert "COPY daemonset/image/packages.txt /tmp/packages.txt" in df
    assert re.search(r"xargs apt-get install -y --no-install-recommends", df)
    # no package named inline: every apt-get install reads the list
    for m in re.finditer(r"apt-get install[^\n]*", df):
        assert m.group(0).strip().endswith("--no-install-recommends \\"), m.group(0)
    assert "FROM debian:bookworm" in df


def test_build_sh_installs_the_same_way() -> None:
    sh = (IMAGE / "build.sh").read_text()
    df = (REPO / "daemonset" / "Dockerfile").read_text()
    assert "PKGS_FILE=$HERE/packages.txt" in sh
    assert "SUITE=${SUITE:-bookworm}" in sh
    for step in (
        "python3 -m venv --system-site-packages /opt/tether",
        'python -c "import bcc, agent.cli"',
    ):
        assert step in sh and step in df, step
    # the same extras: uvloop, and Envoy for waypoints
    assert 'pip install -q "/src[fast,waypoint]"' in sh
    assert 'pip install --no-cache-dir "/src[fast,waypoint]"' in df
    assert "PATH=/opt/tether/bin:" in sh and "PATH=/opt/tether/bin:" in df
    assert "--config.entrypoint tether --config.cmd --help" in sh
    assert 'ENTRYPOINT ["tether"]' in df and 'CMD ["--help"]' in df


def test_both_recipes_move_the_kernel_headers_where_the_agent_looks() -> None:
    """The DaemonSet mounts the node's /usr/src, hiding the image's headers
    there: both recipes run kernel-headers.sh (base layer), the base cache key
    covers it, and it moves them to the directory the loader falls back to."""
    from agent.datapath.loader import IMAGE_HEADERS

    sh = (IMAGE / "build.sh").read_text()
    df = (REPO / "daemonset" / "Dockerfile").read_text()
    script = (IMAGE / "kernel-headers.sh").read_text()
    assert "COPY daemonset/image/kernel-headers.sh /tmp/kernel-headers.sh" in df
    assert "&& sh /tmp/kernel-headers.sh" in df
    assert 'chroot "$BASE/rootfs" /bin/sh /tmp/kernel-headers.sh' in sh
    base_key = next(ln for ln in sh.splitlines() if ln.startswith("BASE_KEY="))
    assert 'cat "$HERE/kernel-headers.sh"' in base_key
    assert f"dest={IMAGE_HEADERS}\n" in script
    assert "link build 'linux-headers-*-amd64'" in script
    assert "link source 'linux-headers-*-common'" in script


def test_build_sh_copies_every_package_the_project_installs() -> None:
    """The Dockerfile copies the whole tree; build.sh copies PROJECT_FILES.
    Every package directory pyproject names must be among them (a missing
    waypoint/ once broke the image build: "package directory 'waypoint'
    does not exist")."""
    import tomllib

    sh = (IMAGE / "build.sh").read_text()
    m = re.search(r"^PROJECT_FILES=\(([^)]*)\)", sh, re.M)
    assert m, "PROJECT_FILES=(...) not found in build.sh"
    copied = set(m.group(1).split())
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = {tool["package-dir"].get(p, p.replace(".", "/")) for p in tool["packages"]}
    roots = {d.split("/")[0] for d in dirs}
    assert roots <= copied, f"build.sh PROJECT_FILES misses {sorted(roots - copied)}"
    assert {"pyproject.toml", "README.md"} <= copied


def test_overlay_changes_only_kubelet_cgroups() -> None:
    base = yaml.safe_load((REPO / "daemonset" / "configmap.yaml").read_text())["data"]["agent.yaml"]
    patch = yaml.safe_load((REPO / "tests" / "node" / "overlay" / "agent-config.yaml").read_text())
    new = patch[0]["value"]
    b, n = base.splitlines(), new.splitlines()
    assert len(b) == len(n)
    diff = [(x, y) for x, y in zip(b, n, strict=True) if x != y]
    assert len(diff) == 1 and "kubeletCgroups" in diff[0][0], diff
    assert "/sys/fs/cgroup/unified/tether-node/kubelet" in diff[0][1]
