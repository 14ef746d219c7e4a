"""The waypoint's certificate and trust root as SDS Secrets (served over the same ADS stream).

Names follow Istio's, so translated listeners and clusters read like istiod's:
``default`` is the workload certificate, ``ROOTCA`` the trust bundle.
"""

from __future__ import annotations

from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2

from agent.identity.pem import SvidLike

CERT_SECRET = "default"
ROOT_SECRET = "ROOTCA"


def tls_certificate_secret(svid: SvidLike, name: str = CERT_SECRET) -> secret_pb2.Secret:
    """The SVID's chain (leaf first) and private key; a renewal is a new version of it."""
    return secret_pb2.Secret(
        name=name,
        tls_certificate=common_pb2.TlsCertificate(
            certificate_chain=base_pb2.DataSource(inline_bytes=svid.chain_pem()),
            private_key=base_pb2.DataSource(inline_bytes=svid.key_pem()),
        ),
    )


def validation_context_secret(roots_pem: bytes, name: str = ROOT_SECRET) -> secret_pb2.Secret:
    """The mesh trust roots Envoy verifies peers against."""
    return secret_pb2.Secret(
        name=name,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_bytes=roots_pem)
        ),
    )


def svid_secrets(svid: SvidLike) -> list[secret_pb2.Secret]:
    """Both secrets of a waypoint, ready for ``SnapshotCache.set_snapshot``."""
    return [tls_certificate_secret(svid), validation_context_secret(svid.roots_pem())]
