"""SVIDs as the agent process holds them: PEM bytes and dates, no cryptography.

The X.509 work (key generation, CSRs, signing, chain checks) is done by
agent/identity/svid.py, which imports cryptography (~8.6 MiB resident): in
the agent that runs in a worker process (agent/identity/issuer.py) and hands
back a PemSvid.  Everything the agent does with a certificate afterwards
(TLS contexts, SDS secrets for a waypoint, renewal times) needs only what
`SvidLike` offers, which the checked `svid.Svid` offers too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from agent.identity.spiffe import SpiffeId


def utcnow() -> datetime:
    return datetime.now(UTC)


def refresh_time(
    received_at: datetime, not_before: datetime, not_after: datetime, ratio: float
) -> datetime:
    """When to renew: ``ratio`` of the lifetime left when the certificate arrived.

    ztunnel measures half-life from notBefore; the CA backdates notBefore for
    clock skew, so measuring from arrival keeps short test TTLs meaningful and
    differs by under a minute on a 24 h certificate.
    """
    start = max(received_at, not_before)
    return start + (not_after - start) * ratio


class SvidLike(Protocol):
    """What the agent needs of a checked SVID."""

    @property
    def identity(self) -> SpiffeId: ...

    @property
    def not_before(self) -> datetime: ...

    @property
    def not_after(self) -> datetime: ...

    @property
    def serial(self) -> int: ...

    def refresh_at(self, ratio: float = 0.5) -> datetime: ...

    def is_valid(self, now: datetime) -> bool: ...

    def chain_pem(self) -> bytes: ...

    def roots_pem(self) -> bytes: ...

    def key_pem(self) -> bytes: ...


@dataclass(frozen=True)
class PemSvid:
    """A checked SVID as PEM: the checks were made where it was issued
    (svid.svid_from_response, in the issuer worker)."""

    identity: SpiffeId
    chain: bytes  # leaf first, no root
    roots: bytes
    key: bytes = field(repr=False)  # PKCS#8, unencrypted: it never leaves memory
    not_before: datetime
    not_after: datetime
    serial: int
    received_at: datetime

    def refresh_at(self, ratio: float = 0.5) -> datetime:
        return refresh_time(self.received_at, self.not_before, self.not_after, ratio)

    def is_valid(self, now: datetime) -> bool:
        return self.not_before <= now < self.not_after

    def chain_pem(self) -> bytes:
        return self.chain

    def roots_pem(self) -> bytes:
        return self.roots

    def key_pem(self) -> bytes:
        return self.key

    def to_json(self) -> dict[str, Any]:
        return {
            "identity": self.identity.uri,
            "chain": self.chain.decode("ascii"),
            "roots": self.roots.decode("ascii"),
            "key": self.key.decode("ascii"),
            "not_before": self.not_before.isoformat(),
            "not_after": self.not_after.isoformat(),
            "serial": f"{self.serial:x}",
            "received_at": self.received_at.isoformat(),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PemSvid:
        """Raises ValueError (KeyError, TypeError included) on a malformed record."""
        try:
            return cls(
                identity=SpiffeId.parse(str(d["identity"])),
                chain=str(d["chain"]).encode("ascii"),
                roots=str(d["roots"]).encode("ascii"),
                key=str(d["key"]).encode("ascii"),
                not_before=datetime.fromisoformat(str(d["not_before"])),
                not_after=datetime.fromisoformat(str(d["not_after"])),
                serial=int(str(d["serial"]), 16),
                received_at=datetime.fromisoformat(str(d["received_at"])),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed SVID record: {e!r}") from e
