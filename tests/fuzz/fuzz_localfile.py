"""Fuzz target: the local-file parser (agent.sources.localfile.parse and load).

The local file is the operator's: node, agent settings, namespaces, workloads,
services, identity, policies.  parse(doc) must return a well-formed
LocalFile or raise ConfigError naming the field; load(path) must do the same
for any file content (bytes that are not UTF-8, YAML that does not parse, ...).
Any other exception, or a LocalFile with a field of the wrong type, is a
finding.

Input is a structured random document or YAML text (parsed with libyaml here,
for speed; the localfile_load target feeds raw bytes to load() itself).  `policyFiles` are
read relative to a scratch directory holding a few files (a policy, bytes that
are not UTF-8, bad YAML, a directory); inputs naming a file outside it are
skipped, so the fuzzer never reads /dev/zero.

    python -m tests.fuzz.fuzz_localfile -runs=100000 tests/fuzz/corpus/localfile
"""

from __future__ import annotations

import ipaddress
import sys
import tempfile
from pathlib import Path
from typing import Any

import atheris
import yaml

with atheris.instrument_imports():
    # The one place the module under test is named.
    from agent.sources.localfile import ConfigError, LocalFile, parse

from tests.fuzz._common import FAST_LOADER, STRUCTURED, check, text, value

KEYS = (
    "node",
    "agent",
    "pinDir",
    "stateDir",
    "cgroup",
    "kubeletCgroups",
    "skMsg",
    "adminPort",
    "readyPort",
    "metricsPort",
    "podCgroupRoot",
    "namespaces",
    "workloads",
    "services",
    "identity",
    "policies",
    "policyFiles",
    "name",
    "namespace",
    "labels",
    "serviceAccount",
    "addresses",
    "netns",
    "excludeOutboundPorts",
    "excludeInboundPorts",
    "excludeOutboundCIDRs",
    "ports",
    "port",
    "targetPort",
    "selector",
    "trustDomain",
    "caDir",
    "certTTL",
    "caAddress",
    "caRootFile",
    "tokenFile",
    "caPlaintext",
    "istio.io/dataplane-mode",
)
STRINGS = (
    "n1",
    "ambient",
    "none",
    "10.0.0.1",
    "fd00::1",
    "10.0.0.0/8",
    "fd00::/64",
    "10.0.0.1/33",
    "80",
    "0",
    "65536",
    "policy.yaml",
    "binary.yaml",
    "bad.yaml",
    "deep.yaml",
    "dir",
    "missing.yaml",
    "127.0.0.1:15012",
)

SCRATCH = Path(tempfile.mkdtemp(prefix="tether-fuzz-localfile-"))
(SCRATCH / "policy.yaml").write_text(
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
    "metadata: {name: a, namespace: default}\nspec: {action: DENY, rules: [{}]}\n"
)
(SCRATCH / "binary.yaml").write_bytes(b"\xff\xfe\x00kind: \xc3\x28\n")
(SCRATCH / "bad.yaml").write_text("a: [\n")
(SCRATCH / "deep.yaml").write_text("[" * 600)
(SCRATCH / "dir").mkdir(exist_ok=True)


def _files_confined(doc: Any) -> bool:
    """False if the document names a policy file outside the scratch directory."""
    if not isinstance(doc, dict):
        return True
    files = doc.get("policyFiles")
    if not isinstance(files, list | tuple | str | dict):
        return True
    for f in files:
        p = Path(str(f))
        if p.is_absolute() or ".." in p.parts or str(f).startswith("~"):
            return False
    return True


def _opt_str(v: object) -> bool:
    return v is None or isinstance(v, str)


def _port_ok(p: object) -> bool:
    return type(p) is int and 0 < p < 65536


def check_config(lf: object) -> None:
    check(isinstance(lf, LocalFile), f"returned {type(lf)}")
    assert isinstance(lf, LocalFile)
    cfg, settings = lf.snapshot, lf.settings
    check(isinstance(settings.node, str) and settings.node, f"node {settings.node!r}")
    a = settings.agent
    check(isinstance(a.pin_dir, str) and isinstance(a.state_dir, str), "agent dirs")
    check(_opt_str(a.cgroup), f"agent.cgroup {a.cgroup!r} is not a string")
    check(_opt_str(a.pod_cgroup_root), f"agent.podCgroupRoot {a.pod_cgroup_root!r}")
    for name in ("admin_port", "ready_port", "metrics_port"):
        check(_port_ok(getattr(a, name)), f"agent.{name} {getattr(a, name)!r} is not a port")
    for ns, labels in cfg.namespaces.items():
        check(isinstance(ns, str), f"namespace name {ns!r}")
        check(all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()), "ns")
    for w in cfg.workloads:
        check(isinstance(w.name, str) and isinstance(w.namespace, str), f"workload {w.key}")
        for addr in w.addresses:
            ipaddress.ip_address(addr)
        for c in w.exclude_outbound_cidrs:
            ipaddress.ip_network(c, strict=False)
        check(all(_port_ok(p) for p in w.exclude_inbound_ports), "excludeInboundPorts")
        check(all(_port_ok(p) for p in w.exclude_outbound_ports), "excludeOutboundPorts")
        check(_opt_str(w.netns), f"workloads.netns {w.netns!r} is not a string")
        check(_opt_str(w.cgroup), f"workloads.cgroup {w.cgroup!r} is not a string")
    for s in cfg.services:
        for addr in s.addresses:
            ipaddress.ip_address(addr)
        check(all(_port_ok(p.port) and _port_ok(p.target_port) for p in s.ports), "ports")
    i = settings.identity
    for name in ("ca_dir", "ca_address", "ca_root_file", "token_file"):
        check(_opt_str(getattr(i, name)), f"identity.{name} {getattr(i, name)!r} not a string")
    # non-mappings are passed on on purpose: the policy loader fails closed on them
    check(all(p is not None for p in cfg.policies), "policies")


def TestOneInput(data: bytes) -> None:
    if data[:1] == STRUCTURED:
        fdp = atheris.FuzzedDataProvider(data[1:])
        doc: Any = value(fdp, KEYS, STRINGS, 2) if fdp.ConsumeProbability() < 0.2 else {}
        if isinstance(doc, dict):
            doc["node"] = text(fdp, ("n1",)) if fdp.ConsumeProbability() < 0.9 else None
            for _ in range(fdp.ConsumeIntInRange(0, 4)):
                doc[text(fdp, KEYS)] = value(fdp, KEYS, STRINGS, 1)
        if not _files_confined(doc):
            return
        try:
            cfg = parse(doc, SCRATCH)
        except ConfigError:
            return
        check_config(cfg)
        return
    try:
        doc = yaml.load(data.decode("utf-8", "replace"), Loader=FAST_LOADER)
    except Exception:
        return  # load() has to cope with that: the localfile_load target
    if not _files_confined(doc):
        return
    try:
        cfg = parse(doc, SCRATCH)
    except ConfigError:
        return
    check_config(cfg)


if __name__ == "__main__":
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()
