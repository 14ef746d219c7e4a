"""The Kubernetes manifests in daemonset/: valid against the Kubernetes
schemas (offline, kubernetes-validate ships them) and consistent with the
code they deploy: hostPaths the code needs, least-privilege RBAC, no blanket
capabilities, the agent's command line and settings file as the agent itself
parses them."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import cli
from agent.sources import localfile

kv = pytest.importorskip(
    "kubernetes_validate", reason="pip install kubernetes-validate (a dev dependency)"
)

ROOT = Path(__file__).resolve().parents[2]
DS_DIR = ROOT / "daemonset"
K8S_VERSION = "1.30"  # the oldest version the manifests support (appArmorProfile field)

# What the agent's code reads or writes on the host, and where it sees it.
AGENT_HOST_PATHS = {
    "/sys/fs/bpf": "/sys/fs/bpf",  # pinned maps and links (datapath)
    "/sys/fs/cgroup": "/sys/fs/cgroup",  # pod cgroups (podfs), kubelet cgroup, attach
    "/proc": "/host/proc",  # per-pod-netns sysctls (podnet)
    "/lib/modules": "/lib/modules",  # BCC kernel headers (loader)
    "/usr/src": "/usr/src",  # where /lib/modules/*/build points
    "/var/run/tether": "/var/run/tether",  # state file, TLS temp, handoff socket
}
CLEANUP_HOST_PATHS = {"/sys/fs/bpf", "/proc", "/var/run"}
AGENT_CAPS = {"BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE", "SYS_RESOURCE"}


def manifest_files() -> list[Path]:
    return sorted(p for p in DS_DIR.glob("*.yaml") if p.name != "kustomization.yaml")


def docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def all_docs() -> list[dict[str, Any]]:
    return [d for p in manifest_files() for d in docs(p)]


def find(kind: str, name: str, path: Path | None = None) -> dict[str, Any]:
    pool = docs(path) if path else all_docs()
    hits = [d for d in pool if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(hits) == 1, f"{kind}/{name}: {len(hits)} found"
    return hits[0]


def agent_ds() -> dict[str, Any]:
    return find("DaemonSet", "tether-agent", DS_DIR / "daemonset.yaml")


def container(pod: dict[str, Any], name: str, init: bool = False) -> dict[str, Any]:
    key = "initContainers" if init else "containers"
    found: list[dict[str, Any]] = [c for c in pod[key] if c["name"] == name]
    assert len(found) == 1, f"container {name}: {len(found)} found"
    return found[0]


def agent_settings() -> dict[str, Any]:
    cm = find("ConfigMap", "tether-agent-config")
    doc: dict[str, Any] = yaml.safe_load(cm["data"]["agent.yaml"])
    return doc


def mount_of(
    pod: dict[str, Any], c: dict[str, Any], path: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (volumeMount, volume) whose mountPath is the longest prefix of path."""
    best = max(
        (
            m
            for m in c["volumeMounts"]
            if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")
        ),
        key=lambda m: len(m["mountPath"]),
        default=None,
    )
    assert best is not None, f"{path}: not under any volume mount of {c['name']}"
    (vol,) = [v for v in pod["volumes"] if v["name"] == best["name"]]
    return best, vol


# -- schema -------------------------------------------------------------------


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.name)
def test_schema_valid(path: Path) -> None:
    found = docs(path)
    assert found, f"{path.name}: no documents"
    for d in found:
        try:
            kv.validate(d, K8S_VERSION, strict=True)
        except kv.ValidationError as e:
            where = "/".join(str(x) for x in e.absolute_path)
            pytest.fail(f"{path.name}: {d['kind']}/{d['metadata']['name']}: {where}: {e.message}")


def test_schema_check_is_real() -> None:
    """The validator rejects what the API server would (guards against a no-op)."""
    ds = agent_ds()
    bad = yaml.safe_load(yaml.safe_dump(ds))
    bad["spec"]["template"]["spec"]["containers"][0]["securityContext"]["privilegd"] = False
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


def test_kustomization_lists_existing_files() -> None:
    k = yaml.safe_load((DS_DIR / "kustomization.yaml").read_text())
    res = k["resources"]
    assert len(res) == len(set(res))
    for r in res:
        assert (DS_DIR / r).is_file(), f"kustomization lists missing {r}"
    listed = set(res)
    on_disk = {p.name for p in manifest_files()}
    assert on_disk - listed == {"cleanup.yaml"}, "every manifest but the uninstall step"
    assert {i["name"] for i in k.get("images", [])} >= {"tether"}


def test_everything_in_tether_system() -> None:
    for d in all_docs():
        if d["kind"] in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
            continue
        assert d["metadata"].get("namespace") == "tether-system", d["metadata"]["name"]


# -- RBAC -----------------------------------------------------------------------


