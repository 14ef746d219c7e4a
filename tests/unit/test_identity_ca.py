"""The CA: CSR checks, leaf certificate profile, TTL cap, roots from files, chain checks."""

from __future__ import annotations

import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.identity.ca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    CERT_CHAIN_FILE,
    ROOT_CERT_FILE,
    CertificateAuthority,
    CsrError,
    TrustDomainError,
)
from agent.identity.spiffe import SpiffeId
from agent.identity.svid import (
    ChainError,
    build_csr,
    generate_key,
    identity_of,
    load_pem_certificates,
    svid_from_response,
    to_pem,
    verify_chain,
)

ID = SpiffeId("cluster.local", "default", "web")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate("cluster.local")


def csr_with(
    sans: list[x509.GeneralName] | None,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
) -> str:
    key = key or generate_key()
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored")])
    )
    if sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def test_signs_csr_into_workload_leaf(ca: CertificateAuthority) -> None:
    before = datetime.now(UTC)
    chain = load_pem_certificates(ca.sign_csr(build_csr(ID, generate_key()), ID))
    leaf, root = chain
    assert root == ca.roots[0]
    assert identity_of(leaf) == ID
    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        ID.uri
    ]
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    pub = leaf.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and isinstance(pub.curve, ec.SECP256R1)
    assert isinstance(leaf.signature_hash_algorithm, hashes.SHA256)
    # Backdated one minute for clock skew; 24 h default lifetime from now.
    skew = before - leaf.not_valid_before_utc
    assert timedelta(seconds=58) <= skew <= timedelta(seconds=62)
    life = leaf.not_valid_after_utc - before
    assert timedelta(hours=24) - timedelta(seconds=5) <= life <= timedelta(hours=24, seconds=5)
    verify_chain([leaf], ca.roots, datetime.now(UTC))
    leaf.verify_directly_issued_by(root)


def test_serials_are_random(ca: CertificateAuthority) -> None:
    serials = {
        load_pem_certificates(ca.sign_csr(build_csr(ID, generate_key()), ID))[0].serial_number
        for _ in range(5)
    }
    assert len(serials) == 5 and all(s.bit_length() > 64 for s in serials)


def test_refuses_csr_for_another_identity(ca: CertificateAuthority) -> None:
    other = SpiffeId("cluster.local", "default", "db")
    with pytest.raises(CsrError, match=r"differ from the authorized identity") as info:
        ca.sign_csr(build_csr(other, generate_key()), ID)
    assert other.uri in str(info.value) and ID.uri in str(info.value)


def test_refuses_extra_uri_san(ca: CertificateAuthority) -> None:
    csr = csr_with(
        [
            x509.UniformResourceIdentifier(ID.uri),
            x509.UniformResourceIdentifier("spiffe://cluster.local/ns/kube-system/sa/admin"),
        ]
    )
    with pytest.raises(CsrError, match="differ from the authorized identity"):
        ca.sign_csr(csr, ID)


def test_refuses_non_uri_san(ca: CertificateAuthority) -> None:
    csr = csr_with([x509.UniformResourceIdentifier(ID.uri), x509.DNSName("evil.example")])
    with pytest.raises(CsrError, match=r"non-URI SANs.*evil\.example"):
        ca.sign_csr(csr, ID)


def test_refuses_csr_without_san(ca: CertificateAuthority) -> None:
    with pytest.raises(CsrError, match="no subjectAltName"):
        ca.sign_csr(csr_with(None), ID)


def test_refuses_garbage_and_bad_keys(ca: CertificateAuthority) -> None:
    with pytest.raises(CsrError, match="not a PEM certificate request"):
        ca.sign_csr("not a csr", ID)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(CsrError, match="ECDSA P-256"):
        ca.sign_csr(csr_with([x509.UniformResourceIdentifier(ID.uri)], rsa_key), ID)
    p384 = ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(CsrError, match="secp384r1"):
        ca.sign_csr(csr_with([x509.UniformResourceIdentifier(ID.uri)], p384), ID)


def test_refuses_other_trust_domain(ca: CertificateAuthority) -> None:
    foreign = SpiffeId("other.local", "default", "web")
    with pytest.raises(TrustDomainError, match=r"'other\.local'.*only for 'cluster\.local'"):
        ca.sign_csr(build_csr(foreign, generate_key()), foreign)


