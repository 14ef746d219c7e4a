"""TLS contexts for mesh mTLS from an SVID, and the peer's SPIFFE ID after the handshake.

HBONE is TLS 1.3 only, ALPN ``h2`` both ways, client certificate required,
no session resumption (ztunnel). OpenSSL verifies the chain against the mesh
roots; the SPIFFE identity (URI SAN) is checked after the handshake, since
OpenSSL's hostname checks know nothing of SPIFFE.

Python's ``ssl`` loads a certificate and key only from files, so they are
written to a private temporary directory (0700, files 0600), the key
encrypted with a one-time password, and removed as soon as OpenSSL has read
them.
"""

from __future__ import annotations

import os
import secrets
import ssl
import tempfile
from collections.abc import Collection

from cryptography import x509

from agent.identity.spiffe import SpiffeId
from agent.identity.svid import ChainError, Svid, identity_of

ALPN_H2 = "h2"


class PeerIdentityError(ssl.SSLError):
    """The peer's certificate does not carry an acceptable SPIFFE identity."""


def _write_private(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _load_identity(ctx: ssl.SSLContext, svid: Svid, tmp_dir: str | None) -> None:
    password = secrets.token_urlsafe(32).encode("ascii")
    with tempfile.TemporaryDirectory(prefix="tether-svid-", dir=tmp_dir) as d:
        os.chmod(d, 0o700)
        cert_path = os.path.join(d, "chain.pem")
        key_path = os.path.join(d, "key.pem")
        _write_private(cert_path, svid.chain_pem())
        _write_private(key_path, svid.key_pem(password))
        ctx.load_cert_chain(cert_path, key_path, password=password)


def _common(ctx: ssl.SSLContext, svid: Svid, tmp_dir: str | None) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN_H2])
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET
    ctx.load_verify_locations(cadata=svid.roots_pem().decode("ascii"))
    _load_identity(ctx, svid, tmp_dir)


def server_context(svid: Svid, *, tmp_dir: str | None = None) -> ssl.SSLContext:
    """Server side of mesh mTLS: presents svid, requires a client certificate from the mesh."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _common(ctx, svid, tmp_dir)
    # No TLS 1.3 session tickets: ztunnel disables resumption.
    ctx.num_tickets = 0
    return ctx


def client_context(svid: Svid, *, tmp_dir: str | None = None) -> ssl.SSLContext:
    """Client side of mesh mTLS. No hostname check: call verify_peer after the handshake.

    Connect with ``server_hostname=""`` (asyncio) so that no SNI is sent.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    _common(ctx, svid, tmp_dir)
    return ctx


def peer_certificate(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> x509.Certificate:
    der = ssl_object.getpeercert(binary_form=True)
    if not der:
        raise PeerIdentityError("peer presented no certificate")
    return x509.load_der_x509_certificate(der)


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> SpiffeId:
    """The SPIFFE ID in the peer certificate's URI SAN (exactly one is required)."""
    try:
        return identity_of(peer_certificate(ssl_object))
    except ChainError as exc:
        raise PeerIdentityError(f"peer certificate: {exc}") from exc


def verify_peer(
    ssl_object: ssl.SSLObject | ssl.SSLSocket,
    *,
    trust_domain: str | None = None,
    expected: Collection[SpiffeId] | None = None,
) -> SpiffeId:
    """peer_identity, refused unless in trust_domain and (when given) one of expected."""
    ident = peer_identity(ssl_object)
    if trust_domain is not None and ident.trust_domain != trust_domain:
        raise PeerIdentityError(
            f"peer {ident} is in trust domain {ident.trust_domain!r}, expected {trust_domain!r}"
        )
    if expected is not None and ident not in expected:
        want = ", ".join(sorted(str(e) for e in expected)) or "(none)"
        raise PeerIdentityError(f"peer {ident} is not an expected identity: {want}")
    return ident
