"""The mesh certificate authority: signs workload CSRs into X.509 SVIDs.

It refuses rather than repairs: a CSR must ask for exactly the identity the
caller was authorized for (Istio overwrites the SANs instead; refusing makes a
confused or compromised client visible). The signer is either a generated
self-signed ECDSA P-256 root or a key and certificate loaded from files named
as in Istio's ``cacerts`` Secret, so a tether CA can sit under an existing
root.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.identity.spiffe import (
    DEFAULT_TRUST_DOMAIN,
    SpiffeId,
    SpiffeIdError,
    as_spiffe_id,
    check_trust_domain,
)
from agent.identity.svid import (
    ChainError,
    generate_key,
    load_pem_certificates,
    to_pem,
    utcnow,
    verify_chain,
)

DEFAULT_TTL = timedelta(hours=24)
MAX_TTL = timedelta(hours=24)
ROOT_TTL = timedelta(days=3650)
CLOCK_SKEW = timedelta(minutes=1)

# File names of Istio's plugged-in CA Secret (``cacerts``).
CA_CERT_FILE = "ca-cert.pem"
CA_KEY_FILE = "ca-key.pem"
CERT_CHAIN_FILE = "cert-chain.pem"
ROOT_CERT_FILE = "root-cert.pem"

Clock = Callable[[], datetime]


class CaError(Exception):
    """Base of the CA's refusals."""


class CsrError(CaError, ValueError):
    """The CSR is malformed or asks for something other than the authorized identity."""


class TrustDomainError(CaError):
    """The identity is outside the trust domain this CA signs for."""


def _ski(key: ec.EllipticCurvePublicKey) -> x509.SubjectKeyIdentifier:
    return x509.SubjectKeyIdentifier.from_public_key(key)


def _as_timedelta(ttl: timedelta | float | None) -> timedelta | None:
    if ttl is None or isinstance(ttl, timedelta):
        return ttl
    return timedelta(seconds=float(ttl))


