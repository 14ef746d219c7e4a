"""SPIFFE IDs of the Istio shape: ``spiffe://<trust-domain>/ns/<namespace>/sa/<account>``.

Istio names a workload by its Kubernetes service account; authorization
policies write the same name without the scheme (the "principal",
``<trust-domain>/ns/<namespace>/sa/<account>``). Both forms parse to one
value type so that certificates, policies and the CA compare identities
exactly, never as strings that merely look alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCHEME = "spiffe"
URI_PREFIX = "spiffe://"
DEFAULT_TRUST_DOMAIN = "cluster.local"

# SPIFFE ID spec §2.1: trust domain is lowercase letters, digits, '.', '-', '_'.
_TRUST_DOMAIN_RE = re.compile(r"[a-z0-9._-]+")
# SPIFFE ID spec §2.2: path segments are letters, digits, '.', '-', '_'.
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")
_MAX_TRUST_DOMAIN = 255
_MAX_URI = 2048


class SpiffeIdError(ValueError):
    """A string is not an Istio-shaped SPIFFE ID (or principal); the message says why."""


def _check_trust_domain(td: str, whole: str) -> None:
    if not td:
        raise SpiffeIdError(f"{whole!r}: empty trust domain")
    if len(td) > _MAX_TRUST_DOMAIN:
        raise SpiffeIdError(f"{whole!r}: trust domain longer than {_MAX_TRUST_DOMAIN} characters")
    if not _TRUST_DOMAIN_RE.fullmatch(td):
        raise SpiffeIdError(
            f"{whole!r}: trust domain {td!r} may hold only lowercase letters, digits, "
            "'.', '-' and '_'"
        )


def check_trust_domain(td: str) -> str:
    """Return td if it is a valid SPIFFE trust domain, else raise SpiffeIdError."""
    _check_trust_domain(td, f"{URI_PREFIX}{td}")
    return td


def _check_segment(what: str, value: str, whole: str) -> None:
    if not value:
        raise SpiffeIdError(f"{whole!r}: empty {what}")
    if value in (".", ".."):
        raise SpiffeIdError(f"{whole!r}: {what} may not be {value!r}")
    if not _SEGMENT_RE.fullmatch(value):
        raise SpiffeIdError(
            f"{whole!r}: {what} {value!r} may hold only letters, digits, '.', '-' and '_'"
        )


@dataclass(frozen=True, order=True)
class SpiffeId:
    """One workload identity: a service account in a namespace of a trust domain."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        whole = f"{URI_PREFIX}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"
        _check_trust_domain(self.trust_domain, whole)
        _check_segment("namespace", self.namespace, whole)
        _check_segment("service account", self.service_account, whole)
        if len(whole) > _MAX_URI:
            raise SpiffeIdError(f"SPIFFE ID longer than {_MAX_URI} characters")

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse ``spiffe://td/ns/N/sa/S``; anything else is an error naming the input."""
        if not isinstance(uri, str):
            raise SpiffeIdError(f"SPIFFE ID must be a string, got {type(uri).__name__}")
        if not uri.startswith(URI_PREFIX):
            raise SpiffeIdError(f"{uri!r}: SPIFFE ID must start with {URI_PREFIX!r}")
        if len(uri) > _MAX_URI:
            raise SpiffeIdError(f"SPIFFE ID longer than {_MAX_URI} characters")
        rest = uri[len(URI_PREFIX) :]
        if any(c in rest for c in "?#@:"):
            raise SpiffeIdError(f"{uri!r}: SPIFFE ID may not carry a user, port, query or fragment")
        if "%" in rest:
            raise SpiffeIdError(f"{uri!r}: SPIFFE ID may not be percent-encoded")
        return cls._from_path(rest, uri)

    @classmethod
    def parse_principal(cls, principal: str) -> SpiffeId:
        """Parse Istio's principal form ``td/ns/N/sa/S`` (a SPIFFE ID without the scheme)."""
        if principal.startswith(URI_PREFIX):
            raise SpiffeIdError(f"{principal!r}: a principal has no {URI_PREFIX!r} prefix")
        return cls._from_path(principal, principal)

    @classmethod
    def _from_path(cls, rest: str, whole: str) -> SpiffeId:
        parts = rest.split("/")
        if len(parts) != 5 or parts[1] != "ns" or parts[3] != "sa":
            raise SpiffeIdError(
                f"{whole!r}: expected the shape <trust-domain>/ns/<namespace>/sa/<service-account>"
            )
        td, _, ns, _, sa = parts
        _check_trust_domain(td, whole)
        _check_segment("namespace", ns, whole)
        _check_segment("service account", sa, whole)
        return cls(td, ns, sa)

    @property
    def uri(self) -> str:
        return f"{URI_PREFIX}{self.principal}"

    @property
    def principal(self) -> str:
        """Istio's principal form, as written in AuthorizationPolicy ``principals``."""
        return f"{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    def __str__(self) -> str:
        return self.uri


def as_spiffe_id(value: SpiffeId | str) -> SpiffeId:
    """Accept either a parsed ID or its URI form at API edges."""
    return value if isinstance(value, SpiffeId) else SpiffeId.parse(value)
