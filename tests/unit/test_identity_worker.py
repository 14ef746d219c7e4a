"""The local CA in a worker process (identity/embedded.WorkerCA, identity/
issuer.py): the agent holds what it gets back as PEM (identity/pem.py), and
the checks that the certificate is the one asked for ran in the worker with
the same code as every other source.  Checked here with cryptography,
independently; the TLS runs on 127.0.0.1 with contexts loaded from memory
files and the peer's identity read without cryptography."""

from __future__ import annotations

import asyncio
import datetime as dt
import re
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.identity.ca import CA_KEY_FILE, CertificateAuthority
from agent.identity.embedded import EmbeddedCA, IssueError, WorkerCA
from agent.identity.manager import CertificateManager
from agent.identity.pem import PemSvid
from agent.identity.spiffe import SpiffeId
from agent.identity.svid import identity_of, load_pem_certificates, verify_chain
from agent.identity.tls import PeerIdentityError, peer_identity, server_context

WEB = SpiffeId("cluster.local", "shop", "web")
DB = SpiffeId("cluster.local", "shop", "db")
TD = "cluster.local"


def test_worker_ca_issues_a_checked_svid_held_as_pem(tmp_path: Path) -> None:
    ca_dir = str(tmp_path / "ca")
    local = WorkerCA(ca_dir, TD, dt.timedelta(hours=1))
    local.check()  # generates the CA, as the agent's start does

    async def main() -> tuple[PemSvid, PemSvid, int]:
        try:
            web = await local.fetch(WEB)
            db = await local.fetch(DB)
            return web, db, local.worker.started
        finally:
            await local.aclose()

    web, db, started = asyncio.run(main())
    assert started == 1  # one worker answered both
    assert isinstance(web, PemSvid) and web.identity == WEB and db.identity == DB
    chain = load_pem_certificates([web.chain_pem()])
    roots = load_pem_certificates([web.roots_pem()])
    assert roots == list(CertificateAuthority.load(ca_dir, TD).roots)
    leaf = chain[0]
    assert identity_of(leaf) == WEB
    assert (web.serial, web.not_before, web.not_after) == (
        leaf.serial_number,
        leaf.not_valid_before_utc,
        leaf.not_valid_after_utc,
    )
    assert dt.timedelta(minutes=59) < web.not_after - web.received_at <= dt.timedelta(hours=1)
    verify_chain(chain, roots, dt.datetime.now(dt.UTC))
    key = serialization.load_pem_private_key(web.key_pem(), None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    assert key.public_key().public_bytes(der, spki) == leaf.public_key().public_bytes(der, spki)
    assert b"PRIVATE KEY" in web.key_pem() and "PRIVATE KEY" not in repr(web)
    assert PemSvid.from_json(web.to_json()) == web


def test_a_broken_ca_dir_stops_the_agent_with_the_reason(tmp_path: Path) -> None:
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    (ca_dir / CA_KEY_FILE).write_text("not a key\n")
    with pytest.raises(IssueError, match=re.escape(f"local CA in {ca_dir}: ")):
        WorkerCA(str(ca_dir), TD).check()

    async def main() -> None:
        local = WorkerCA(str(ca_dir), TD)
        try:
            with pytest.raises(IssueError, match=re.escape(f"local CA in {ca_dir}, {WEB}: ")):
                await local.fetch(WEB)
            assert local.worker.running  # a request's failure, not the worker's
        finally:
            await local.aclose()

    asyncio.run(main())


async def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> list[object]:
    """What the server side's peer_identity says of the client: a SpiffeId or the error."""
    seen: list[object] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            seen.append(peer_identity(writer.get_extra_info("ssl_object")))
        except PeerIdentityError as e:
            seen.append(e)
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_ctx, server_hostname=""
        )
        assert await reader.read(10) == b"ok"
        seen.append(peer_identity(writer.get_extra_info("ssl_object")))
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
    return seen


def test_mutual_tls_with_worker_issued_certificates(tmp_path: Path) -> None:
    local = WorkerCA(str(tmp_path / "ca"), TD)
    local.check()

    async def main() -> list[object]:
        mgr = CertificateManager(local)
        try:
            server = await mgr.ssl_context_server(WEB)
            client = await mgr.ssl_context_client(DB)
            return await _handshake(server, client)
        finally:
            await mgr.close()

    assert asyncio.run(main()) == [DB, WEB]  # each side read the other's identity


def _self_signed(tmp_path: Path, uris: list[str]) -> tuple[Path, Path, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "intruder")])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
    )
    if uris:
        sans = [x509.UniformResourceIdentifier(u) for u in uris]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = tmp_path / "c.pem", tmp_path / "k.pem"
    cert_path.write_bytes(pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path, pem


@pytest.mark.parametrize(
    ("uris", "why"),
    [
        ([], "has 0 URI SANs"),
        (["spiffe://cluster.local/ns/shop/sa/web", "spiffe://cluster.local/ns/x/sa/y"], "has 2"),
        (["https://cluster.local/ns/shop/sa/web"], "not a SPIFFE ID"),
    ],
)
def test_a_verified_certificate_without_exactly_one_spiffe_id_is_refused(
    tmp_path: Path, uris: list[str], why: str
) -> None:
    """The server trusts the client's self-signed certificate (OpenSSL
    verifies it), so only the identity check stands between it and the mesh."""
    ca = CertificateAuthority.generate(TD)
    web = asyncio.run(EmbeddedCA(ca).fetch(WEB))
    cert_path, key_path, pem = _self_signed(tmp_path, uris)
    server = server_context(web.pem())
    server.load_verify_locations(cadata=pem.decode())
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.load_verify_locations(cadata=web.roots_pem().decode())
    client.load_cert_chain(cert_path, key_path)
    client.set_alpn_protocols(["h2"])
    seen = asyncio.run(_handshake(server, client))
    assert isinstance(seen[0], PeerIdentityError) and why in str(seen[0])
    assert seen[1] == WEB
