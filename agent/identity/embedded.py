"""Certificate sources that sign with the local CA (local and demo modes).

`WorkerCA` is what the agent uses: it signs in a worker process
(agent/identity/issuer.py), so the agent never imports cryptography (~8.6
MiB resident) for the few certificates a node issues per day; the worker
starts on demand and exits 5 s after its last request (agent/workerproc.py).
`EmbeddedCA` signs in process (tests, benchmarks, `tether ca`'s tools).
Both go through the same CSR and response checks as the gRPC path
(svid.svid_from_response), so local mode exercises the code that
production uses.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING

from agent import workerproc
from agent.identity.pem import PemSvid
from agent.identity.spiffe import SpiffeId

if TYPE_CHECKING:
    from agent.identity.ca import CertificateAuthority
    from agent.identity.svid import Svid

ISSUER = "agent.identity.issuer"


class IssueError(Exception):
    """The local CA could not issue: the message says why (and names the CA dir)."""


class EmbeddedCA:
    """A CertificateSource signing in this process with a CertificateAuthority."""

    def __init__(self, ca: CertificateAuthority, ttl: timedelta | None = None) -> None:
        self.ca = ca
        self.ttl = ttl

    async def fetch(self, identity: SpiffeId) -> Svid:
        from agent.identity.svid import build_csr, generate_key, svid_from_response

        key = generate_key()
        chain = self.ca.sign_csr(build_csr(identity, key), identity, self.ttl)
        return svid_from_response(identity, key, chain, trust_roots=self.ca.roots)


class WorkerCA:
    """A CertificateSource signing with the CA in `ca_dir` in a worker process."""

    def __init__(
        self,
        ca_dir: str,
        trust_domain: str,
        ttl: timedelta | None = None,
        worker: workerproc.Worker | None = None,
    ) -> None:
        self.ca_dir = ca_dir
        self.trust_domain = trust_domain
        self.ttl = ttl
        self.worker = worker or workerproc.Worker(ISSUER)

    def _request(self, op: str, **more: object) -> dict[str, object]:
        return {"op": op, "ca_dir": self.ca_dir, "trust_domain": self.trust_domain, **more}

    def check(self) -> None:
        """Load (or first generate) the CA once, blocking, so that a broken
        caDir stops the agent at start with the reason (as it did when the
        agent loaded the CA itself)."""
        try:
            reply = workerproc.run_once(ISSUER, self._request("load"))
        except workerproc.WorkerError as e:
            raise IssueError(f"local CA in {self.ca_dir}: {e.strerror}") from e
        if not reply.get("ok"):
            raise IssueError(f"local CA in {self.ca_dir}: {reply.get('error', 'failed')}")

    async def fetch(self, identity: SpiffeId) -> PemSvid:
        ttl = self.ttl.total_seconds() if self.ttl is not None else None
        try:
            reply = await self.worker.call(self._request("issue", identity=identity.uri, ttl_s=ttl))
        except workerproc.WorkerError as e:
            raise IssueError(f"local CA in {self.ca_dir}, {identity}: {e.strerror}") from e
        if not reply.get("ok"):
            raise IssueError(f"local CA in {self.ca_dir}, {identity}: {reply.get('error')}")
        record = reply.get("svid")
        if not isinstance(record, dict):
            raise IssueError(f"local CA in {self.ca_dir}, {identity}: no SVID in the answer")
        try:
            return PemSvid.from_json(record)  # the identity: checked by the manager
        except ValueError as e:
            raise IssueError(f"local CA in {self.ca_dir}, {identity}: {e}") from e

    async def aclose(self) -> None:
        await self.worker.aclose()