def test_ttl_is_capped_and_defaulted() -> None:
    ca = CertificateAuthority.generate("cluster.local", max_ttl=timedelta(hours=1))

    def life(ttl: timedelta | float | None) -> timedelta:
        leaf = load_pem_certificates(ca.sign_csr(build_csr(ID, generate_key()), ID, ttl))[0]
        return leaf.not_valid_after_utc - leaf.not_valid_before_utc - ca.clock_skew

    assert abs(life(timedelta(hours=48)) - timedelta(hours=1)) < timedelta(seconds=5)
    assert abs(life(600) - timedelta(minutes=10)) < timedelta(seconds=5)
    assert abs(life(None) - timedelta(hours=1)) < timedelta(seconds=5)  # default capped too
    assert abs(life(0) - timedelta(hours=1)) < timedelta(seconds=5)
    assert ca.effective_ttl(timedelta(days=7)) == timedelta(hours=1)


def test_default_max_ttl_is_24h(ca: CertificateAuthority) -> None:
    assert ca.effective_ttl(timedelta(days=30)) == timedelta(hours=24)


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_generate(tmp_path / "ca", "mesh.example")
    mode = stat.S_IMODE(os.stat(tmp_path / "ca" / CA_KEY_FILE).st_mode)
    assert mode == 0o600
    again = CertificateAuthority.load_or_generate(tmp_path / "ca", "mesh.example")
    assert again.roots == first.roots
    ident = SpiffeId("mesh.example", "a", "b")
    chain = again.sign_csr(build_csr(ident, generate_key()), ident)
    verify_chain(load_pem_certificates(chain[:1]), first.roots, datetime.now(UTC))


def _intermediate(root: CertificateAuthority, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    # Sign an intermediate with the root's key through its private fields: test only.
    root_key: ec.EllipticCurvePrivateKey = root._key
    now = datetime.now(UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "intermediate")]))
        .issuer_name(root.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(root_key, hashes.SHA256())
    )


def test_loads_intermediate_from_cacerts_layout(tmp_path: Path) -> None:
    root = CertificateAuthority.generate("cluster.local")
    key = generate_key()
    inter = _intermediate(root, key)
    (tmp_path / CA_KEY_FILE).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / CA_CERT_FILE).write_text(to_pem(inter))
    (tmp_path / CERT_CHAIN_FILE).write_text(to_pem(inter) + to_pem(root.certificate))
    (tmp_path / ROOT_CERT_FILE).write_text(to_pem(root.certificate))
    ca = CertificateAuthority.load(tmp_path)
    key2 = generate_key()
    pems = ca.sign_csr(build_csr(ID, key2), ID)
    assert [c.subject for c in load_pem_certificates(pems)[1:]] == [
        inter.subject,
        root.certificate.subject,
    ]
    svid = svid_from_response(ID, key2, pems, trust_roots=root.roots)
    assert svid.chain[1] == inter and svid.roots == root.roots


def test_load_without_root_needs_self_signed(tmp_path: Path) -> None:
    root = CertificateAuthority.generate("cluster.local")
    key = generate_key()
    (tmp_path / CA_KEY_FILE).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / CA_CERT_FILE).write_text(to_pem(_intermediate(root, key)))
    with pytest.raises(ValueError, match="not self-signed"):
        CertificateAuthority.load(tmp_path)


def test_response_checks(ca: CertificateAuthority) -> None:
    key = generate_key()
    pems = ca.sign_csr(build_csr(ID, key), ID)
    svid = svid_from_response(ID, key, pems)
    assert svid.identity == ID and svid.roots == ca.roots and len(svid.chain) == 1
    # Wrong identity requested.
    with pytest.raises(ChainError, match=r"issued a certificate for .*web, but .*db was requested"):
        svid_from_response(SpiffeId("cluster.local", "default", "db"), key, pems)
    # Leaf carries somebody else's key.
    with pytest.raises(ChainError, match="does not carry the key"):
        svid_from_response(ID, generate_key(), pems)
    # Pinned roots from another CA.
    other = CertificateAuthority.generate("cluster.local")
    with pytest.raises(ChainError, match="does not chain to a trusted root"):
        svid_from_response(ID, key, pems, trust_roots=other.roots)
    with pytest.raises(ChainError, match="empty certificate chain"):
        svid_from_response(ID, key, [])


def test_expired_leaf_fails_chain_check() -> None:
    past = datetime.now(UTC) - timedelta(days=3)
    old = CertificateAuthority.generate("cluster.local", clock=lambda: past)
    key = generate_key()
    pems = old.sign_csr(build_csr(ID, key), ID)
    with pytest.raises(ChainError, match="expired at"):
        svid_from_response(ID, key, pems)
