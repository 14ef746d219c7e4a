"""Which certificate source a node agent uses, from its settings: the
embedded CA (local mode, caDir shared by the nodes) or a remote
IstioCertificateService (`tether ca` or istiod) asked with this node's token
and ImpersonatedIdentity."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

from agent import workerproc
from agent.identity.embedded import ISSUER, IssueError, WorkerCA
from agent.identity.manager import CertificateManager, CertificateSource
from agent.model import IdentitySettings

log = logging.getLogger(__name__)

DEFAULT_CERT_TTL = timedelta(hours=24)


def certificate_manager(ident: IdentitySettings) -> CertificateManager | None:
    """None when no identity source is configured (mesh traffic then goes
    in plaintext, and the agent says so)."""
    ttl = timedelta(seconds=ident.cert_ttl) if ident.cert_ttl else None
    source: CertificateSource
    if ident.ca_address:
        # grpc only when a remote CA is used: it costs ~18 MiB resident
        import grpc

        from agent.identity.client import CaClient, token_file

        roots = Path(ident.ca_root_file).read_text() if ident.ca_root_file else ""
        creds = (
            None
            if ident.ca_plaintext
            else grpc.ssl_channel_credentials(roots.encode() if roots else None)
        )
        if roots:  # a bad root file stops the agent here, with the reason
            reply = workerproc.run_once(ISSUER, {"op": "roots", "trust_roots": [roots]})
            if not reply.get("ok"):
                raise IssueError(f"identity.caRootFile {ident.ca_root_file}: {reply.get('error')}")
        source = CaClient(
            ident.ca_address,
            token=token_file(ident.token_file) if ident.token_file else None,
            trust_roots=[roots] if roots else (),
            channel_credentials=creds,
            ttl=ttl or DEFAULT_CERT_TTL,
            worker=workerproc.Worker(ISSUER),  # key, CSR and checks: no cryptography here
        )
    elif ident.ca_dir:
        local = WorkerCA(ident.ca_dir, ident.trust_domain, ttl)
        local.check()  # a broken caDir stops the agent here, with the reason
        source = local
    else:
        log.warning("no identity.caDir or caAddress: mesh traffic is passed through in plaintext")
        return None
    return CertificateManager(source)