def rules(kind: str, name: str) -> set[tuple[str, str, str]]:
    out = set()
    for r in find(kind, name)["rules"]:
        for g in r["apiGroups"]:
            for res in r["resources"]:
                for v in r["verbs"]:
                    out.add((g, res, v))
    return out


def test_no_wildcards_in_roles() -> None:
    for d in all_docs():
        if d["kind"] not in ("ClusterRole", "Role"):
            continue
        for r in d["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert not any("*" in x for x in r.get(field, [])), (d["metadata"]["name"], r)


def test_agent_role_is_exactly_what_the_source_uses() -> None:
    read = {"get", "list", "watch"}
    want = {
        (g, r, v)
        for g, rs in (
            ("", ("namespaces", "pods", "services")),
            ("discovery.k8s.io", ("endpointslices",)),
            ("security.istio.io", ("authorizationpolicies", "peerauthentications")),
            ("gateway.networking.k8s.io", ("gateways", "httproutes")),
        )
        for r in rs
        for v in read
    }
    want |= {("", "pods", "patch"), ("", "events", "create")}
    # the waypoint deployer (agent/sources/waypoint_deploy.py): server-side apply
    want |= {
        (g, r, v)
        for g, r in (("", "services"), ("", "serviceaccounts"), ("apps", "deployments"))
        for v in ("create", "patch")
    }
    want |= {("gateway.networking.k8s.io", "gateways/status", "patch")}
    assert rules("ClusterRole", "tether-agent") == want


def test_deployer_lease_role_is_one_lease() -> None:
    """Leader election needs one Lease in tether-system, and nothing else."""
    role = find("Role", "tether-waypoint-deployer")
    assert role["metadata"]["namespace"] == "tether-system"
    assert rules("Role", "tether-waypoint-deployer") == {
        ("coordination.k8s.io", "leases", v) for v in ("create", "get", "update")
    }
    named = [r for r in role["rules"] if set(r["verbs"]) & {"get", "update"}]
    assert all(r.get("resourceNames") == ["tether-waypoint-deployer"] for r in named)
    from agent.sources.waypoint_deploy import LEASE_NAME

    assert LEASE_NAME == "tether-waypoint-deployer"


def test_agent_role_covers_the_watched_kinds() -> None:
    """Every kind agent/sources/k8s.py lists is granted list+watch."""
    src = (ROOT / "agent" / "sources" / "k8s.py").read_text()
    granted = rules("ClusterRole", "tether-agent")
    plurals = set(re.findall(r'Kind\("(\w+)"', src))
    assert plurals, "k8s.py changed shape: update this test"
    for plural in plurals:
        assert any(r == plural and v == "watch" for _, r, v in granted), plural
        assert any(r == plural and v == "list" for _, r, v in granted), plural


def test_ca_role() -> None:
    assert rules("ClusterRole", "tether-ca") == {
        ("authentication.k8s.io", "tokenreviews", "create"),
        ("", "pods", "get"),
        ("", "pods", "list"),
    }


def test_only_the_ca_reads_its_secret() -> None:
    secret_roles = [
        d
        for d in all_docs()
        if d["kind"] in ("Role", "ClusterRole")
        and any("secrets" in r["resources"] for r in d["rules"])
    ]
    assert [d["metadata"]["name"] for d in secret_roles] == ["tether-ca-root-key"]
    (role,) = secret_roles
    assert role["kind"] == "Role"
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["tether-ca-root"],
            "verbs": ["get"],
        }
    ]
    bindings = [
        d
        for d in all_docs()
        if d["kind"] in ("RoleBinding", "ClusterRoleBinding")
        and d["roleRef"]["name"] == "tether-ca-root-key"
    ]
    assert [s["name"] for b in bindings for s in b["subjects"]] == ["tether-ca"]
    # ... and only the CA pod mounts it.
    for d in all_docs():
        pod = (d.get("spec", {}).get("template") or {}).get("spec")
        if pod is None:
            continue
        uses = [
            v
            for v in pod.get("volumes", [])
            if v.get("secret", {}).get("secretName") == "tether-ca-root"
        ]
        assert bool(uses) == (d["metadata"]["name"] == "tether-ca"), d["metadata"]["name"]


def test_bindings_name_existing_accounts() -> None:
    sas = {
        (d["metadata"]["namespace"], d["metadata"]["name"])
        for d in all_docs()
        if d["kind"] == "ServiceAccount"
    }
    roles = {
        (d["kind"], d["metadata"]["name"])
        for d in all_docs()
        if d["kind"] in ("Role", "ClusterRole")
    }
    for b in (d for d in all_docs() if d["kind"] in ("RoleBinding", "ClusterRoleBinding")):
        assert (b["roleRef"]["kind"], b["roleRef"]["name"]) in roles
        for s in b["subjects"]:
            assert (s["namespace"], s["name"]) in sas
    pods = [agent_ds(), find("Deployment", "tether-ca")]
    for p in pods:
        sa = p["spec"]["template"]["spec"]["serviceAccountName"]
        assert ("tether-system", sa) in sas


