"""TLS contexts for mesh mTLS from an SVID, and the peer's SPIFFE ID after the handshake.

HBONE is TLS 1.3 only, ALPN ``h2`` both ways, client certificate required,
no session resumption (ztunnel). OpenSSL verifies the chain against the mesh
roots; the SPIFFE identity (URI SAN) is checked after the handshake, since
OpenSSL's hostname checks know nothing of SPIFFE.

Python's ``ssl`` loads a certificate and key only from files: they are
written to anonymous memory files (memfd, close-on-exec) that OpenSSL reads
through /proc/self/fd and that are gone once closed, so the key is never on
a filesystem.  No cryptography here (see agent/identity/pem.py): the peer's
URI SAN comes from OpenSSL's own decoding of the certificate it verified.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Collection
from typing import Any

from agent.identity.pem import SvidLike
from agent.identity.spiffe import SpiffeId, SpiffeIdError

ALPN_H2 = "h2"


class PeerIdentityError(ssl.SSLError):
    """The peer's certificate does not carry an acceptable SPIFFE identity."""


def _memfile(name: str, data: bytes) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    return fd


def _load_identity(ctx: ssl.SSLContext, svid: SvidLike) -> None:
    cert = _memfile("tether-svid-chain", svid.chain_pem())
    try:
        key = _memfile("tether-svid-key", svid.key_pem())
        try:
            ctx.load_cert_chain(f"/proc/self/fd/{cert}", f"/proc/self/fd/{key}")
        finally:
            os.close(key)
    finally:
        os.close(cert)


def _common(ctx: ssl.SSLContext, svid: SvidLike) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN_H2])
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_TICKET
    ctx.load_verify_locations(cadata=svid.roots_pem().decode("ascii"))
    _load_identity(ctx, svid)


def server_context(svid: SvidLike) -> ssl.SSLContext:
    """Server side of mesh mTLS: presents svid, requires a client certificate from the mesh."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _common(ctx, svid)
    # No TLS 1.3 session tickets: ztunnel disables resumption.
    ctx.num_tickets = 0
    return ctx


def client_context(svid: SvidLike) -> ssl.SSLContext:
    """Client side of mesh mTLS. No hostname check: call verify_peer after the handshake.

    Connect with ``server_hostname=""`` (asyncio) so that no SNI is sent.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    _common(ctx, svid)
    return ctx


def peer_uri_sans(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> tuple[str, list[str]]:
    """The verified peer certificate's serial (hex) and URI SANs, as OpenSSL
    decoded them.  `getpeercert()` is empty unless the chain was verified
    (every mesh context requires it), so an empty answer is refused."""
    try:
        cert = ssl_object.getpeercert()
    except ValueError as exc:  # a name OpenSSL decodes but Python cannot (UnicodeDecodeError)
        raise PeerIdentityError(f"peer certificate unreadable: {exc}") from exc
    if not cert:
        raise PeerIdentityError("peer presented no certificate")
    sans: Any = cert.get("subjectAltName", ())
    uris = [str(e[1]) for e in sans if isinstance(e, tuple) and len(e) == 2 and e[0] == "URI"]
    return str(cert.get("serialNumber", "?")).lower(), uris


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> SpiffeId:
    """The SPIFFE ID in the peer certificate's URI SAN (exactly one is required)."""
    serial, uris = peer_uri_sans(ssl_object)
    if len(uris) != 1:
        raise PeerIdentityError(
            f"peer certificate: certificate serial {serial} has {len(uris)} URI SANs "
            f"{uris}, a workload certificate has exactly one"
        )
    try:
        return SpiffeId.parse(uris[0])
    except SpiffeIdError as exc:
        raise PeerIdentityError(
            f"peer certificate: certificate URI SAN is not a SPIFFE ID: {exc}"
        ) from exc


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
