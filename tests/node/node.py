"""A real single-node Kubernetes cluster on this machine, for the node tier.

Control plane from tests/k8s (etcd + kube-apiserver on loopback, a fixed port)
plus kube-controller-manager, kube-scheduler, containerd (+ runc) and the
kubelet, all built from Go modules by tests/node/build.sh. Images come from
daemonset/image/build.sh and are imported with `ctr images import`; pods use
imagePullPolicy: Never. Networking: the CNI bridge plugin on a bridge the
node creates (NODE_BRIDGE, NODE_IP is its address and the node's InternalIP;
the kubelet will not take a loopback node IP). No kube-proxy, no cluster DNS.

Only one such node per machine (fixed paths and ports): `Node.start` takes an
flock on LOCK_FILE for the whole run. The host is snapshotted before (saved
to HOST_BEFORE so an interrupted run is undone by the next one) and
`Node.teardown` restores it: processes, containers' cgroups, mounts, CNI
interfaces and netns, sysctls the kubelet/bridge plugin set, iptables chains,
fixed paths, state dirs. `host_snapshot()` / `diff_snapshots()` let the test
assert nothing is left.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.k8s.cluster import AGENT_USER, Cluster

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
BUILD_SH = HERE / "build.sh"
IMAGE_BUILD_SH = REPO / "daemonset" / "image" / "build.sh"
OVERLAY = HERE / "overlay"

NODE_NAME = "tether-node"
NODE_BRIDGE = "tnode0"
NODE_IP = "10.244.0.1"
POD_CIDR = "10.244.0.0/24"
API_PORT = 16443  # fixed: tests/node/overlay passes it to hostNetwork pods (no kube-proxy)
STATE = Path("/var/lib/tether-node")
RUN = Path("/run/tether-node")
LOCK_FILE = Path("/run/lock/tether-node.lock")
HOST_BEFORE = Path("/var/lib/tether-node.host-before.json")
KUBELET_CGROUP = "/sys/fs/cgroup/unified/tether-node/kubelet"  # v2: the agent's probe bypass
CGROUP_V2 = Path("/sys/fs/cgroup/unified")
# Paths the kubelet / containerd / CNI use whatever they are configured with.
FIXED_PATHS = (
    "/var/lib/kubelet",
    "/run/containerd",
    "/var/lib/cni",
    "/var/log/containers",
    "/var/log/pods",
    "/etc/cni",
    "/opt/cni",
    "/run/netns",
    "/run/tether",  # the agent's state dir (hostPath /var/run/tether)
)
SYSCTLS = (
    "vm/overcommit_memory",
    "kernel/panic",
    "kernel/panic_on_oops",
    "net/ipv4/ip_forward",
    "net/ipv6/conf/all/forwarding",
)
IMAGES = {  # name in the cluster -> file from daemonset/image/build.sh
    "localhost/tether:0.1.0": "tether.oci.tar",
    "localhost/tether-app:0.1.0": "app.oci.tar",
}
PAUSE_IMAGE = "localhost/pause:1"


def sh(*cmd: str | Path, check: bool = True, timeout: float = 120, **kw: Any) -> str:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))}: exit {r.returncode}\n{r.stdout}{r.stderr}")
    return r.stdout


def pause_image(bin_dir: Path) -> Path:
    """The sandbox image (tag 1): only tests/node/build.sh's static `pause`
    binary, packed with umoci next to it (cached)."""
    out = bin_dir / "pause.oci.tar"
    if out.exists():
        return out
    import tempfile

    umoci = str(bin_dir / "umoci")
    with tempfile.TemporaryDirectory(dir=bin_dir) as tmp:
        lay, bundle = f"{tmp}/oci", f"{tmp}/bundle"
        sh(umoci, "init", "--layout", lay)
        sh(umoci, "new", "--image", f"{lay}:1")
        sh(umoci, "unpack", "--image", f"{lay}:1", bundle)
        shutil.copy2(bin_dir / "pause", f"{bundle}/rootfs/pause")
        sh(umoci, "repack", "--image", f"{lay}:1", bundle)
        sh(
            umoci,
            "config",
            "--image",
            f"{lay}:1",
            "--config.entrypoint",
            "/pause",
            "--config.user",
            "65535:65535",
        )
        sh("tar", "-C", lay, "-cf", f"{out}.tmp", ".")
        os.replace(f"{out}.tmp", out)
    return out


# --------------------------------------------------------------------------- host state


def _sysctl(name: str) -> str:
    try:
        return Path("/proc/sys", name).read_text().strip()
    except OSError:
        return ""


def _iptables_chains() -> dict[str, list[str]]:
    """Chains per table, IPv4 and IPv6 (empty when no iptables binary)."""
    out: dict[str, list[str]] = {}
    for tool in (
        "iptables-save",
        "ip6tables-save",
        "iptables-legacy-save",
        "ip6tables-legacy-save",
    ):
        if shutil.which(tool) is None:
            continue
        r = subprocess.run([tool], capture_output=True, text=True)
        table = ""
        for ln in r.stdout.splitlines():
            if ln.startswith("*"):
                table = ln[1:]
            elif ln.startswith(":"):
                out.setdefault(f"{tool}:{table}", []).append(ln[1:].split()[0])
    if shutil.which("nft"):
        r = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
        out["nft"] = sorted(r.stdout.split("\n"))
    return out


def _kubepods_cgroups() -> list[str]:
    found = []
    for ctl in sorted(Path("/sys/fs/cgroup").iterdir()):
        for name in ("kubepods", "kubepods.slice", "tether-node"):
            if (ctl / name).is_dir():
                found.append(str(ctl / name))
    return found


def _bpffs_shared() -> bool | None:
    """Is /sys/fs/bpf a shared mount (None: not mounted)?"""
    for ln in Path("/proc/self/mountinfo").read_text().splitlines():
        f = ln.split()
        if f[4] == "/sys/fs/bpf":
            return any(x.startswith("shared:") for x in f[6 : f.index("-")])
    return None


def _mounts() -> list[str]:
    pts = []
    for ln in Path("/proc/self/mountinfo").read_text().splitlines():
        pts.append(ln.split()[4])
    return pts


def _node_links() -> list[str]:
    """The node's bridge and the CNI veths on it (other tests on this machine
    make links of their own: those are not compared)."""
    links = json.loads(sh("ip", "-j", "link", "show"))
    return sorted(
        str(link["ifname"])
        for link in links
        if link["ifname"] == NODE_BRIDGE or link.get("master") == NODE_BRIDGE
    )


OUR_MOUNT_PREFIXES = (
    str(STATE),
    str(RUN),
    "/var/lib/kubelet",
    "/run/containerd",
    "/run/netns/cni-",
    "/sys/fs/bpf/tether",
)


def host_snapshot() -> dict[str, Any]:
    """What the node tier may change on the host (compared before/after).
    Limited to what is the tier's own, so parallel tests elsewhere on the
    machine do not show up."""
    return {
        "sysctls": {s: _sysctl(s) for s in SYSCTLS},
        "links": _node_links(),
        "netns": sorted(n for n in os.listdir("/run/netns") if n.startswith("cni-"))
        if os.path.isdir("/run/netns")
        else [],
        "mounts": sorted(m for m in _mounts() if m.startswith(OUR_MOUNT_PREFIXES)),
        "cgroups": _kubepods_cgroups(),
        "iptables": _iptables_chains(),
        "paths": sorted(p for p in (*FIXED_PATHS, str(STATE), str(RUN)) if os.path.lexists(p)),
        "bpf_pins": sorted(str(p) for p in Path("/sys/fs/bpf").glob("tether")),
        "bpffs_shared": _bpffs_shared(),
        "processes": sorted(_our_pids()),
    }


def diff_snapshots(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    diff: dict[str, Any] = {}
    for k in before.keys() | after.keys():
        b, a = before.get(k), after.get(k)
        if b == a:
            continue
        if isinstance(b, list) and isinstance(a, list):
            diff[k] = {"added": sorted(set(a) - set(b)), "removed": sorted(set(b) - set(a))}
        elif isinstance(b, dict) and isinstance(a, dict):
            diff[k] = {
                kk: {"before": b.get(kk), "after": a.get(kk)}
                for kk in b.keys() | a.keys()
                if b.get(kk) != a.get(kk)
            }
        else:
            diff[k] = {"before": b, "after": a}
    return diff


def _our_pids() -> list[int]:
    """Processes of the node tier: a binary of tests/node/build.sh's cache
    (kubelet, containerd, shims, controllers), or anything whose command line
    names the node's state directory (its etcd and kube-apiserver, which are
    tests/k8s binaries also used by other tests). Not the pods' processes:
    those are found through their cgroups."""
    root = str(Path(os.environ.get("TETHER_CACHE", "/var/cache/tether")) / "node") + "/"
    mine = os.getpid()
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == mine:
            continue
        try:
            exe = os.readlink(p / "exe")
            cmdline = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if exe.startswith(root) or (
            f"{STATE}/" in cmdline and not exe.endswith(("python3", "python"))
        ):
            pids.append(int(p.name))
    return pids


# --------------------------------------------------------------------------- teardown


def _kill_pids(pids: list[int], timeout: float = 10) -> None:  # by id
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _rm_cgroup_tree(d: Path) -> None:
    if not d.is_dir():
        return
    kill = d / "cgroup.kill"
    if kill.exists():
        with contextlib.suppress(OSError):
            kill.write_text("1")
    else:  # v1: kill every task
        for t in d.rglob("tasks"):
            with contextlib.suppress(OSError):
                for pid in t.read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
    subdirs = sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts))
    for sub in [*subdirs, d]:
        for _ in range(50):
            try:
                sub.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


def _umount_under(prefixes: tuple[str, ...]) -> None:
    for _ in range(3):
        pts = [m for m in _mounts() if m.startswith(prefixes)]
        if not pts:
            return
        for m in sorted(set(pts), key=lambda m: -len(m)):
            subprocess.run(["umount", "-l", m], capture_output=True)


def clean_host(before: dict[str, Any] | None) -> None:
    """Undo everything a node tier run may have left (also after a crash)."""
    # 1. processes: ours by executable path (kubelet, containerd, shims,
    #    controllers); then every container, through its cgroup.
    _kill_pids(_our_pids())
    for cg in _kubepods_cgroups():
        if not before or cg not in before.get("cgroups", []):
            _rm_cgroup_tree(Path(cg))
    # 1b. the agent's pins and per-pod state, when the run did not get as far
    #     as the uninstall (which runs the cleanup DaemonSet): `tether cleanup`
    #     on the host, only if the pins were not there before the run.
    pins = Path("/sys/fs/bpf/tether")
    if pins.exists() and (before is None or str(pins) not in before.get("bpf_pins", [])):
        import sys

        subprocess.run(
            [
                sys.executable,
                "-m",
                "agent.cli",
                "cleanup",
                "--pin-dir",
                str(pins),
                "--state-dir",
                "/run/tether",
            ],
            capture_output=True,
            cwd=REPO,
            timeout=120,
        )
    # 2. mounts: the kubelet's root dir (bind-mounted onto itself), volumes,
    #    containerd's rootfs/shm/netns mounts.
    _umount_under(OUR_MOUNT_PREFIXES[:-1])
    # 3. network: CNI veths go with their netns; the bridge is ours.
    for name in _node_links():  # veths first, then the bridge
        subprocess.run(["ip", "link", "del", name], capture_output=True)
    subprocess.run(["ip", "link", "del", NODE_BRIDGE], capture_output=True)
    # 4. /sys/fs/bpf propagation and sysctls back to what they were
    if before is not None and before.get("bpffs_shared") is False and _bpffs_shared():
        subprocess.run(["mount", "--make-private", "/sys/fs/bpf"], capture_output=True)
    if before is not None:
        for name, value in before["sysctls"].items():
            if value and _sysctl(name) != value:
                with contextlib.suppress(OSError):
                    Path("/proc/sys", name).write_text(value)
    # 5. iptables chains the kubelet adds (only if an iptables binary exists)
    for tool in ("iptables", "ip6tables"):
        if shutil.which(tool) is None:
            continue
        for table, chain in (
            ("filter", "KUBE-FIREWALL"),
            ("mangle", "KUBE-KUBELET-CANARY"),
            ("nat", "KUBE-KUBELET-CANARY"),
            ("filter", "KUBE-KUBELET-CANARY"),
            ("mangle", "KUBE-IPTABLES-HINT"),
        ):
            for parent in ("INPUT", "OUTPUT"):
                while (
                    subprocess.run(
                        [tool, "-t", table, "-D", parent, "-j", chain], capture_output=True
                    ).returncode
                    == 0
                ):
                    pass
            subprocess.run([tool, "-t", table, "-F", chain], capture_output=True)
            subprocess.run([tool, "-t", table, "-X", chain], capture_output=True)
    # 5b. with iptables-nft, the tables made for those chains: removed when
    #     they were not there before and hold no rule now
    if shutil.which("nft") and before is not None:
        had = set(before["iptables"].get("nft", []))
        r = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True)
        for line in r.stdout.splitlines():
            if not line.strip() or line in had:
                continue
            _, family, name = line.split()
            listing = subprocess.run(
                ["nft", "list", "table", family, name], capture_output=True, text=True
            ).stdout
            rules = [
                ln
                for ln in listing.splitlines()
                if ln.strip() and not ln.strip().startswith(("table ", "chain ", "type ", "}"))
            ]
            if not rules:
                subprocess.run(["nft", "delete", "table", family, name], capture_output=True)
    # 6. paths: ours, and the fixed ones only if they did not exist before
    existed = set(before["paths"]) if before else set()
    for p in (*FIXED_PATHS, str(STATE), str(RUN)):
        if p in existed or not os.path.lexists(p):
            continue
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(p)


# --------------------------------------------------------------------------- PKI


def _kubelet_pki(d: Path) -> None:
    """A CA for the API server -> kubelet connection: the kubelet's serving
    certificate (NODE_IP) and the API server's client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(stem: str, cert: x509.Certificate, key: Any) -> None:
        (d / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{stem}.key").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        os.chmod(d / f"{stem}.key", 0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("tether-node-kubelet-ca"))
        .issuer_name(name("tether-node-kubelet-ca"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    write("kubelet-ca", ca, ca_key)
    for stem, cn, usage, sans in (
        (
            "kubelet",
            NODE_NAME,
            ExtendedKeyUsageOID.SERVER_AUTH,
            [x509.IPAddress(ipaddress.ip_address(NODE_IP)), x509.DNSName(NODE_NAME)],
        ),
        ("apiserver-kubelet-client", "kube-apiserver", ExtendedKeyUsageOID.CLIENT_AUTH, []),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        b = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        write(stem, b.sign(ca_key, hashes.SHA256()), key)


class NodeCluster(Cluster):
    """tests/k8s's Cluster on API_PORT with Node,RBAC authorization and
    NodeRestriction, a kubelet token, and kubelet client certificates."""

    def _prepare(self) -> None:
        super()._prepare()
        import secrets

        assert self.workdir is not None
        pki = self.workdir / "pki"
        _kubelet_pki(pki)
        self._api_port = API_PORT
        self.url = f"https://127.0.0.1:{API_PORT}"
        self.kubelet_token = secrets.token_hex(16)
        with open(pki / "tokens.csv", "a") as f:
            f.write(f'{self.kubelet_token},system:node:{NODE_NAME},node-uid,"system:nodes"\n')
        self.write_kubeconfig(self.admin_kubeconfig(), self.admin_token, "admin")
        self.write_kubeconfig(self.agent_kubeconfig(), self.agent_token, "tether-agent")
        self.write_kubeconfig(self.workdir / "kubelet.kubeconfig", self.kubelet_token, "kubelet")

    def apiserver_args(self) -> list[str]:
        assert self.workdir is not None
        pki = self.workdir / "pki"
        return [
            *super().apiserver_args(),
            "--enable-admission-plugins=NodeRestriction",
            f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
            f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
            f"--kubelet-certificate-authority={pki / 'kubelet-ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP",
        ]

    def _bootstrap(self) -> None:
        # No agent user's ServiceAccount here: the DaemonSet's RBAC makes its own.
        self.ensure_namespace("default")


# --------------------------------------------------------------------------- node


class Node:
    """The whole node: start() brings it up, teardown() undoes everything."""

    def __init__(self, bin_dir: Path, k8s_bin_dir: Path, image_dir: Path) -> None:
        self.bin = bin_dir
        self.k8s_bin = k8s_bin_dir
        self.image_dir = image_dir
        self.cluster: NodeCluster | None = None
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self._lock_fd: int | None = None
        self.before: dict[str, Any] = {}
        self.timings: dict[str, float] = {}
        self.teardown_diff: dict[str, Any] | None = None

    # ---- paths
    @property
    def logs(self) -> Path:
        return STATE / "logs"

    @property
    def sock(self) -> Path:
        return RUN / "containerd" / "containerd.sock"

    def kubectl(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> str:
        assert self.cluster is not None
        cmd = [str(self.bin / "kubectl"), f"--kubeconfig={self.cluster.admin_kubeconfig()}", *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
        if check and r.returncode != 0:
            raise RuntimeError(
                f"kubectl {' '.join(args)}: exit {r.returncode}\n{r.stdout}{r.stderr}"
            )
        return r.stdout

    def kubectl_json(self, *args: str) -> Any:
        return json.loads(self.kubectl(*args, "-o", "json"))

    def ctr(self, *args: str) -> str:
        return sh(self.bin / "ctr", "--address", self.sock, "-n", "k8s.io", *args, timeout=300)

    # ---- lifecycle
    def lock(self) -> None:
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"another node tier run holds {LOCK_FILE}") from None
        self._lock_fd = fd

    def start(self) -> Node:
        t0 = time.monotonic()
        self.lock()
        # A run interrupted midway: undo it with the snapshot it saved.
        if HOST_BEFORE.exists():
            clean_host(json.loads(HOST_BEFORE.read_text()))
            HOST_BEFORE.unlink()
        else:
            clean_host(None) if _our_pids() else None
        self.before = host_snapshot()
        HOST_BEFORE.write_text(json.dumps(self.before))
        try:
            self._start()
        except BaseException:
            self.teardown()
            raise
        self.timings["node_start_s"] = round(time.monotonic() - t0, 1)
        return self

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str] | None = None) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self.logs / f"{name}.log", "ab") as out:
            self.procs[name] = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )

    def log_tail(self, name: str, n: int = 40) -> str:
        p = self.logs / f"{name}.log"
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else ""

    def _wait(self, ok: Any, what: str, proc: str | None = None, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if ok():
                    return
            except Exception:
                pass
            if proc and self.procs[proc].poll() is not None:
                raise RuntimeError(f"{what}: {proc} exited\n{self.log_tail(proc)}")
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{what} after {timeout}s\n{self.log_tail(proc) if proc else ''}"
                )
            time.sleep(0.3)

    def _start(self) -> None:
        for d in (STATE, RUN, self.logs):
            d.mkdir(parents=True, exist_ok=True)
        # The node's address: a bridge the CNI bridge plugin then uses as its gateway.
        sh("ip", "link", "add", NODE_BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{NODE_IP}/24", "dev", NODE_BRIDGE)
        sh("ip", "link", "set", NODE_BRIDGE, "up")
        # The DaemonSet's bpffs init container mounts with Bidirectional
        # propagation (the agent with HostToContainer): the runtime refuses
        # unless the host's /sys/fs/bpf is a shared mount. systemd makes every
        # mount shared on a real node; this machine has no systemd. Undone in
        # teardown.
        if self.before.get("bpffs_shared") is False:
            sh("mount", "--make-shared", "/sys/fs/bpf")
        self._containerd()
        t = time.monotonic()
        for name, f in IMAGES.items():
            base = name.rsplit(":", 1)[0]
            self.ctr("images", "import", "--base-name", base, str(self.image_dir / f))
        self.ctr("images", "import", "--base-name", "localhost/pause", str(pause_image(self.bin)))
        self.timings["image_import_s"] = round(time.monotonic() - t, 1)
        self.cluster = NodeCluster(
            self.k8s_bin, workdir=STATE / "cp", authorization_mode="Node,RBAC"
        )
        self.cluster.start()
        self._controllers()
        self._kubelet()

    def _containerd(self) -> None:
        cni_conf = STATE / "cni" / "net.d"
        cni_conf.mkdir(parents=True, exist_ok=True)
        (cni_conf / "10-tether-node.conflist").write_text(
            json.dumps(
                {
                    "cniVersion": "1.0.0",
                    "name": "tether-node",
                    "plugins": [
                        {
                            "type": "bridge",
                            "bridge": NODE_BRIDGE,
                            "isGateway": True,
                            "ipMasq": False,  # no iptables: pod to pod and pod to node only
                            "hairpinMode": True,
                            "ipam": {
                                "type": "host-local",
                                "ranges": [[{"subnet": POD_CIDR, "gateway": NODE_IP}]],
                                "dataDir": str(STATE / "cni" / "ipam"),
                            },
                        }
                    ],
                },
                indent=1,
            )
        )
        cfg = STATE / "containerd.toml"
        cfg.write_text(f"""
version = 3
root = "{STATE}/containerd"
state = "{RUN}/containerd"
[grpc]
  address = "{self.sock}"
[ttrpc]
  address = "{self.sock}.ttrpc"
[debug]
  address = ""
[plugins."io.containerd.cri.v1.images".pinned_images]
  sandbox = "{PAUSE_IMAGE}"
[plugins."io.containerd.cri.v1.runtime"]
  # root on this machine lacks CAP_SYS_RESOURCE: runc may not lower oom_score_adj
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
[plugins."io.containerd.cri.v1.runtime".cni]
  bin_dirs = ["{self.bin / "cni"}"]
  conf_dir = "{cni_conf}"
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
  SystemdCgroup = false
  BinaryName = "{self.bin / "runc"}"
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
""")
        path = f"{self.bin}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        self._spawn(
            "containerd", [str(self.bin / "containerd"), "--config", str(cfg)], {"PATH": path}
        )
        self._wait(lambda: self.ctr("version") is not None, "containerd", "containerd", 60)

    def _controllers(self) -> None:
        assert self.cluster is not None and self.cluster.workdir is not None
        kc = str(self.cluster.admin_kubeconfig())
        pki = self.cluster.workdir / "pki"
        self._spawn(
            "kube-controller-manager",
            [
                str(self.bin / "kube-controller-manager"),
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                "--use-service-account-credentials=false",
                "--controllers=*,-nodeipam,-cloud-node-lifecycle,-service-lb-controller,-node-route-controller",
                "--v=1",
            ],
        )
        self._spawn(
            "kube-scheduler",
            [
                str(self.bin / "kube-scheduler"),
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                "--secure-port=0",
                "--v=1",
            ],
        )

    def _kubelet(self) -> None:
        assert self.cluster is not None and self.cluster.workdir is not None
        pki = self.cluster.workdir / "pki"
        root = STATE / "kubelet"
        root.mkdir(parents=True, exist_ok=True)
        cfg = STATE / "kubelet.yaml"
        cfg.write_text(
            json.dumps(
                {
                    "apiVersion": "kubelet.config.k8s.io/v1beta1",
                    "kind": "KubeletConfiguration",
                    "address": NODE_IP,
                    "port": 10250,
                    "readOnlyPort": 0,
                    "healthzBindAddress": "127.0.0.1",
                    "healthzPort": 10248,
                    "cgroupDriver": "cgroupfs",
                    "failCgroupV1": False,
                    "failSwapOn": False,
                    "containerRuntimeEndpoint": f"unix://{self.sock}",
                    "tlsCertFile": str(pki / "kubelet.crt"),
                    "tlsPrivateKeyFile": str(pki / "kubelet.key"),
                    "authentication": {
                        "anonymous": {"enabled": False},
                        "webhook": {"enabled": False},
                        "x509": {"clientCAFile": str(pki / "kubelet-ca.crt")},
                    },
                    "authorization": {"mode": "AlwaysAllow"},
                    "clusterDomain": "cluster.local",
                    "resolvConf": "/etc/resolv.conf",
                    "podLogsDir": str(STATE / "pod-logs"),
                    "evictionHard": {
                        "memory.available": "50Mi",
                        "nodefs.available": "1%",
                        "imagefs.available": "1%",
                        "nodefs.inodesFree": "1%",
                    },
                    "imageGCHighThresholdPercent": 100,
                    "serializeImagePulls": False,
                    "syncFrequency": "10s",
                    "fileCheckFrequency": "10s",
                    "nodeStatusUpdateFrequency": "5s",
                    "registerNode": True,
                },
                indent=1,
            )
        )
        cg = Path(KUBELET_CGROUP)
        cg.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(self.bin / "kubelet"),
            f"--config={cfg}",
            f"--kubeconfig={self.cluster.workdir / 'kubelet.kubeconfig'}",
            f"--root-dir={root}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={NODE_IP}",
            "--v=1",
        ]
        # Into its cgroup v2 directory before exec: the agent's kubeletCgroups
        # (tests/node/overlay) names it, so probes bypass capture.
        wrapper = ["/bin/sh", "-c", f'echo $$ > {cg}/cgroup.procs && exec "$@"', "kubelet", *cmd]
        path = f"{self.bin}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        self._spawn("kubelet", wrapper, {"PATH": path})
        self._wait(self._node_ready, "node Ready", "kubelet", 180)

    def _node_ready(self) -> bool:
        n = self.kubectl_json("get", "node", NODE_NAME)
        conds = {c["type"]: c["status"] for c in n["status"].get("conditions", [])}
        return conds.get("Ready") == "True"

    def teardown(self) -> dict[str, Any]:
        """Stop everything, clean the host; returns the before/after difference.
        Idempotent (the test calls it, then the fixture)."""
        if self.teardown_diff is not None:
            return self.teardown_diff
        for name in ("kubelet", "kube-scheduler", "kube-controller-manager"):
            p = self.procs.pop(name, None)
            if p is not None and p.poll() is None:
                p.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(15)
                if p.poll() is None:
                    p.kill()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.stop()
        p = self.procs.pop("containerd", None)
        if p is not None and p.poll() is None:
            p.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(15)
        before = self.before or (
            json.loads(HOST_BEFORE.read_text()) if HOST_BEFORE.exists() else None
        )
        # keep the logs for a failed run's post-mortem
        keep = Path("/tmp/tether-node-logs")
        if self.logs.exists():
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(self.logs, keep, dirs_exist_ok=True)
            if self.cluster is not None and self.cluster.workdir is not None:
                with contextlib.suppress(OSError):
                    shutil.copytree(self.cluster.workdir / "logs", keep / "cp", dirs_exist_ok=True)
        clean_host(before)
        with contextlib.suppress(OSError):
            Path(KUBELET_CGROUP).rmdir()
            Path(KUBELET_CGROUP).parent.rmdir()
        after = host_snapshot()
        diff = diff_snapshots(before, after) if before else {}
        if not diff:
            HOST_BEFORE.unlink(missing_ok=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
        self.teardown_diff = diff
        return diff


__all__ = ["AGENT_USER", "Node", "NodeCluster", "diff_snapshots", "host_snapshot"]
