"""Mesh mTLS with contexts from the CertificateManager: real handshakes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
import threading
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest

from agent.identity.ca import CertificateAuthority
from agent.identity.embedded import EmbeddedCA
from agent.identity.manager import CertificateManager
from agent.identity.spiffe import SpiffeId
from agent.identity.svid import Svid, build_csr, generate_key, load_pem_certificates
from agent.identity.tls import (
    PeerIdentityError,
    client_context,
    peer_identity,
    server_context,
    verify_peer,
)

T = TypeVar("T")

WEB = SpiffeId("cluster.local", "shop", "web")
DB = SpiffeId("cluster.local", "shop", "db")


class Clock:
    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset


def run(fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await asyncio.wait_for(fn(), timeout=30)

    return asyncio.run(main())


class Echo:
    """A TLS server that records what the handshake established, then answers 'ok'."""

    def __init__(self) -> None:
        self.peers: list[tuple[SpiffeId, str | None, str | None]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        obj = writer.get_extra_info("ssl_object")
        self.peers.append((peer_identity(obj), obj.version(), obj.selected_alpn_protocol()))
        writer.write(b"ok")
        await writer.drain()
        writer.close()


async def exchange(
    server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, echo: Echo
) -> tuple[bytes, ssl.SSLObject]:
    server = await asyncio.start_server(echo.handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname=""
        )
        data = await reader.read(10)
        obj = writer.get_extra_info("ssl_object")
        writer.close()
        return data, obj
    finally:
        server.close()
        await server.wait_closed()


def refused(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> str:
    """A handshake the server must refuse; return the server's TLS error.

    Blocking sockets in a thread, since asyncio does not surface server-side
    handshake errors.
    """
    errors: list[BaseException] = []
    accepted: list[bool] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def serve() -> None:
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls_conn:
                    tls_conn.recv(1)
                    accepted.append(True)
            except (ssl.SSLError, OSError) as exc:
                errors.append(exc)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            try:
                with client_ctx.wrap_socket(raw) as tls_client:
                    tls_client.sendall(b"x")
                    tls_client.recv(1)
            except (ssl.SSLError, OSError):
                pass
        thread.join(timeout=10)
    assert accepted == [], "server accepted the client"
    assert len(errors) == 1
    return str(errors[0])


def test_mutual_tls_between_manager_contexts() -> None:
    async def main() -> None:
        mgr = CertificateManager(EmbeddedCA(CertificateAuthority.generate("cluster.local")))
        try:
            sctx = await mgr.ssl_context_server(WEB)
            cctx = await mgr.ssl_context_client(DB)
            assert sctx.minimum_version == ssl.TLSVersion.TLSv1_3
            assert sctx.verify_mode == ssl.CERT_REQUIRED
            echo = Echo()
            data, obj = await exchange(sctx, cctx, echo)
            assert data == b"ok"
            assert obj.version() == "TLSv1.3"
            assert obj.selected_alpn_protocol() == "h2"
            assert peer_identity(obj) == WEB
            assert verify_peer(obj, trust_domain="cluster.local", expected={WEB}) == WEB
            with pytest.raises(PeerIdentityError, match="not an expected identity"):
                verify_peer(obj, expected={DB})
            with pytest.raises(PeerIdentityError, match="trust domain"):
                verify_peer(obj, trust_domain="other.local")
            assert echo.peers == [(DB, "TLSv1.3", "h2")]
            # Contexts are cached per certificate.
            assert await mgr.ssl_context_server(WEB) is sctx
        finally:
            await mgr.close()

    run(main)


def test_server_requires_a_client_certificate() -> None:
    async def main() -> None:
        mgr = CertificateManager(EmbeddedCA(CertificateAuthority.generate("cluster.local")))
        try:
            sctx = await mgr.ssl_context_server(WEB)
            roots = (await mgr.get(WEB)).roots_pem().decode()
            bare = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            bare.check_hostname = False
            bare.load_verify_locations(cadata=roots)
            bare.set_alpn_protocols(["h2"])
            err = refused(sctx, bare)
            assert "peer did not return a certificate" in err
        finally:
            await mgr.close()

    run(main)


def test_certificate_from_another_trust_domain_is_rejected() -> None:
    async def main() -> None:
        mgr = CertificateManager(EmbeddedCA(CertificateAuthority.generate("cluster.local")))
        foreign_mgr = CertificateManager(EmbeddedCA(CertificateAuthority.generate("other.local")))
        try:
            intruder = SpiffeId("other.local", "shop", "db")
            # Foreign client against our server.
            # It trusts our root (so it would accept our server) but presents a foreign cert.
            foreign = dataclasses.replace(
                await foreign_mgr.get(intruder), roots=(await mgr.get(WEB)).roots
            )
            err = refused(await mgr.ssl_context_server(WEB), client_context(foreign))
            assert "certificate verify failed" in err
            # Our client against a foreign server: the client refuses during the handshake.
            with pytest.raises(ssl.SSLCertVerificationError):
                await exchange(
                    await foreign_mgr.ssl_context_server(intruder),
                    await mgr.ssl_context_client(DB),
                    Echo(),
                )
        finally:
            await mgr.close()
            await foreign_mgr.close()

    run(main)


def test_expired_certificate_is_rejected() -> None:
    async def main() -> None:
        clock = Clock()
        clock.offset = -timedelta(days=3)
        ca = CertificateAuthority.generate("cluster.local", clock=clock)
        key = generate_key()
        leaf = load_pem_certificates(ca.sign_csr(build_csr(DB, key), DB, timedelta(hours=1)))[0]
        expired = Svid(DB, key, (leaf,), ca.roots, clock())
        assert leaf.not_valid_after_utc < datetime.now(UTC)
        clock.offset = timedelta(0)
        mgr = CertificateManager(EmbeddedCA(ca))
        try:
            good_server = await mgr.ssl_context_server(WEB)
            # An expired client certificate: the server refuses it.
            err = refused(good_server, client_context(expired))
            assert "certificate has expired" in err
            # An expired server certificate: the client refuses it.
            with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
                await exchange(server_context(expired), await mgr.ssl_context_client(WEB), Echo())
        finally:
            await mgr.close()

    run(main)