# -- the agent DaemonSet -----------------------------------------------------------


def test_agent_host_paths_are_the_ones_the_code_needs() -> None:
    pod = agent_ds()["spec"]["template"]["spec"]
    host = {v["hostPath"]["path"]: v["name"] for v in pod["volumes"] if "hostPath" in v}
    assert set(host) == set(AGENT_HOST_PATHS)
    agent = container(pod, "agent")
    mounts = {m["name"]: m for m in agent["volumeMounts"]}
    for path, where in AGENT_HOST_PATHS.items():
        m = mounts[host[path]]
        assert m["mountPath"] == where, path
        assert m.get("readOnly", False) == (path in ("/lib/modules", "/usr/src")), path
    assert mounts[host["/sys/fs/bpf"]]["mountPropagation"] == "HostToContainer"


def test_settings_paths_land_on_host_mounts() -> None:
    pod = agent_ds()["spec"]["template"]["spec"]
    agent = container(pod, "agent")
    a = agent_settings()["agent"]
    _, vol = mount_of(pod, agent, a["pinDir"])
    assert vol["hostPath"]["path"] == "/sys/fs/bpf"
    m, vol = mount_of(pod, agent, a["stateDir"])
    assert vol["hostPath"]["path"] == a["stateDir"] == m["mountPath"]
    assert vol["hostPath"]["type"] == "DirectoryOrCreate"
    for cg in a["kubeletCgroups"]:
        _, vol = mount_of(pod, agent, cg)
        assert vol["hostPath"]["path"] == "/sys/fs/cgroup"


def test_settings_file_parses_and_points_at_the_ca() -> None:
    doc = agent_settings()
    lf = localfile.parse(doc)  # must not raise
    cfg = lf.settings
    assert cfg.agent.pin_dir == "/sys/fs/bpf/tether"
    assert cfg.agent.state_dir == "/var/run/tether"
    assert cfg.agent.kubelet_cgroups
    assert lf.snapshot.workloads == () and lf.snapshot.namespaces == {}  # mesh: from the API
    ident = cfg.identity
    assert ident.ca_dir is None and not ident.ca_plaintext
    svc = find("Service", "tether-ca")
    host, port = (ident.ca_address or "").rsplit(":", 1)
    assert host == f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
    assert int(port) == svc["spec"]["ports"][0]["port"] == 15012

    pod = agent_ds()["spec"]["template"]["spec"]
    agent = container(pod, "agent")
    m, vol = mount_of(pod, agent, ident.ca_root_file or "")
    assert vol["configMap"]["name"] == "tether-ca-root-cert"
    assert Path(ident.ca_root_file or "").name == "root-cert.pem"
    assert (ident.ca_root_file or "").startswith(m["mountPath"] + "/")

    m, vol = mount_of(pod, agent, ident.token_file or "")
    (src,) = vol["projected"]["sources"]
    tok = src["serviceAccountToken"]
    assert ident.token_file == f"{m['mountPath']}/{tok['path']}"
    from agent.sources.k8s_auth import TokenReviewAuthenticator

    assert tok["audience"] == "tether-ca"
    assert TokenReviewAuthenticator.__init__.__defaults__ is not None
    defaults = TokenReviewAuthenticator.__init__.__defaults__
    assert ("tether-ca",) in defaults, "the CA checks the audience the agent's token has"
    assert ("tether-system/tether-agent",) in defaults, "the CA knows the agent's account"


def test_agent_runs_tether_run_kube() -> None:
    pod = agent_ds()["spec"]["template"]["spec"]
    agent = container(pod, "agent")
    argv = agent["command"] + agent.get("args", [])
    assert argv[0] == "tether"
    a = cli.parser().parse_args(argv[1:])
    assert a.cmd == "run" and a.kube and a.node == "$(NODE_NAME)"
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    m, vol = mount_of(pod, agent, a.config)
    assert vol["configMap"]["name"] == "tether-agent-config"
    assert a.config == f"{m['mountPath']}/agent.yaml"


def test_agent_capabilities() -> None:
    pod = agent_ds()["spec"]["template"]["spec"]
    sc = container(pod, "agent")["securityContext"]
    assert sc["privileged"] is False
    caps = sc["capabilities"]
    assert caps["drop"] == ["ALL"]
    added = set(caps["add"])
    assert "ALL" not in added and not any(c.startswith("CAP_") for c in added)
    assert added == AGENT_CAPS
    # Kubernetes rejects allowPrivilegeEscalation=false with CAP_SYS_ADMIN.
    assert "allowPrivilegeEscalation" not in sc
    # The only privileged container is the bpffs mount step.
    privileged = [
        c["name"]
        for c in pod["initContainers"] + pod["containers"]
        if c.get("securityContext", {}).get("privileged")
    ]
    assert privileged == ["mount-bpffs"]