class CertificateAuthority:
    """Signs leaf certificates for one trust domain with one signing key."""

    def __init__(
        self,
        signer_key: ec.EllipticCurvePrivateKey,
        signer_cert: x509.Certificate,
        *,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        intermediates: Sequence[x509.Certificate] = (),
        roots: Sequence[x509.Certificate] = (),
        default_ttl: timedelta = DEFAULT_TTL,
        max_ttl: timedelta = MAX_TTL,
        clock_skew: timedelta = CLOCK_SKEW,
        clock: Clock = utcnow,
    ) -> None:
        check_trust_domain(trust_domain)
        if max_ttl <= timedelta(0) or default_ttl <= timedelta(0):
            raise ValueError("default_ttl and max_ttl must be positive")
        self_signed = signer_cert.issuer == signer_cert.subject
        if not roots:
            if not self_signed:
                raise ValueError("signer certificate is not self-signed: pass the root certificate")
            roots = (signer_cert,)
        pub = signer_cert.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.public_numbers() != (
            signer_key.public_key().public_numbers()
        ):
            raise ValueError("CA key does not match the CA certificate")
        try:
            verify_chain([signer_cert, *intermediates], roots, clock(), leaf_is_ca=True)
        except ChainError as exc:
            raise ValueError(f"CA certificate does not verify: {exc}") from exc
        self.trust_domain = trust_domain
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self.clock_skew = clock_skew
        self._clock = clock
        self._key = signer_key
        self._cert = signer_cert
        self._intermediates = tuple(i for i in intermediates if i not in roots and i != signer_cert)
        self._roots = tuple(roots)
        # What follows a leaf in an answer: the signer unless it is a root, then the rest.
        self._issuers = (() if signer_cert in self._roots else (signer_cert,)) + self._intermediates

    # -- construction -----------------------------------------------------

    @classmethod
    def generate(
        cls,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        *,
        root_ttl: timedelta = ROOT_TTL,
        default_ttl: timedelta = DEFAULT_TTL,
        max_ttl: timedelta = MAX_TTL,
        clock_skew: timedelta = CLOCK_SKEW,
        clock: Clock = utcnow,
    ) -> CertificateAuthority:
        """A fresh self-signed ECDSA P-256 root for trust_domain."""
        key = generate_key()
        now = clock()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, "tether mesh root CA"),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - clock_skew)
            .not_valid_after(now + root_ttl)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(_ski(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(
            key,
            cert,
            trust_domain=trust_domain,
            default_ttl=default_ttl,
            max_ttl=max_ttl,
            clock_skew=clock_skew,
            clock=clock,
        )

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike[str],
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        *,
        default_ttl: timedelta = DEFAULT_TTL,
        max_ttl: timedelta = MAX_TTL,
        clock_skew: timedelta = CLOCK_SKEW,
        clock: Clock = utcnow,
    ) -> CertificateAuthority:
        """Load ca-key.pem + ca-cert.pem (+ cert-chain.pem, root-cert.pem) from directory.

        Without root-cert.pem, ca-cert.pem must be a self-signed root.
        """
        d = Path(directory)
        try:
            key = serialization.load_pem_private_key((d / CA_KEY_FILE).read_bytes(), None)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{d / CA_KEY_FILE}: not an unencrypted PEM private key") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{d / CA_KEY_FILE}: the CA key must be an ECDSA key")
        certs = load_pem_certificates([(d / CA_CERT_FILE).read_bytes()])
        if not certs:
            raise ValueError(f"{d / CA_CERT_FILE}: no certificate")
        signer = certs[0]
        roots: list[x509.Certificate] = []
        if (d / ROOT_CERT_FILE).exists():
            roots = load_pem_certificates([(d / ROOT_CERT_FILE).read_bytes()])
        chain: list[x509.Certificate] = certs[1:]
        if (d / CERT_CHAIN_FILE).exists():
            chain = load_pem_certificates([(d / CERT_CHAIN_FILE).read_bytes()])
        chain = [c for c in chain if c != signer and c not in roots]
        return cls(
            key,
            signer,
            trust_domain=trust_domain,
            intermediates=chain,
            roots=roots,
            default_ttl=default_ttl,
            max_ttl=max_ttl,
            clock_skew=clock_skew,
            clock=clock,
        )

    @classmethod
    def load_or_generate(
        cls,
        directory: str | os.PathLike[str],
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        *,
        default_ttl: timedelta = DEFAULT_TTL,
        max_ttl: timedelta = MAX_TTL,
        clock_skew: timedelta = CLOCK_SKEW,
        clock: Clock = utcnow,
    ) -> CertificateAuthority:
        """Load the CA from directory, or generate a root and save it there first."""
        d = Path(directory)
        if (d / CA_KEY_FILE).exists():
            return cls.load(
                d,
                trust_domain,
                default_ttl=default_ttl,
                max_ttl=max_ttl,
                clock_skew=clock_skew,
                clock=clock,
            )
        ca = cls.generate(
            trust_domain,
            default_ttl=default_ttl,
            max_ttl=max_ttl,
            clock_skew=clock_skew,
            clock=clock,
        )
        ca.save(d)
        return ca

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the CA in the cacerts layout; the key file is created 0600."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        key_pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        fd = os.open(d / CA_KEY_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        (d / CA_CERT_FILE).write_text(to_pem(self._cert))
        (d / CERT_CHAIN_FILE).write_text(
            "".join(to_pem(c) for c in (self._cert, *self._intermediates))
        )
        (d / ROOT_CERT_FILE).write_text(self.roots_pem())

    # -- queries ----------------------------------------------------------

    @property
    def certificate(self) -> x509.Certificate:
        return self._cert

    @property
    def roots(self) -> tuple[x509.Certificate, ...]:
        return self._roots

    def roots_pem(self) -> str:
        return "".join(to_pem(c) for c in self._roots)

    def effective_ttl(self, requested: timedelta | float | None) -> timedelta:
        """Requested TTL, default when absent or not positive, capped at max_ttl."""
        ttl = _as_timedelta(requested)
        if ttl is None or ttl <= timedelta(0):
            ttl = self.default_ttl
        return min(ttl, self.max_ttl)

    # -- signing ----------------------------------------------------------

    def check_identity(self, identity: SpiffeId | str) -> SpiffeId:
        try:
            ident = as_spiffe_id(identity)
        except SpiffeIdError as exc:
            raise CsrError(f"requested identity is invalid: {exc}") from exc
        if ident.trust_domain != self.trust_domain:
            raise TrustDomainError(
                f"identity {ident} is in trust domain {ident.trust_domain!r}; "
                f"this CA signs only for {self.trust_domain!r}"
            )
        return ident

    def sign_csr(
        self,
        csr_pem: str | bytes,
        requested_identity: SpiffeId | str,
        ttl: timedelta | float | None = None,
    ) -> list[str]:
        """Sign a CSR for requested_identity; return PEMs [leaf, intermediates..., root].

        The CSR must carry exactly one SAN, the URI of requested_identity, and an
        ECDSA P-256 key. Nothing else from the CSR reaches the certificate.
        """
        ident = self.check_identity(requested_identity)
        data = csr_pem.encode("ascii", "replace") if isinstance(csr_pem, str) else csr_pem
        try:
            csr = x509.load_pem_x509_csr(data)
        except ValueError as exc:
            raise CsrError(f"CSR is not a PEM certificate request: {exc}") from exc
        if not csr.is_signature_valid:
            raise CsrError("CSR signature does not verify against its public key")
        pub = csr.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey) or not isinstance(
            pub.curve, ec.SECP256R1
        ):
            raise CsrError(
                f"CSR key must be ECDSA P-256, got {type(pub).__name__}"
                + (f" on {pub.curve.name}" if isinstance(pub, ec.EllipticCurvePublicKey) else "")
            )
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound as exc:
            raise CsrError(f"CSR has no subjectAltName; it must name {ident}") from exc
        except ValueError as exc:
            raise CsrError(f"CSR extensions are malformed: {exc}") from exc
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        others = [str(n.value) for n in san if not isinstance(n, x509.UniformResourceIdentifier)]
        if others:
            raise CsrError(f"CSR carries non-URI SANs {others}; only {ident} may be requested")
        if uris != [ident.uri]:
            raise CsrError(f"CSR URI SANs {uris} differ from the authorized identity [{ident.uri}]")
        leaf = self.issue(pub, ident, ttl)
        return [to_pem(c) for c in (leaf, *self._issuers, *self._roots)]

    def issue(
        self,
        public_key: ec.EllipticCurvePublicKey,
        identity: SpiffeId,
        ttl: timedelta | float | None = None,
    ) -> x509.Certificate:
        """Build and sign a workload leaf certificate (no CSR checks: callers did them)."""
        now = self._clock()
        not_after = min(now + self.effective_ttl(ttl), self._cert.not_valid_after_utc)
        not_before = now - self.clock_skew
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=True,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            # Empty subject, so the SAN must be critical (RFC 5280 §4.2.1.6).
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
                critical=True,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        return builder.sign(self._key, hashes.SHA256())

    def issue_server_certificate(
        self,
        public_key: ec.EllipticCurvePublicKey,
        dns_names: Sequence[str],
        ttl: timedelta | float | None = None,
    ) -> list[str]:
        """A serving certificate for the CA's own gRPC endpoint (DNS/IP SANs, serverAuth)."""
        import ipaddress

        names: list[x509.GeneralName] = []
        for n in dns_names:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                names.append(x509.DNSName(n))
        now = self._clock()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0])]))
            .issuer_name(self._cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - self.clock_skew)
            .not_valid_after(min(now + self.effective_ttl(ttl), self._cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())
        )
        return [to_pem(c) for c in (cert, *self._issuers, *self._roots)]
