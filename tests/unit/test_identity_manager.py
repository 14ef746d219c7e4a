"""CertificateManager: half-life renewal, backoff while the CA is down, forgetting, describe."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import TypeVar

import grpc
import pytest

from agent.identity.ca import CertificateAuthority
from agent.identity.client import CaClient, CaClientError
from agent.identity.embedded import EmbeddedCA
from agent.identity.manager import (
    BACKOFF_MAX,
    Backoff,
    CertificateManager,
    CertificateUnavailable,
)
from agent.identity.server import CaServer, StaticAuthenticator
from agent.identity.spiffe import SpiffeId
from agent.identity.svid import Svid

T = TypeVar("T")

WEB = SpiffeId("cluster.local", "shop", "web")
DB = SpiffeId("cluster.local", "shop", "db")


def run(fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await asyncio.wait_for(fn(), timeout=30)

    return asyncio.run(main())


class FlakyCA:
    """An embedded CA that can be switched off, recording when it was asked."""

    def __init__(self, ttl: float) -> None:
        self.inner = EmbeddedCA(
            CertificateAuthority.generate("cluster.local"), timedelta(seconds=ttl)
        )
        self.down = False
        self.attempts: list[tuple[float, SpiffeId, bool]] = []

    async def fetch(self, identity: SpiffeId) -> Svid:
        self.attempts.append((asyncio.get_running_loop().time(), identity, not self.down))
        if self.down:
            raise ConnectionError("CA unreachable")
        return await self.inner.fetch(identity)


def test_backoff_doubles_to_the_150s_cap() -> None:
    b = Backoff(jitter=0.0)
    seq = [b.next() for _ in range(10)]
    assert seq == [1, 2, 4, 8, 16, 32, 64, 128, 150, 150]
    assert BACKOFF_MAX == 150.0
    b.reset()
    assert b.next() == 1
    j = Backoff(initial=10, jitter=0.2, rng=lambda: 1.0)
    assert j.next() == pytest.approx(12.0)
    j = Backoff(initial=10, jitter=0.2, rng=lambda: 0.0)
    assert j.next() == pytest.approx(8.0)


def test_renews_at_half_life() -> None:
    async def main() -> None:
        source = FlakyCA(ttl=2.0)
        mgr = CertificateManager(source)
        try:
            first = await mgr.get(WEB)
            assert [d["state"] for d in mgr.describe()] == ["valid"]
            # X.509 times have whole seconds, so a "2 s" certificate has 1-2 s left on
            # arrival; renewal comes at half of what was left.
            half = (first.refresh_at() - first.received_at).total_seconds()
            assert half == pytest.approx((first.not_after - first.received_at).total_seconds() / 2)
            assert 0.45 <= half <= 1.0
            await asyncio.sleep(half + 0.3)
            second = await mgr.get(WEB)
            assert second.serial != first.serial
            times = [t for t, _, _ in source.attempts]
            assert times[1] - times[0] == pytest.approx(half, abs=0.2), times
        finally:
            await mgr.close()

    run(main)


def test_keeps_valid_certificate_and_backs_off_while_ca_is_down() -> None:
    async def main() -> None:
        source = FlakyCA(ttl=4.0)
        mgr = CertificateManager(source, backoff_initial=0.05, backoff_jitter=0.0)
        try:
            first = await mgr.get(WEB)
            source.down = True
            await asyncio.sleep(2.6)  # renewal due at ~2 s; failing since
            still = await mgr.get(WEB)
            assert still.serial == first.serial
            (info,) = mgr.describe()
            assert info["state"] == "renewing"
            assert info["serial"] == f"{first.serial:x}"
            assert info["failures"] >= 3
            assert "CA unreachable" in info["last_error"]
            failed = [t for t, _, ok in source.attempts if not ok]
            gaps = [b - a for a, b in itertools.pairwise(failed)]
            assert gaps[:3] == pytest.approx([0.05, 0.1, 0.2], abs=0.04), gaps
            assert all(later > earlier for earlier, later in itertools.pairwise(gaps))
            source.down = False
            await asyncio.sleep(0.9)  # next retry (at most 0.4 s later) succeeds
            renewed = await mgr.get(WEB)
            assert renewed.serial != first.serial
            (info,) = mgr.describe()
            assert info["state"] == "valid" and info["failures"] == 0
            assert info["last_error"] is None
        finally:
            await mgr.close()

    run(main)


def test_no_certificate_while_ca_down_then_recovers() -> None:
    async def main() -> None:
        source = FlakyCA(ttl=60.0)
        source.down = True
        mgr = CertificateManager(source, backoff_initial=0.1, backoff_jitter=0.0)
        try:
            with pytest.raises(CertificateUnavailable, match="CA unreachable") as info:
                await mgr.get(WEB)
            assert isinstance(info.value.cause, ConnectionError)
            assert mgr.describe()[0]["state"] == "unavailable"
            source.down = False
            await asyncio.sleep(0.3)
            assert (await mgr.get(WEB)).identity == WEB
        finally:
            await mgr.close()

    run(main)


def test_certificate_expires_when_ca_stays_down() -> None:
    async def main() -> None:
        source = FlakyCA(ttl=1.0)
        mgr = CertificateManager(source, backoff_initial=5.0, backoff_jitter=0.0)
        try:
            await mgr.get(WEB)
            source.down = True
            await asyncio.sleep(1.3)
            assert mgr.describe()[0]["state"] == "expired"
            assert mgr.peek(WEB) is None
            with pytest.raises(CertificateUnavailable):
                await mgr.get(WEB)
        finally:
            await mgr.close()

    run(main)


def test_retain_forgets_identities_no_longer_on_the_node() -> None:
    async def main() -> None:
        source = FlakyCA(ttl=60.0)
        mgr = CertificateManager(source)
        try:
            mgr.retain([WEB, DB])
            await mgr.get(WEB)
            await mgr.get(DB)
            assert mgr.identities() == [DB, WEB]
            mgr.retain([str(WEB)])
            assert mgr.identities() == [WEB]
            assert [d["identity"] for d in mgr.describe()] == [WEB.uri]
            assert mgr.peek(DB) is None
            fetches = len(source.attempts)
            await asyncio.sleep(0.1)
            assert len(source.attempts) == fetches  # nothing renews the forgotten one
        finally:
            await mgr.close()

    run(main)


def test_forget_during_first_fetch_wakes_waiters() -> None:
    class Slow(FlakyCA):
        async def fetch(self, identity: SpiffeId) -> Svid:
            await asyncio.sleep(5)
            return await super().fetch(identity)

    async def main() -> None:
        mgr = CertificateManager(Slow(ttl=60.0))
        try:
            waiter = asyncio.create_task(mgr.get(WEB))
            await asyncio.sleep(0.05)
            mgr.forget(WEB)
            with pytest.raises(CertificateUnavailable, match="forgotten"):
                await waiter
        finally:
            await mgr.close()

    run(main)


def test_manager_over_grpc_keeps_certificate_when_ca_stops() -> None:
    ca = CertificateAuthority.generate("cluster.local")
    auth = StaticAuthenticator({"tok": "node-a"}, lambda node: {WEB} if node == "node-a" else set())

    async def main() -> None:
        server = CaServer(ca, auth)
        port = await server.start("127.0.0.1:0")
        client = CaClient(
            f"127.0.0.1:{port}", token="tok", ttl=timedelta(seconds=4), trust_roots=ca.roots_pem()
        )
        mgr = CertificateManager(client, backoff_initial=0.05, backoff_jitter=0.0)
        try:
            first = await mgr.get(WEB)
            assert first.roots == ca.roots
            await server.stop(grace=None)
            await asyncio.sleep(2.5)  # past the renewal time (1.5-2 s), before expiry (3-4 s)
            assert (await mgr.get(WEB)).serial == first.serial
            (info,) = mgr.describe()
            assert info["state"] == "renewing" and info["failures"] >= 1
            assert "UNAVAILABLE" in info["last_error"]
        finally:
            await mgr.close()
            await client.close()
            await server.stop(grace=None)

    run(main)


def test_ca_client_error_carries_grpc_code() -> None:
    err = CaClientError("x", grpc.StatusCode.UNAVAILABLE)
    assert err.code == grpc.StatusCode.UNAVAILABLE
