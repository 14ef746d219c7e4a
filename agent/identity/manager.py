"""CertificateManager: one SVID per service-account identity on this node, kept fresh.

The ztunnel ``SecretManager`` shape: a certificate is fetched when an identity
first appears, renewed at half its life, and on failure retried with a
per-identity exponential backoff capped at 150 s while the still-valid
certificate stays in use. Identities no longer on the node are forgotten.
The source of certificates is pluggable: ``CaClient`` (gRPC to istiod or
``tether ca``) or ``WorkerCA`` (the local CA, signing in a worker process;
agent/identity/embedded.py).  Nothing here imports cryptography.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from agent.identity import tls
from agent.identity.pem import SvidLike, utcnow
from agent.identity.spiffe import SpiffeId, as_spiffe_id
from agent.identity.tls import PeerIdentityError, peer_identity, verify_peer

__all__ = [
    "Backoff",
    "CertificateManager",
    "CertificateSource",
    "CertificateUnavailable",
    "PeerIdentityError",
    "SvidLike",
    "peer_identity",
    "verify_peer",
]

log = logging.getLogger(__name__)

# ztunnel CERT_REFRESH_FAILURE_RETRY_DELAY_MAX_INTERVAL.
BACKOFF_MAX = 150.0
# ztunnel starts its per-identity backoff at 1 s, doubling, ±20 % jitter.
BACKOFF_INITIAL = 1.0
BACKOFF_MULTIPLIER = 2.0
BACKOFF_JITTER = 0.2
# Never refresh more often than this, whatever a CA issues.
MIN_REFRESH = 0.1

Clock = Callable[[], datetime]
Sleep = Callable[[float], Awaitable[None]]


class CertificateSource(Protocol):
    """Where certificates come from: a CA client or the embedded CA."""

    async def fetch(self, identity: SpiffeId) -> SvidLike: ...


class CertificateUnavailable(Exception):
    """No valid certificate for an identity; cause is the last fetch error, if any."""

    def __init__(self, identity: SpiffeId, cause: BaseException | None, why: str = "") -> None:
        reason = why or (f"{type(cause).__name__}: {cause}" if cause else "no certificate")
        super().__init__(f"no valid certificate for {identity}: {reason}")
        self.identity = identity
        self.cause = cause


class Backoff:
    """Exponential backoff with jitter and a cap, reset on success."""

    def __init__(
        self,
        initial: float = BACKOFF_INITIAL,
        maximum: float = BACKOFF_MAX,
        multiplier: float = BACKOFF_MULTIPLIER,
        jitter: float = BACKOFF_JITTER,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.multiplier = multiplier
        self.jitter = jitter
        self._rng = rng
        self._current = initial

    def reset(self) -> None:
        self._current = self.initial

    def next(self) -> float:
        delay = self._current * (1.0 + self.jitter * (2.0 * self._rng() - 1.0))
        self._current = min(self._current * self.multiplier, self.maximum)
        return min(delay, self.maximum)


@dataclass
class _Entry:
    identity: SpiffeId
    backoff: Backoff
    svid: SvidLike | None = None
    last_error: BaseException | None = None
    failures: int = 0
    next_attempt: datetime | None = None
    task: asyncio.Task[None] | None = None
    # Resolved when the attempt under way ends; None between attempts.
    inflight: asyncio.Future[None] | None = None
    forgotten: bool = False
    tls_cache: dict[str, tuple[int, ssl.SSLContext]] = field(default_factory=dict)


class CertificateManager:
    """Fetches, caches and renews SVIDs; builds mTLS contexts from them."""

    def __init__(
        self,
        source: CertificateSource,
        *,
        renew_ratio: float = 0.5,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
        backoff_jitter: float = BACKOFF_JITTER,
        clock: Clock = utcnow,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if not 0.0 < renew_ratio < 1.0:
            raise ValueError("renew_ratio must be between 0 and 1")
        self.source = source
        self.renew_ratio = renew_ratio
        self._backoff_args = (backoff_initial, backoff_max, BACKOFF_MULTIPLIER, backoff_jitter)
        self._clock = clock
        self._sleep = sleep
        self._entries: dict[SpiffeId, _Entry] = {}
        # called on the loop with (identity, svid) after every issuance and
        # renewal: holders of a certificate outside this process (a waypoint
        # Envoy's SDS secret) push the new one
        self.on_issued: list[Callable[[SpiffeId, SvidLike], None]] = []

    # -- lifecycle of identities -------------------------------------------

    def _entry(self, identity: SpiffeId) -> _Entry:
        entry = self._entries.get(identity)
        if entry is None:
            entry = _Entry(identity, Backoff(*self._backoff_args))
            entry.inflight = asyncio.get_running_loop().create_future()
            entry.task = asyncio.create_task(self._run(entry), name=f"svid {identity}")
            self._entries[identity] = entry
        return entry

    def identities(self) -> list[SpiffeId]:
        return sorted(self._entries)

    def prefetch(self, identity: SpiffeId | str) -> None:
        """Start managing identity now, so the first connection does not wait on the CA."""
        self._entry(as_spiffe_id(identity))

    def retain(self, identities: Iterable[SpiffeId | str]) -> None:
        """Make the managed set exactly identities: prefetch new ones, forget the rest."""
        wanted = {as_spiffe_id(i) for i in identities}
        for ident in list(self._entries):
            if ident not in wanted:
                self.forget(ident)
        for ident in sorted(wanted):
            self._entry(ident)

    def forget(self, identity: SpiffeId | str) -> None:
        """Stop renewing identity and drop its key (no workload on the node uses it)."""
        entry = self._entries.pop(as_spiffe_id(identity), None)
        if entry is None:
            return
        entry.forgotten = True
        if entry.task is not None:
            entry.task.cancel()
        if entry.inflight is not None and not entry.inflight.done():
            entry.inflight.set_result(None)
        entry.tls_cache.clear()
        log.info("forgot certificate for %s", entry.identity)

    async def close(self) -> None:
        tasks = [e.task for e in self._entries.values() if e.task is not None]
        for ident in list(self._entries):
            self.forget(ident)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        aclose = getattr(self.source, "aclose", None)  # WorkerCA: its worker process
        if aclose is not None:
            await aclose()

    # -- the renewal loop ------------------------------------------------------

    async def _run(self, entry: _Entry) -> None:
        loop = asyncio.get_running_loop()
        while not entry.forgotten:
            if entry.inflight is None:
                entry.inflight = loop.create_future()
            try:
                svid = await self.source.fetch(entry.identity)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = self._failed(entry, exc)
            else:
                delay = self._succeeded(entry, svid)
            entry.next_attempt = self._clock() + timedelta(seconds=delay)
            attempt, entry.inflight = entry.inflight, None
            if attempt is not None and not attempt.done():
                attempt.set_result(None)
            await self._sleep(delay)

    def _succeeded(self, entry: _Entry, svid: SvidLike) -> float:
        if svid.identity != entry.identity:
            return self._failed(
                entry, ValueError(f"source returned {svid.identity} for {entry.identity}")
            )
        entry.svid = svid
        entry.last_error = None
        entry.failures = 0
        entry.backoff.reset()
        entry.tls_cache.clear()
        now = self._clock()
        refresh = svid.refresh_at(self.renew_ratio)
        log.info(
            "certificate for %s serial %x valid until %s, renewing at %s",
            entry.identity,
            svid.serial,
            svid.not_after.isoformat(),
            refresh.isoformat(),
        )
        for hook in list(self.on_issued):
            try:
                hook(entry.identity, svid)
            except Exception:
                log.exception("on_issued hook failed for %s", entry.identity)
        return max((refresh - now).total_seconds(), MIN_REFRESH)

    def _failed(self, entry: _Entry, exc: BaseException) -> float:
        entry.last_error = exc
        entry.failures += 1
        delay = entry.backoff.next()
        now = self._clock()
        current = entry.svid
        if current is not None and now < current.not_after:
            # Keep serving the valid certificate; retry no later than its expiry.
            delay = max(min(delay, (current.not_after - now).total_seconds()), 0.0)
            log.warning(
                "renewing certificate for %s failed (%s); keeping serial %x valid until %s, "
                "retry in %.1fs",
                entry.identity,
                exc,
                current.serial,
                current.not_after.isoformat(),
                delay,
            )
        else:
            log.warning(
                "fetching certificate for %s failed (%s); retry in %.1fs",
                entry.identity,
                exc,
                delay,
            )
        return delay

    # -- access ----------------------------------------------------------------

    def _valid(self, entry: _Entry) -> SvidLike | None:
        svid = entry.svid
        if svid is not None and self._clock() < svid.not_after:
            return svid
        return None

    async def get(self, identity: SpiffeId | str) -> SvidLike:
        """The current valid SVID, waiting for an attempt under way; else CertificateUnavailable.

        Starts managing the identity if it was not yet.
        """
        ident = as_spiffe_id(identity)
        entry = self._entry(ident)
        svid = self._valid(entry)
        if svid is not None:
            return svid
        if entry.inflight is not None:
            await asyncio.shield(entry.inflight)
            svid = self._valid(entry)
            if svid is not None and not entry.forgotten:
                return svid
        if entry.forgotten:
            raise CertificateUnavailable(ident, None, "identity was forgotten")
        raise CertificateUnavailable(ident, entry.last_error)

    def peek(self, identity: SpiffeId | str) -> SvidLike | None:
        """The current valid SVID without waiting or starting anything."""
        entry = self._entries.get(as_spiffe_id(identity))
        return self._valid(entry) if entry is not None else None

    # -- TLS -------------------------------------------------------------------

    async def _context(self, identity: SpiffeId | str, role: str) -> ssl.SSLContext:
        svid = await self.get(identity)
        entry = self._entries.get(svid.identity)
        cached = entry.tls_cache.get(role) if entry is not None else None
        if cached is not None and cached[0] == svid.serial:
            return cached[1]
        build = tls.server_context if role == "server" else tls.client_context
        ctx = build(svid)
        if entry is not None and entry.svid is svid:
            entry.tls_cache[role] = (svid.serial, ctx)
        return ctx

    async def ssl_context_server(self, identity: SpiffeId | str) -> ssl.SSLContext:
        """TLS 1.3, ALPN h2, client certificate required, verified against the mesh roots."""
        return await self._context(identity, "server")

    async def ssl_context_client(self, identity: SpiffeId | str) -> ssl.SSLContext:
        """TLS 1.3, ALPN h2, presents identity; check the server with tls.verify_peer."""
        return await self._context(identity, "client")

    # -- introspection -----------------------------------------------------------

    def _state(self, entry: _Entry, now: datetime) -> str:
        svid = entry.svid
        if svid is None:
            return "pending" if entry.last_error is None else "unavailable"
        if now >= svid.not_after:
            return "expired"
        if now >= svid.refresh_at(self.renew_ratio) or entry.last_error is not None:
            return "renewing"
        return "valid"

    def describe(self) -> list[dict[str, Any]]:
        """Identities and their certificates for /config_dump."""
        now = self._clock()
        out: list[dict[str, Any]] = []
        for ident in sorted(self._entries):
            entry = self._entries[ident]
            svid = entry.svid
            out.append(
                {
                    "identity": str(ident),
                    "state": self._state(entry, now),
                    "serial": f"{svid.serial:x}" if svid else None,
                    "not_before": svid.not_before.isoformat() if svid else None,
                    "not_after": svid.not_after.isoformat() if svid else None,
                    "refresh_at": svid.refresh_at(self.renew_ratio).isoformat() if svid else None,
                    "next_attempt": entry.next_attempt.isoformat() if entry.next_attempt else None,
                    "failures": entry.failures,
                    "last_error": str(entry.last_error) if entry.last_error else None,
                }
            )
        return out