def test_agent_host_namespaces_and_dns() -> None:
    pod = agent_ds()["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True and pod["hostPID"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"  # resolves tether-ca.*.svc
    assert not pod.get("hostIPC")


def test_surge_rollout_can_schedule() -> None:
    ds = agent_ds()
    ru = ds["spec"]["updateStrategy"]["rollingUpdate"]
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    assert ru == {"maxSurge": 1, "maxUnavailable": 0}
    # hostNetwork turns containerPorts into hostPorts: the surge pod would
    # never schedule next to the old one.
    for c in ds["spec"]["template"]["spec"]["containers"]:
        assert not c.get("ports"), c["name"]


def test_probes_and_metrics() -> None:
    ds = agent_ds()
    tmpl = ds["spec"]["template"]
    agent = container(tmpl["spec"], "agent")
    for probe in ("readinessProbe", "startupProbe"):
        get = agent[probe]["httpGet"]
        assert (get["host"], get["port"], get["path"]) == ("127.0.0.1", 15021, "/healthz/ready")
    assert "livenessProbe" not in agent
    from agent.model import AgentSettings

    assert AgentSettings().ready_port == 15021
    ann = tmpl["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true"
    assert ann["prometheus.io/port"] == str(AgentSettings().metrics_port) == "15020"
    assert ann["prometheus.io/path"] == "/metrics"


def test_grace_period_covers_the_hbone_drain() -> None:
    pod = agent_ds()["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in container(pod, "agent")["env"]}
    drain = float(env["TETHER_DRAIN_TIMEOUT"])
    app = (ROOT / "agent" / "app.py").read_text()
    assert '"TETHER_DRAIN_TIMEOUT"' in app
    assert pod["terminationGracePeriodSeconds"] >= drain + 15


# -- the CA --------------------------------------------------------------------------


def test_ca_deployment_and_service() -> None:
    dep = find("Deployment", "tether-ca")
    assert dep["spec"]["replicas"] == 1
    pod = dep["spec"]["template"]["spec"]
    ca = container(pod, "ca")
    assert ca["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert ca["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert not pod.get("hostNetwork") and not pod.get("hostPID")
    assert not [v for v in pod["volumes"] if "hostPath" in v]
    svc = find("Service", "tether-ca")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    (port,) = ca["ports"]
    assert port["containerPort"] == 15012 and svc["spec"]["ports"][0]["targetPort"] == port["name"]
    argv = ca["command"]
    root_dir = next(x.split("=", 1)[1] for x in argv if x.startswith("--root-dir="))
    (m,) = [m for m in ca["volumeMounts"] if m["mountPath"] == root_dir]
    assert m["readOnly"] is True


def test_ca_command_parses() -> None:
    ca = container(find("Deployment", "tether-ca")["spec"]["template"]["spec"], "ca")
    assert ca["command"][0] == "tether"
    try:
        a = cli.parser().parse_args(ca["command"][1:])
    except SystemExit as e:  # argparse exits on unknown flags
        pytest.fail(f"tether ca rejects the manifest's arguments (exit {e.code})")
    assert a.cmd == "ca"


# -- uninstall ----------------------------------------------------------------------


def test_cleanup_daemonset() -> None:
    ds = find("DaemonSet", "tether-cleanup", DS_DIR / "cleanup.yaml")
    pod = ds["spec"]["template"]["spec"]
    init = container(pod, "cleanup", init=True)
    argv = init["command"]
    assert argv[0] == "tether"
    a = cli.parser().parse_args(argv[1:])
    assert a.cmd == "cleanup"
    settings = agent_settings()["agent"]
    assert a.pin_dir == settings["pinDir"]
    # the state dir, reached through the host's /var/run so it can be removed
    m, vol = mount_of(pod, init, a.state_dir)
    host_state = vol["hostPath"]["path"] + a.state_dir[len(m["mountPath"]) :]
    assert host_state == settings["stateDir"]
    _, vol = mount_of(pod, init, a.pin_dir)
    assert vol["hostPath"]["path"] == "/sys/fs/bpf"
    assert {v["hostPath"]["path"] for v in pod["volumes"]} == CLEANUP_HOST_PATHS
    caps = init["securityContext"]["capabilities"]
    assert caps["drop"] == ["ALL"] and "ALL" not in caps["add"]
    assert set(caps["add"]) <= AGENT_CAPS
    assert pod["hostPID"] is True
    assert [c["command"] for c in pod["containers"]] == [["sleep", "infinity"]]
