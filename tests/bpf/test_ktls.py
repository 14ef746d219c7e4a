"""Kernel TLS on the running kernel, as `tether bench ktls` measures it.

kTLS is the issue's lever for the cross-node byte path: OpenSSL hands the
session keys to the kernel (SSL_OP_ENABLE_KTLS) and the kernel encrypts what
is written to the socket.  It needs OpenSSL on the socket itself (a socket
BIO), not the event loop's memory BIOs, and a kernel with the tls module.
This checks, on every kernel the matrix boots, that the same TLS 1.3 stream
arrives intact (length and SHA-256) with and without the option, and that the
kernel took the sending side where it has the module (Debian's 5.10, 6.1 and
6.12 kernels build it; the development host's 6.18 has no CONFIG_TLS, and
there OpenSSL must fall back to user space without a word): first for a bare
TLS stream (`tether bench ktls`), then for the agent's HBONE TLS transport
(agent/tunnel/tlssock.py, TETHER_TLS=socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import bench
from agent.identity.ca import CertificateAuthority
from agent.identity.embedded import EmbeddedCA
from agent.identity.manager import CertificateManager
from agent.identity.spiffe import SpiffeId
from agent.tunnel import tlssock

WEB = SpiffeId("cluster.local", "shop", "web")
DB = SpiffeId("cluster.local", "shop", "db")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="bpf tier needs root (module load)")


def _tls_available() -> bool:
    """Built in or loaded, or a module modprobe finds (the kernel loads it
    on demand through modprobe too, so no modprobe means no module)."""
    if Path("/sys/module/tls").exists():
        return True
    if shutil.which("modprobe") is None:
        return False
    dry = subprocess.run(["modprobe", "-n", "-q", "tls"], capture_output=True, check=False)
    return dry.returncode == 0


@pytest.fixture
def tls_module() -> Iterator[bool]:
    """Whether the kernel can do TLS; a module the test's socket loaded
    (the kernel loads it on the first TCP_ULP "tls") is unloaded again."""
    loaded_before = Path("/sys/module/tls").exists()
    available = _tls_available()
    yield available
    if not loaded_before and Path("/sys/module/tls").exists():
        with contextlib.suppress(OSError):  # built in, or still in use: stays
            subprocess.run(["modprobe", "-r", "-q", "tls"], capture_output=True, check=False)


def test_tls_stream_is_intact_and_the_kernel_takes_it_where_it_can(tls_module: bool) -> None:
    user = bench._ktls_transfer(0, 0.5)
    ktls = bench._ktls_transfer(tlssock.SSL_OP_ENABLE_KTLS, 0.5)
    print(f"kernel {os.uname().release}: tls {'available' if tls_module else 'absent'}")
    print(f"user-space TLS: {user}")
    print(f"SSL_OP_ENABLE_KTLS: {ktls}")
    for r in (user, ktls):
        assert r["bytes"] > 0
        assert r["intact"], r
        assert r["cipher"].startswith("TLSv1.3"), r
    assert user["client_ulp"] == user["server_ulp"] == "-", "kTLS without asking for it"
    if tls_module:
        assert ktls["client_ulp"] == "tls", ktls
        sent_by_kernel = sum(v for k, v in ktls["tls_stat"].items() if k.startswith("TlsTx"))
        assert sent_by_kernel >= 1, ktls
    else:
        assert ktls["client_ulp"] == ktls["server_ulp"] == "-", ktls


class _Sink(asyncio.Protocol):
    def __init__(self, payload: bytes, times: int) -> None:
        self.payload, self.times = payload, times
        self.h = hashlib.sha256()
        self.n = 0
        self.eof = asyncio.get_running_loop().create_future()

    def eof_received(self) -> bool:
        if not self.eof.done():
            self.eof.set_result(None)
        return False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        for _ in range(self.times):
            transport.write(self.payload)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        self.h.update(data)
        self.n += len(data)


def test_hbone_tls_transport_hands_sending_to_the_kernel_where_it_can(tls_module: bool) -> None:
    """agent/tunnel/tlssock.py, the HBONE path TETHER_TLS=socket selects: mesh
    mTLS contexts, 8 MiB each way at once, hashes compared; on a kernel with
    the tls module both ends' sending side is the kernel's (kernel_tx)."""
    chunk, times = os.urandom(1 << 20), 8

    async def main() -> tuple[str, str, dict[str, int]]:
        mgr = CertificateManager(EmbeddedCA(CertificateAuthority.generate("cluster.local")))
        loop = asyncio.get_running_loop()
        s, c = await bench.loopback_tcp_pair()
        before = bench.tls_stat()
        server, client = _Sink(chunk, times), _Sink(chunk, times)
        st, ct = await asyncio.gather(
            tlssock.connect(
                loop, server, s, await mgr.ssl_context_server(WEB), server_side=True, timeout=30
            ),
            tlssock.connect(
                loop, client, c, await mgr.ssl_context_client(DB), server_side=False, timeout=30
            ),
        )
        try:
            for _ in range(1200):
                if server.n >= len(chunk) * times and client.n >= len(chunk) * times:
                    break
                await asyncio.sleep(0.1)
            want = hashlib.sha256(chunk * times).hexdigest()
            assert server.n == client.n == len(chunk) * times
            assert server.h.hexdigest() == client.h.hexdigest() == want
            after = bench.tls_stat()
            delta = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}
            paths = tlssock.established(st, "server"), tlssock.established(ct, "client")
            # close: the last bytes, then close_notify (through the kernel
            # when it holds the keys), read by the server as the end
            ct.write(b"last")
            ct.close()
            await asyncio.wait_for(server.eof, 60)
            assert server.n == len(chunk) * times + 4
            return paths[0], paths[1], delta
        finally:
            st.abort()
            ct.abort()
            await mgr.close()

    server_path, client_path, delta = asyncio.run(main())
    print(f"kernel {os.uname().release}: server {server_path}, client {client_path}, {delta}")
    if tls_module:
        assert server_path == client_path == "kernel_tx", delta
        assert sum(v for k, v in delta.items() if k.startswith("TlsTx")) >= 2, delta
    else:
        assert server_path == client_path == "socket", delta
