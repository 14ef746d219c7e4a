"""Kernel TLS on the running kernel, as `tether bench ktls` measures it.

kTLS is the issue's lever for the cross-node byte path: OpenSSL hands the
session keys to the kernel (SSL_OP_ENABLE_KTLS) and the kernel encrypts what
is written to the socket.  It needs OpenSSL on the socket itself (a socket
BIO), not the event loop's memory BIOs, and a kernel with the tls module.
This checks, on every kernel the matrix boots, that the same TLS 1.3 stream
arrives intact (length and SHA-256) with and without the option, and that the
kernel took the sending side where it has the module (Debian's 5.10, 6.1 and
6.12 kernels build it; the development host's 6.18 has no CONFIG_TLS, and
there OpenSSL must fall back to user space without a word).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import bench

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
    ktls = bench._ktls_transfer(bench.SSL_OP_ENABLE_KTLS, 0.5)
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
