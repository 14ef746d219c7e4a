"""X.509 SVIDs: the key, chain and roots one identity presents, and the checks on them.

Shared by the CA client and the embedded CA so that a certificate from istiod,
from ``tether ca`` and from the in-process CA pass through the same checks
before anything uses them: the leaf names exactly the identity that was asked
for, carries the key that was generated for it, chains to a trusted root and
is inside its validity window.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity.pem import PemSvid, refresh_time, utcnow
from agent.identity.spiffe import SpiffeId, SpiffeIdError

__all__ = ["ChainError", "PemSvid", "Svid", "utcnow"]


class ChainError(ValueError):
    """A certificate chain fails a check; the message names the certificate and the check."""


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A fresh ECDSA P-256 key, the only key type tether issues (as Istio's default)."""
    return ec.generate_private_key(ec.SECP256R1())


def build_csr(identity: SpiffeId, key: ec.EllipticCurvePrivateKey) -> str:
    """A PKCS#10 request the way ztunnel builds one: empty subject, one critical URI SAN."""
    san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)])
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(san, critical=True)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def load_pem_certificates(pems: Iterable[str | bytes]) -> list[x509.Certificate]:
    """Parse PEM entries, each of which may hold several certificates (Istio concatenates roots)."""
    out: list[x509.Certificate] = []
    for pem in pems:
        data = pem.encode("ascii") if isinstance(pem, str) else pem
        if not data.strip():
            continue
        try:
            out.extend(x509.load_pem_x509_certificates(data))
        except ValueError as exc:
            raise ChainError(f"unparseable PEM certificate: {exc}") from exc
    return out


def to_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def identity_of(cert: x509.Certificate) -> SpiffeId:
    """The one SPIFFE ID a workload certificate names; anything else is an error."""
    uris = uri_sans(cert)
    if len(uris) != 1:
        raise ChainError(
            f"certificate serial {cert.serial_number:x} has {len(uris)} URI SANs {uris}, "
            "a workload certificate has exactly one"
        )
    try:
        return SpiffeId.parse(uris[0])
    except SpiffeIdError as exc:
        raise ChainError(f"certificate URI SAN is not a SPIFFE ID: {exc}") from exc


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False
    return bool(bc.ca)


def _describe(cert: x509.Certificate) -> str:
    subject = cert.subject.rfc4514_string()
    uris = uri_sans(cert)
    name = subject or (uris[0] if uris else "")
    return f"{name!r} (serial {cert.serial_number:x})"


def _check_time(cert: x509.Certificate, now: datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise ChainError(
            f"certificate {_describe(cert)} is not valid before {cert.not_valid_before_utc:%FT%TZ}"
        )
    if now >= cert.not_valid_after_utc:
        raise ChainError(
            f"certificate {_describe(cert)} expired at {cert.not_valid_after_utc:%FT%TZ}"
        )


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (InvalidSignature, ValueError, TypeError):
        return False
    return True


def verify_chain(
    chain: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    now: datetime,
    *,
    leaf_is_ca: bool = False,
) -> x509.Certificate:
    """Check that chain[0] leads through chain[1:] to one of roots; return that root.

    Each link is checked by signature, validity window and the issuer being a
    CA. The chain may or may not repeat the root at its end.
    """
    if not chain:
        raise ChainError("empty certificate chain")
    if not roots:
        raise ChainError("no trusted roots to verify against")
    leaf = chain[0]
    if _is_ca(leaf) and not leaf_is_ca:
        raise ChainError(f"leaf certificate {_describe(leaf)} is a CA certificate")
    current = leaf
    rest = list(chain[1:])
    for _ in range(len(chain) + 1):
        _check_time(current, now)
        if current in roots:
            return current
        for root in roots:
            if _issued_by(current, root):
                _check_time(root, now)
                return root
        if not rest:
            raise ChainError(
                f"certificate {_describe(current)} issued by {current.issuer.rfc4514_string()!r} "
                "does not chain to a trusted root"
            )
        issuer = rest.pop(0)
        if not _is_ca(issuer):
            raise ChainError(f"chain certificate {_describe(issuer)} is not a CA")
        if not _issued_by(current, issuer):
            raise ChainError(
                f"certificate {_describe(current)} is not signed by the next chain "
                f"certificate {_describe(issuer)}"
            )
        current = issuer
    raise ChainError("certificate chain loops")


def _public_der(key: ec.EllipticCurvePublicKey | object) -> bytes:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return b""
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass(frozen=True)
class Svid:
    """A checked X.509 SVID: private key, chain (leaf first, no root) and the trusted roots."""

    identity: SpiffeId
    key: ec.EllipticCurvePrivateKey
    chain: tuple[x509.Certificate, ...]
    roots: tuple[x509.Certificate, ...]
    received_at: datetime

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_before(self) -> datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    @property
    def serial(self) -> int:
        return self.leaf.serial_number

    def refresh_at(self, ratio: float = 0.5) -> datetime:
        return refresh_time(self.received_at, self.not_before, self.not_after, ratio)

    def is_valid(self, now: datetime) -> bool:
        return self.not_before <= now < self.not_after

    def chain_pem(self) -> bytes:
        """Leaf and intermediates, what a TLS peer is sent."""
        return "".join(to_pem(c) for c in self.chain).encode("ascii")

    def roots_pem(self) -> bytes:
        return "".join(to_pem(c) for c in self.roots).encode("ascii")

    def key_pem(self, password: bytes | None = None) -> bytes:
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password)
            if password
            else serialization.NoEncryption()
        )
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc
        )

    def pem(self) -> PemSvid:
        """The same SVID as the agent process holds it (agent/identity/pem.py)."""
        return PemSvid(
            identity=self.identity,
            chain=self.chain_pem(),
            roots=self.roots_pem(),
            key=self.key_pem(),
            not_before=self.not_before,
            not_after=self.not_after,
            serial=self.serial,
            received_at=self.received_at,
        )


def svid_from_response(
    identity: SpiffeId,
    key: ec.EllipticCurvePrivateKey,
    cert_chain: Sequence[str],
    root_certs: Sequence[str] = (),
    *,
    trust_roots: Sequence[x509.Certificate] = (),
    now: datetime | None = None,
) -> Svid:
    """Turn a CreateCertificate answer into an Svid, or raise ChainError saying what is wrong.

    Without root_certs, Istio's convention holds: the last entry of cert_chain
    is the root. With trust_roots (the mesh roots this node was configured
    with) the chain must lead to one of them, whatever roots the CA sent.
    """
    now = now or utcnow()
    certs = load_pem_certificates(cert_chain)
    if not certs:
        raise ChainError(f"CA returned an empty certificate chain for {identity}")
    if root_certs:
        sent_roots = load_pem_certificates(root_certs)
        chain = [c for c in certs if c not in sent_roots]
    elif len(certs) > 1 and certs[-1].issuer == certs[-1].subject:
        sent_roots = [certs[-1]]
        chain = certs[:-1]
    else:
        sent_roots = []
        chain = certs
    roots = list(trust_roots) or sent_roots
    if not roots:
        raise ChainError(f"no root certificate for {identity}: none configured and none sent")
    if not chain:
        raise ChainError(f"CA returned only root certificates for {identity}")
    leaf = chain[0]
    got = identity_of(leaf)
    if got != identity:
        raise ChainError(f"CA issued a certificate for {got}, but {identity} was requested")
    if _public_der(leaf.public_key()) != _public_der(key.public_key()):
        raise ChainError(f"certificate for {identity} does not carry the key of the request")
    verify_chain(chain, roots, now)
    return Svid(identity, key, tuple(chain), tuple(roots), now)
