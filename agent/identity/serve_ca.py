"""``tether ca``: the mesh CA as a standalone gRPC service.

The root key lives in root_dir (a Secret mounted only into the CA in
Kubernetes), in the file layout of Istio's ``cacerts`` Secret; without
root_dir the root is generated in memory and dies with the process, which
suits tests and demos only. The CA serves TLS with a certificate it issues to
itself, so clients verify it with the same mesh root they already hold.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization

from agent.identity.ca import MAX_TTL, CertificateAuthority
from agent.identity.server import Authenticator, CaServer, StaticAuthenticator
from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN
from agent.identity.svid import generate_key

log = logging.getLogger(__name__)

DEFAULT_SERVER_NAMES = ("localhost", "127.0.0.1", "::1")


def load_ca(
    root_dir: str | Path | None,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    *,
    max_ttl: timedelta = MAX_TTL,
) -> CertificateAuthority:
    """The CA from root_dir (created there on first start), or an ephemeral one."""
    if root_dir is None:
        log.warning("no CA root directory: using an in-memory root that is lost on exit")
        return CertificateAuthority.generate(trust_domain, max_ttl=max_ttl, default_ttl=max_ttl)
    return CertificateAuthority.load_or_generate(
        root_dir, trust_domain, max_ttl=max_ttl, default_ttl=max_ttl
    )


def server_credentials(
    ca: CertificateAuthority, server_names: Sequence[str] = DEFAULT_SERVER_NAMES
) -> grpc.ServerCredentials:
    """TLS credentials for the CA's gRPC port, issued by the CA itself."""
    key = generate_key()
    chain = ca.issue_server_certificate(key.public_key(), server_names)
    # The served chain is leaf + intermediates; the root is what clients hold.
    n_roots = len(ca.roots)
    chain_pem = "".join(chain[: len(chain) - n_roots]).encode("ascii")
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return grpc.ssl_server_credentials([(key_pem, chain_pem)])


async def run_ca(
    bind: str,
    root_dir: str | None,
    *,
    trust_domain: str = DEFAULT_TRUST_DOMAIN,
    authenticator: Authenticator | None = None,
    auth_file: str | None = None,
    tls: bool = True,
    server_names: Sequence[str] = DEFAULT_SERVER_NAMES,
    max_ttl: timedelta = MAX_TTL,
    ready: Callable[[CaServer, CertificateAuthority], None] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve IstioCertificateService on bind until stop is set or the task is cancelled.

    Exactly one of authenticator (e.g. the Kubernetes TokenReview one) or
    auth_file (StaticAuthenticator.from_file) says who may get what. ready is
    called once listening, with the server (its .port) and the CA (its roots).
    """
    if authenticator is None:
        if auth_file is None:
            raise ValueError("tether ca needs an authenticator or an auth file")
        authenticator = StaticAuthenticator.from_file(auth_file, trust_domain)
    elif auth_file is not None:
        raise ValueError("give either an authenticator or an auth file, not both")
    ca = load_ca(root_dir, trust_domain, max_ttl=max_ttl)
    creds = server_credentials(ca, server_names) if tls else None
    server = CaServer(ca, authenticator, server_credentials=creds)
    await server.start(bind)
    try:
        if ready is not None:
            ready(server, ca)
        if stop is None:
            await server.wait()
        else:
            await stop.wait()
    finally:
        await server.stop(grace=1.0)
