"""The local CA's worker process (agent/workerproc.py): key generation, CSR,
signing and the response checks, with cryptography, for embedded.WorkerCA.

Requests, for embedded.WorkerCA (the local CA): {"op": "load" | "issue",
"ca_dir", "trust_domain"} and, to issue, "identity" (a SPIFFE URI) and
"ttl_s" (seconds or null: the CA's default).  The CA is loaded (or
generated) once per worker and kept while it lives.

For client.CaClient (a remote CA): {"op": "csr", "identity"} answers a
fresh key and its CSR; {"op": "check", "identity", "key", "cert_chain",
"root_certs", "trust_roots"} the SVID the CA's answer makes, after
svid_from_response's checks (a refusal has "kind": "chain"); {"op":
"roots", "trust_roots"} whether the PEMs parse.

An answer that carries an SVID has it as pem.PemSvid.to_json.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent import workerproc
from agent.identity.ca import CertificateAuthority
from agent.identity.spiffe import SpiffeId
from agent.identity.svid import (
    ChainError,
    build_csr,
    generate_key,
    load_pem_certificates,
    svid_from_response,
    utcnow,
)

_cas: dict[tuple[str, str], CertificateAuthority] = {}


def _ca(req: dict[str, Any]) -> CertificateAuthority:
    ca_dir, td = req.get("ca_dir"), req.get("trust_domain")
    if not isinstance(ca_dir, str) or not isinstance(td, str):
        raise ValueError("bad request: ca_dir and trust_domain are strings")
    ca = _cas.get((ca_dir, td))
    if ca is None:
        ca = _cas[(ca_dir, td)] = CertificateAuthority.load_or_generate(ca_dir, td)
    return ca


def _strings(req: dict[str, Any], name: str) -> list[str]:
    v = req.get(name)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ValueError(f"bad request: {name} is a list of strings")
    return v


def _remote(op: str, req: dict[str, Any]) -> dict[str, Any]:
    if op == "roots":
        load_pem_certificates(_strings(req, "trust_roots"))
        return {"ok": True}
    identity = SpiffeId.parse(str(req.get("identity")))
    if op == "csr":
        key = generate_key()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return {"ok": True, "key": pem.decode("ascii"), "csr": build_csr(identity, key)}
    loaded = serialization.load_pem_private_key(str(req.get("key")).encode("ascii"), None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise ValueError("bad request: key is not an EC private key")
    try:
        svid = svid_from_response(
            identity,
            loaded,
            _strings(req, "cert_chain"),
            _strings(req, "root_certs"),
            trust_roots=load_pem_certificates(_strings(req, "trust_roots")),
            now=utcnow(),
        )
    except ChainError as e:
        return {"ok": False, "kind": "chain", "error": str(e)}
    return {"ok": True, "svid": svid.pem().to_json()}


def handle(req: dict[str, Any]) -> dict[str, Any]:
    op = req.get("op")
    if op in ("csr", "check", "roots"):
        return _remote(str(op), req)
    if op == "load":
        _ca(req)
        return {"ok": True}
    if op != "issue":
        return {"ok": False, "error": f"unknown op {op!r}"}
    ca = _ca(req)
    identity = SpiffeId.parse(str(req.get("identity")))
    ttl_s = req.get("ttl_s")
    ttl = timedelta(seconds=float(ttl_s)) if ttl_s is not None else None
    key = generate_key()
    chain = ca.sign_csr(build_csr(identity, key), identity, ttl)
    svid = svid_from_response(identity, key, chain, trust_roots=ca.roots)
    return {"ok": True, "svid": svid.pem().to_json()}


if __name__ == "__main__":
    if sys.argv[1:] != ["serve"]:
        sys.exit("usage: python -m agent.identity.issuer serve (requests on stdin)")
    sys.exit(workerproc.serve(handle))
