"""A real kube-apiserver + etcd on loopback for the k8s test tier.

The binaries come from tests/k8s/build.sh (pinned versions built from Go
modules, cached under ${TETHER_CACHE:-/var/cache/tether}/k8s/<version>/bin).
There is no kubelet, controller-manager or scheduler: tests play those parts
(set spec.nodeName themselves, write pod IPs through the status subresource,
create EndpointSlices, create the namespace's "default" ServiceAccount).

    cluster = Cluster(bin_dir)
    cluster.start()
    api = cluster.api_client()          # admin (system:masters)
    ...
    cluster.stop_apiserver(); cluster.start_apiserver()   # API outage, same URL
    cluster.compact()                                     # etcd compaction -> 410s
    cluster.stop()

Authentication: a static token file with an admin user (group system:masters)
and a node-agent user named like the agent's service account
(system:serviceaccount:tether-system:tether, groups system:serviceaccounts and
system:serviceaccounts:tether-system) which has *no* RBAC grants: tests bind
roles to it (e.g. the ClusterRole from daemonset/) to check least privilege.
Real service-account tokens come from the TokenRequest API
(`service_account_token`) and are signed with the cluster's SA key, so
TokenReview works against them.
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUILD_SH = HERE / "build.sh"
CRDS_DIR = HERE / "crds"

SERVICE_CIDR = "10.96.0.0/16"
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"
AGENT_SA_NAMESPACE = "tether-system"
AGENT_SA_NAME = "tether"
AGENT_USER = f"system:serviceaccount:{AGENT_SA_NAMESPACE}:{AGENT_SA_NAME}"

# Default admission minus nothing: ServiceAccount admission stays on (pods get
# spec.serviceAccountName=default and the projected token volume, as on a real
# cluster), so a namespace needs its "default" ServiceAccount before pods can be
# created in it (the controller-manager would make it; `ensure_namespace` does).
DISABLED_ADMISSION: tuple[str, ...] = ()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bin_dir() -> Path:
    """Where build.sh puts (or would put) the binaries."""
    out = subprocess.run([str(BUILD_SH), "--print"], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def binaries_built() -> bool:
    return subprocess.run([str(BUILD_SH), "--check"], capture_output=True).returncode == 0


def build(log_path: Path | None = None, timeout: float = 60 * 60) -> Path:
    """Run build.sh (a no-op when cached); raise CalledProcessError on failure."""
    log = open(log_path, "w") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        out = subprocess.run(
            [str(BUILD_SH)],
            check=True,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            timeout=timeout,
        )
    finally:
        if log_path:
            log.close()  # type: ignore[union-attr]
    return Path(out.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- PKI


def _write_pki(d: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    validity = datetime.timedelta(days=2)

    def pem_key(k: Any) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tether-test-k8s-ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )

    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [
        x509.DNSName("localhost"),
        x509.DNSName("kubernetes"),
        x509.DNSName("kubernetes.default"),
        x509.DNSName("kubernetes.default.svc"),
        x509.DNSName("kubernetes.default.svc.cluster.local"),
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.IPAddress(ipaddress.ip_address("10.96.0.1")),
    ]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + validity)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    (d / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (d / "apiserver.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "apiserver.key").write_bytes(pem_key(key))

    sa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (d / "sa.key").write_bytes(pem_key(sa_key))
    (d / "sa.pub").write_bytes(
        sa_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    for f in ("apiserver.key", "sa.key"):
        os.chmod(d / f, 0o600)


# --------------------------------------------------------------------------- cluster


@dataclass
class Cluster:
    bin_dir: Path
    workdir: Path | None = None  # default: a fresh temp dir, removed on stop()
    service_cidr: str = SERVICE_CIDR
    authorization_mode: str = "RBAC"
    disabled_admission: tuple[str, ...] = DISABLED_ADMISSION
    extra_apiserver_args: list[str] = field(default_factory=list)
    start_timeout: float = 120.0

    url: str = field(init=False, default="")
    ca_file: Path = field(init=False)
    admin_token: str = field(init=False, default="")
    agent_token: str = field(init=False, default="")
    agent_user: str = field(init=False, default=AGENT_USER)
    etcd_url: str = field(init=False, default="")

    def __post_init__(self) -> None:
        self._own_workdir = self.workdir is None
        self._etcd: subprocess.Popen[bytes] | None = None
        self._apiserver: subprocess.Popen[bytes] | None = None
        self._api_port = 0

    # ---- lifecycle

    def start(self) -> Cluster:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="tether-k8s-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            self._prepare()
            self.start_etcd()
            self.start_apiserver()
            self._bootstrap()
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stop_apiserver()
        self._terminate("_etcd")
        if self._own_workdir and self.workdir is not None and self.workdir.exists():
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _prepare(self) -> None:
        assert self.workdir is not None
        pki = self.workdir / "pki"
        pki.mkdir(exist_ok=True)
        _write_pki(pki)
        self.ca_file = pki / "ca.crt"
        self.admin_token = secrets.token_hex(16)
        self.agent_token = secrets.token_hex(16)
        # token,user,uid,"group1,group2"
        (pki / "tokens.csv").write_text(
            f'{self.admin_token},admin,admin-uid,"system:masters"\n'
            f"{self.agent_token},{AGENT_USER},tether-agent-uid,"
            f'"system:serviceaccounts,system:serviceaccounts:{AGENT_SA_NAMESPACE}"\n'
        )
        os.chmod(pki / "tokens.csv", 0o600)
        self._api_port = free_port()
        self.url = f"https://127.0.0.1:{self._api_port}"
        self.write_kubeconfig(self.admin_kubeconfig(), self.admin_token, "admin")
        self.write_kubeconfig(self.agent_kubeconfig(), self.agent_token, "tether-agent")

    # ---- etcd

    def start_etcd(self) -> None:
        assert self.workdir is not None
        client, peer = free_port(), free_port()
        self.etcd_url = f"http://127.0.0.1:{client}"
        peer_url = f"http://127.0.0.1:{peer}"
        cmd = [
            str(self.bin_dir / "etcd"),
            "--name=tether-test",
            f"--data-dir={self.workdir / 'etcd'}",
            f"--listen-client-urls={self.etcd_url}",
            f"--advertise-client-urls={self.etcd_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=tether-test={peer_url}",
            "--unsafe-no-fsync",  # test data only; much faster on slow disks
            "--log-level=warn",
        ]
        self._etcd = self._spawn(cmd, "etcd.log")
        self._wait(
            lambda: self._http_ok(f"{self.etcd_url}/health"), "etcd /health", self._etcd, "etcd.log"
        )

    def etcd_request(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """Call etcd's v3 JSON gateway, e.g. ("/v3/maintenance/status", {})."""
        req = urllib.request.Request(
            f"{self.etcd_url}{path}",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:
            return dict(json.load(r))

    def etcd_revision(self) -> int:
        return int(self.etcd_request("/v3/maintenance/status", {})["header"]["revision"])

    def compact(self, revision: int | None = None) -> int:
        """Compact etcd at `revision` (default: current) as a kube-apiserver does.

        The API server's own compactor (every --etcd-compaction-interval, 5m by
        default) records the revision under etcd key "compact_rev_key" and then
        compacts; every API server watches that key and drops its watch-cache
        snapshots older than it (polled every 15s). Doing the same here looks
        to the API server like another replica compacted. Afterwards requests
        for older resourceVersions that reach etcd (e.g. an Exact list, after
        the cache has caught up) answer 410 Gone. Watches are served from the
        watch cache's event window, which etcd compaction does not shorten:
        a watch gets 410 when its RV predates that window (e.g. after an API
        server restart, see `restart_apiserver`).
        """
        rev = revision if revision is not None else self.etcd_revision()
        key = base64.b64encode(b"compact_rev_key").decode()
        self.etcd_request(
            "/v3/kv/put", {"key": key, "value": base64.b64encode(str(rev).encode()).decode()}
        )
        self.etcd_request("/v3/kv/compaction", {"revision": str(rev), "physical": True})
        return rev

    # ---- kube-apiserver

    def apiserver_args(self) -> list[str]:
        assert self.workdir is not None
        pki = self.workdir / "pki"
        args = [
            f"--etcd-servers={self.etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={self._api_port}",
            f"--cert-dir={self.workdir / 'apiserver-certs'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--token-auth-file={pki / 'tokens.csv'}",
            f"--authorization-mode={self.authorization_mode}",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            f"--service-cluster-ip-range={self.service_cidr}",
            "--allow-privileged=true",
            "--profiling=false",
            # The "kubernetes" Service's endpoints would point at 127.0.0.1,
            # which EndpointSlice validation rejects; nothing here needs them.
            "--endpoint-reconciler-type=none",
            "--v=1",
        ]
        if self.disabled_admission:
            args.append(f"--disable-admission-plugins={','.join(self.disabled_admission)}")
        return args + list(self.extra_apiserver_args)

    def start_apiserver(self) -> None:
        """(Re)start kube-apiserver on the same port, against the same etcd."""
        if self._apiserver is not None and self._apiserver.poll() is None:
            return
        cmd = [str(self.bin_dir / "kube-apiserver"), *self.apiserver_args()]
        self._apiserver = self._spawn(cmd, "apiserver.log")
        self._wait(self._readyz, "kube-apiserver /readyz", self._apiserver, "apiserver.log")

    def stop_apiserver(self) -> None:
        self._terminate("_apiserver")

    def restart_apiserver(self) -> None:
        self.stop_apiserver()
        self.start_apiserver()

    @property
    def apiserver_running(self) -> bool:
        return self._apiserver is not None and self._apiserver.poll() is None

    def _readyz(self) -> bool:
        try:
            self.raw("GET", "/readyz")
            return True
        except (urllib.error.URLError, OSError, ssl.SSLError):
            return False

    def _bootstrap(self) -> None:
        from kubernetes import client

        core = client.CoreV1Api(self.api_client())
        self.ensure_namespace("default")
        self.ensure_namespace(AGENT_SA_NAMESPACE)
        with contextlib.suppress(client.ApiException):
            core.create_namespaced_service_account(
                AGENT_SA_NAMESPACE, {"metadata": {"name": AGENT_SA_NAME}}
            )

    # ---- clients

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def raw(
        self,
        method: str,
        path: str,
        body: Any = None,
        token: str | None = None,
        timeout: float = 10,
    ) -> Any:
        """A bare HTTPS call (no client library); returns parsed JSON or text."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"{self.url}{path}",
            data=data,
            method=method,
            headers={
                "Authorization": f"Bearer {token or self.admin_token}",
                "Content-Type": "application/json",
                "Accept": "application/json",
            },
        )
        with urllib.request.urlopen(req, timeout=timeout, context=self.ssl_context()) as r:
            text = r.read().decode()
        try:
            return json.loads(text)
        except ValueError:
            return text

    def configuration(self, token: str | None = None) -> Any:
        from kubernetes import client

        cfg = client.Configuration()
        cfg.host = self.url
        cfg.ssl_ca_cert = str(self.ca_file)
        cfg.verify_ssl = True
        cfg.api_key = {"authorization": f"Bearer {token or self.admin_token}"}
        return cfg

    def api_client(self, token: str | None = None) -> Any:
        """A kubernetes.client.ApiClient; admin unless `token` is given."""
        from kubernetes import client

        return client.ApiClient(self.configuration(token))

    def agent_api_client(self) -> Any:
        """ApiClient for the node agent's static-token user (no RBAC grants by default)."""
        return self.api_client(self.agent_token)

    def write_kubeconfig(self, path: Path, token: str, user: str = "user") -> Path:
        ca = base64.b64encode(self.ca_file.read_bytes()).decode()
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "tether-test",
            "clusters": [
                {
                    "name": "tether-test",
                    "cluster": {"server": self.url, "certificate-authority-data": ca},
                }
            ],
            "users": [{"name": user, "user": {"token": token}}],
            "contexts": [
                {"name": "tether-test", "context": {"cluster": "tether-test", "user": user}}
            ],
        }
        path.write_text(json.dumps(cfg, indent=1))  # JSON is YAML
        os.chmod(path, 0o600)
        return path

    def admin_kubeconfig(self) -> Path:
        """Kubeconfig file for the admin user (system:masters)."""
        assert self.workdir is not None
        return self.workdir / "admin.kubeconfig"

    def agent_kubeconfig(self) -> Path:
        """Kubeconfig file for the node agent's user (AGENT_USER); grant it with apply_rbac."""
        assert self.workdir is not None
        return self.workdir / "agent.kubeconfig"

    def apply_rbac(self, *sources: Path | dict[str, Any]) -> list[str]:
        """Create or replace the RBAC objects in YAML files / dicts (other kinds ignored).

        Bindings whose subject is ServiceAccount tether-system/tether apply to
        the agent's static-token user (RBAC matches SA subjects by user name).
        Returns "Kind/name" of what was applied.
        """
        import yaml
        from kubernetes import client

        rbac = client.RbacAuthorizationV1Api(self.api_client())
        docs: list[dict[str, Any]] = []
        for src in sources:
            if isinstance(src, dict):
                docs.append(src)
            else:
                docs.extend(d for d in yaml.safe_load_all(Path(src).read_text()) if d)
        done = []
        for d in docs:
            kind, name = d.get("kind"), d["metadata"]["name"]
            ns = d["metadata"].get("namespace", "default")
            ops = {
                "ClusterRole": (rbac.create_cluster_role, rbac.replace_cluster_role, ()),
                "ClusterRoleBinding": (
                    rbac.create_cluster_role_binding,
                    rbac.replace_cluster_role_binding,
                    (),
                ),
                "Role": (rbac.create_namespaced_role, rbac.replace_namespaced_role, (ns,)),
                "RoleBinding": (
                    rbac.create_namespaced_role_binding,
                    rbac.replace_namespaced_role_binding,
                    (ns,),
                ),
            }.get(str(kind))
            if ops is None:
                continue
            create, replace, extra = ops
            try:
                create(*extra, d)
            except client.ApiException as e:
                if e.status != 409:
                    raise
                replace(name, *extra, d)
            done.append(f"{kind}/{name}")
        return done

    # ---- helpers for what the missing controllers would do

    def ensure_namespace(self, name: str, labels: dict[str, str] | None = None) -> None:
        """Create (or relabel) a namespace and its "default" ServiceAccount."""
        from kubernetes import client

        core = client.CoreV1Api(self.api_client())
        try:
            core.create_namespace({"metadata": {"name": name, "labels": labels or {}}})
        except client.ApiException as e:
            if e.status != 409:
                raise
            if labels:
                core.patch_namespace(name, {"metadata": {"labels": labels}})
        try:
            core.create_namespaced_service_account(name, {"metadata": {"name": "default"}})
        except client.ApiException as e:
            if e.status != 409:
                raise

    def service_account_token(
        self,
        namespace: str,
        name: str,
        audiences: list[str] | None = None,
        expiration_seconds: int = 3600,
        bound_pod: tuple[str, str] | None = None,
    ) -> str:
        """TokenRequest for a ServiceAccount (optionally bound to a pod (name, uid))."""
        from kubernetes import client

        spec: dict[str, Any] = {"expirationSeconds": expiration_seconds}
        if audiences:
            spec["audiences"] = audiences
        if bound_pod:
            spec["boundObjectRef"] = {
                "kind": "Pod",
                "apiVersion": "v1",
                "name": bound_pod[0],
                "uid": bound_pod[1],
            }
        core = client.CoreV1Api(self.api_client())
        tr = core.create_namespaced_service_account_token(name, namespace, {"spec": spec})
        return str(tr.status.token)

    def install_crds(self, directory: Path = CRDS_DIR, timeout: float = 30) -> list[str]:
        """Apply every CRD in `directory` and wait until each is Established."""
        import yaml
        from kubernetes import client

        ext = client.ApiextensionsV1Api(self.api_client())
        names = []
        for f in sorted(directory.glob("*.yaml")):
            for doc in yaml.safe_load_all(f.read_text()):
                if not doc:
                    continue
                try:
                    ext.create_custom_resource_definition(doc)
                except client.ApiException as e:
                    if e.status != 409:
                        raise
                names.append(doc["metadata"]["name"])
        deadline = time.monotonic() + timeout
        for n in names:
            while True:
                crd = ext.read_custom_resource_definition(n)
                conds = {c.type: c.status for c in (crd.status.conditions or [])}
                if conds.get("Established") == "True":
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"CRD {n} not Established: {conds}")
                time.sleep(0.1)
        # Discovery for new groups can lag Established by a moment.
        for n in names:
            crd = ext.read_custom_resource_definition(n)
            plural, group = crd.spec.names.plural, crd.spec.group
            version = next(v.name for v in crd.spec.versions if v.storage)
            path = f"/apis/{group}/{version}/{plural}"
            self._wait(
                lambda p=path: self._http_ok_api(p),  # type: ignore[misc]
                f"discovery of {n}",
                None,
                "apiserver.log",
                timeout=timeout,
            )
        return names

    # ---- process plumbing

    def log_tail(self, name: str, lines: int = 40) -> str:
        assert self.workdir is not None
        p = self.workdir / "logs" / name
        if not p.exists():
            return ""
        return "\n".join(p.read_text(errors="replace").splitlines()[-lines:])

    def _spawn(self, cmd: list[str], log: str) -> subprocess.Popen[bytes]:
        assert self.workdir is not None
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        with open(logs / log, "ab") as out:
            out.write(f"\n==== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
            out.flush()
            return subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _terminate(self, attr: str, timeout: float = 15) -> None:
        proc: subprocess.Popen[bytes] | None = getattr(self, attr)
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        setattr(self, attr, None)

    def _wait(
        self,
        ok: Any,
        what: str,
        proc: subprocess.Popen[bytes] | None,
        log: str,
        timeout: float | None = None,
    ) -> None:
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while not ok():
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(
                    f"{what}: process exited {proc.returncode}\n{self.log_tail(log)}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{what} not ready after {timeout or self.start_timeout}s\n{self.log_tail(log)}"
                )
            time.sleep(0.2)

    @staticmethod
    def _http_ok(url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _http_ok_api(self, path: str) -> bool:
        try:
            self.raw("GET", path)
            return True
        except (urllib.error.URLError, OSError):
            return False


@contextlib.contextmanager
def running_cluster(bin_dir: Path, **kw: Any) -> Iterator[Cluster]:
    c = Cluster(bin_dir, **kw)
    c.start()
    try:
        yield c
    finally:
        c.stop()
