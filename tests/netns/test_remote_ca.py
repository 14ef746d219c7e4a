"""netns tier: node agents get their certificates from `tether ca` over gRPC
(istio.v1.auth.IstioCertificateService/CreateCertificate) with their node
token and ImpersonatedIdentity, instead of an embedded CA."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from agent.sim.harness import PY, AgentNode, cluster_nodes

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="netns tier needs root")


def test_agents_use_the_remote_ca_and_it_refuses_foreign_identities() -> None:
    with cluster_nodes("n1", "n2") as (cluster, (n1, n2)):
        a = n1.add_pod("a", "shop", "sa-a")
        b = n2.add_pod("b", "shop", "sa-b")
        n1.enroll_namespace("shop")
        n2.serve(b)
        ca_dir = Path(cluster.ca_dir)
        auth = ca_dir / "auth.yaml"
        td = "spiffe://cluster.local/ns/shop/sa/"
        # n2's token may only get identities of pods on n2 (not sa-a)
        auth.write_text(
            yaml.safe_dump(
                {
                    "tokens": {"token-n1": "n1", "token-n2": "n2"},
                    "nodes": {"n1": [td + "sa-a"], "n2": [td + "sa-b"]},
                }
            )
        )
        for n, tok in ((n1, "token-n1"), (n2, "token-n2")):
            (n.dir / "token").write_text(tok)
        ca = n1.tb.spawn(
            n1.node.agent,
            [
                PY,
                "-m",
                "agent.cli",
                "ca",
                "--bind",
                "0.0.0.0:15012",
                "--root-dir",
                str(ca_dir / "root"),
                "--auth-file",
                str(auth),
                "--insecure",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while not (ca_dir / "root" / "ca-cert.pem").exists():
            assert time.monotonic() < deadline and ca.poll() is None, ca.stderr
            time.sleep(0.2)
        cluster.mtls = False  # the nodes' files say caAddress instead of caDir
        for n in (n1, n2):
            orig = n.config

            def with_remote(n: AgentNode = n, orig=orig) -> dict:  # type: ignore[no-untyped-def,type-arg]
                cfg = orig()
                cfg["identity"] = {
                    "caAddress": f"{n1.node.fabric_ip4}:15012",
                    "caRootFile": str(ca_dir / "root" / "ca-cert.pem"),
                    "tokenFile": str(n.dir / "token"),
                    # TLS to the CA is covered by tests/unit/
                    # test_identity_grpc.py (run_ca over TLS)
                    "caPlaintext": True,
                }
                return cfg

            n.config = with_remote  # type: ignore[method-assign]
        n1.start_agent()
        n2.start_agent()
        r = n1.connect(a, b)
        assert r["ok"], (r, n1.log_tail(), n2.log_tail())
        certs = {c["identity"]: c for c in n1.status()["certificates"]}
        assert certs[td + "sa-a"]["state"] == "valid"
        # the CA refuses n2 an identity that does not run on n2
        client = (
            "import asyncio\n"
            "from agent.identity.client import CaClient\n"
            "from agent.identity.spiffe import SpiffeId\n"
            f"c = CaClient('{n1.node.fabric_ip4}:15012', token='token-n2')\n"
            "try:\n"
            "    asyncio.run(c.fetch(SpiffeId.parse('" + td + "sa-a')))\n"
            "    print('ISSUED')\n"
            "except Exception as e:\n"
            "    print('REFUSED', e)\n"
        )
        # from inside node n2's netns: the CA's address exists only in the testbed
        proc = n2.tb.spawn(
            n2.node.agent,
            [PY, "-c", client],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=Path(__file__).resolve().parents[2],
        )
        out, err = proc.communicate(timeout=60)
        assert b"REFUSED" in out and b"does not run on node 'n2'" in out, (out, err)
