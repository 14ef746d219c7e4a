"""The local CA's worker process (agent/workerproc.py): key generation, CSR,
signing and the response checks, with cryptography, for embedded.WorkerCA.

Requests: {"op": "load" | "issue", "ca_dir", "trust_domain"} and, to
issue, "identity" (a SPIFFE URI) and "ttl_s" (seconds or null: the CA's
default).  An answer to "issue" carries the SVID as pem.PemSvid.to_json.
The CA is loaded (or generated) once per worker and kept while it lives.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from typing import Any

from agent import workerproc
from agent.identity.ca import CertificateAuthority
from agent.identity.spiffe import SpiffeId
from agent.identity.svid import build_csr, generate_key, svid_from_response

_cas: dict[tuple[str, str], CertificateAuthority] = {}


def _ca(req: dict[str, Any]) -> CertificateAuthority:
    ca_dir, td = req.get("ca_dir"), req.get("trust_domain")
    if not isinstance(ca_dir, str) or not isinstance(td, str):
        raise ValueError("bad request: ca_dir and trust_domain are strings")
    ca = _cas.get((ca_dir, td))
    if ca is None:
        ca = _cas[(ca_dir, td)] = CertificateAuthority.load_or_generate(ca_dir, td)
    return ca


def handle(req: dict[str, Any]) -> dict[str, Any]:
    op = req.get("op")
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
