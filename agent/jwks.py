"""The JWKS behind RequestAuthentication ``jwksUri``, fetched by the agent
(istiod's job in Istio) so that the pure translation can inline them.

Every uri some local waypoint references is fetched on a thread of its own
pool (never on the data-plane loop), refreshed every ``REFRESH`` (Istio's
default, 20 min), and a failure keeps the last good JWKS and retries with
backoff; a uri never fetched has no entry, and the translation refuses its
issuer's tokens.  What counts as good: HTTP 200, at most ``MAX_BYTES``, JSON
with a non-empty ``keys`` list (Envoy rejects the listener otherwise).

Transport: ``https`` only, checked against the system CAs (``TETHER_JWKS_CA``
names another bundle), no redirects followed.  Plain ``http`` is accepted only
to a loopback address: a JWKS is the set of keys whose tokens the waypoint
believes, so whoever can rewrite it in transit can mint any identity.  Istio
allows http; we refuse it rather than make that a silent default.  The
environment's HTTP(S)_PROXY is not used (not yet: a node whose egress needs a
proxy cannot fetch, and says so in the status).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

REFRESH = 20 * 60.0  # Istio's PILOT_JWT_PUB_KEY_REFRESH_INTERVAL default
TIMEOUT = 5.0  # per fetch, connect to last byte (Istio's jwtRule timeout default)
MAX_BYTES = 1 << 20
RETRY_INITIAL = 2.0
RETRY_MAX = 300.0


class JwksError(Exception):
    """A fetch that gave no usable JWKS; the message is what status shows."""


def check_uri(uri: str) -> None:
    """https anywhere, http only to a loopback address (see the module doc)."""
    u = urllib.parse.urlsplit(uri)
    if u.scheme == "https" and u.hostname:
        return
    if u.scheme == "http" and u.hostname:
        host = u.hostname
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if loopback:
            return
        raise JwksError("plain http is accepted only to a loopback address: use https")
    raise JwksError("not an https URL")


def validate(body: bytes) -> str:
    """The JWKS text, or JwksError: JSON object with a non-empty ``keys`` list."""
    try:
        value = json.loads(body)
    except ValueError as e:
        raise JwksError(f"not JSON: {e}") from None
    keys = value.get("keys") if isinstance(value, dict) else None
    if not isinstance(keys, list) or not keys:
        raise JwksError("not a JWKS: no non-empty 'keys' list")
    return body.decode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a 3xx stays an error: a redirect could leave https


def fetch(
    uri: str,
    *,
    context: ssl.SSLContext | None = None,
    timeout: float = TIMEOUT,
    max_bytes: int = MAX_BYTES,
) -> str:
    """One blocking fetch (a pool thread): the JWKS text or JwksError."""
    check_uri(uri)
    opener = urllib.request.build_opener(
        _NoRedirect(), urllib.request.HTTPSHandler(context=context), urllib.request.ProxyHandler({})
    )
    deadline = time.monotonic() + timeout
    req = urllib.request.Request(uri, headers={"Accept": "application/json"})
    try:
        with opener.open(req, timeout=timeout) as r:
            if r.status != 200:
                raise JwksError(f"HTTP {r.status}")
            length = r.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise JwksError(f"larger than {max_bytes} bytes ({length})")
            body = b""
            while len(body) <= max_bytes:
                if time.monotonic() > deadline:
                    raise JwksError(f"timed out after {timeout:g}s")
                chunk = r.read(64 * 1024)
                if not chunk:
                    break
                body += chunk
            if len(body) > max_bytes:
                raise JwksError(f"larger than {max_bytes} bytes")
    except urllib.error.HTTPError as e:
        raise JwksError(f"HTTP {e.code}") from None
    except (OSError, ValueError) as e:  # URLError, TLS, timeouts, bad URL
        reason = getattr(e, "reason", None) or e
        raise JwksError(f"{type(reason).__name__}: {reason}") from None
    return validate(body)


def default_context() -> ssl.SSLContext:
    return ssl.create_default_context(cafile=os.environ.get("TETHER_JWKS_CA") or None)


@dataclasses.dataclass
class _Entry:
    text: str | None = None
    fetched_at: float | None = None  # wall clock of the last good fetch
    error: str = ""
    failures: int = 0
    task: asyncio.Task[None] | None = None


class JwksFetcher:
    """The JWKS of every wanted uri, kept fresh; ``on_change(uri)`` runs on the
    loop when a uri's JWKS text changes (the waypoints then re-push xDS)."""

    def __init__(
        self,
        on_change: Callable[[str], None],
        *,
        context: ssl.SSLContext | None = None,
        refresh: float = REFRESH,
        timeout: float = TIMEOUT,
        max_bytes: int = MAX_BYTES,
        retry_initial: float = RETRY_INITIAL,
    ) -> None:
        self.on_change = on_change
        self.context = context
        self.refresh = refresh
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.retry_initial = retry_initial
        self.entries: dict[str, _Entry] = {}
        self._wants: dict[str, frozenset[str]] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="jwks")

    def want(self, consumer: str, uris: Iterable[str]) -> None:
        """``consumer`` (a waypoint) needs ``uris``; start or stop fetches (the loop)."""
        self._wants[consumer] = frozenset(uris)
        self._sync()

    def forget(self, consumer: str) -> None:
        self._wants.pop(consumer, None)
        self._sync()

    def _sync(self) -> None:
        wanted = set().union(*self._wants.values()) if self._wants else set()
        for uri in list(self.entries):
            if uri not in wanted:
                e = self.entries.pop(uri)
                if e.task is not None:
                    e.task.cancel()
        loop = asyncio.get_running_loop()
        for uri in sorted(wanted - self.entries.keys()):
            e = self.entries[uri] = _Entry()
            e.task = loop.create_task(self._keep(uri, e), name=f"jwks {uri}")

    def jwks(self) -> dict[str, str]:
        """uri -> the last good JWKS text (what ``translate(jwks=...)`` takes)."""
        return {u: e.text for u, e in self.entries.items() if e.text is not None}

    async def _keep(self, uri: str, e: _Entry) -> None:
        loop = asyncio.get_running_loop()
        if self.context is None:
            self.context = await loop.run_in_executor(self._pool, default_context)
        while True:
            try:
                text = await loop.run_in_executor(
                    self._pool,
                    lambda: fetch(
                        uri, context=self.context, timeout=self.timeout, max_bytes=self.max_bytes
                    ),
                )
            except JwksError as err:
                e.failures += 1
                if e.error != str(err):
                    log.error(
                        "jwks %s: %s (%s)",
                        uri,
                        err,
                        "keeping the last good JWKS" if e.text else "its tokens are refused",
                    )
                e.error = str(err)
                delay = min(self.retry_initial * 2 ** (e.failures - 1), RETRY_MAX, self.refresh)
            else:
                changed = text != e.text
                e.text, e.fetched_at, e.error, e.failures = text, time.time(), "", 0
                if changed:
                    log.info("jwks %s: fetched (%d bytes)", uri, len(text))
                    self.on_change(uri)
                delay = self.refresh
            await asyncio.sleep(delay)

    def describe(self, uris: Iterable[str] | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for uri in sorted(self.entries if uris is None else uris):
            e = self.entries.get(uri)
            if e is None:
                continue
            out[uri] = {
                "fetched": e.text is not None,
                "fetched_at": e.fetched_at,
                "error": e.error or None,
                "failures": e.failures,
            }
        return out

    async def close(self) -> None:
        tasks = [e.task for e in self.entries.values() if e.task is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self.entries.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
