"""netns tier: a tunnel cut mid-transfer is an abort, never a clean end.

A length-checked transfer a (node 1) -> b (node 2) through HBONE is cut by
killing one node's agent.  The other agent still holds the app's socket
and must reset it (RST), as a direct TCP connection would: the app sees
ECONNRESET, not an EOF that makes a half-received upload look complete.

- upload cut: node 1's agent (the HBONE client) is killed; node 2's
  delivery socket to b's server must be reset;
- download cut: node 2's agent (the HBONE server) is killed; node 1's
  socket to a's client must be reset.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from agent import netns
from agent.sim.harness import PY, AgentNode, cluster_nodes
from agent.sim.topology import Pod

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="netns tier needs root")

PORT = 9090
TOTAL = 8 << 20  # announced length; the cut comes long before
CHUNK = 64 << 10

# The app in pod a: uploads TOTAL bytes slowly (upload) or reads a download
# of TOTAL bytes, and says how its socket ended.
CLIENT = r"""
import errno, json, socket, sys, time
mode, host = sys.argv[1], sys.argv[2]
port, total, chunk = (int(x) for x in sys.argv[3:6])
s = socket.create_connection((host, port), timeout=15)
n, end = 0, "complete"
try:
    if mode == "upload":
        while n < total:
            s.sendall(b"u" * chunk)
            n += chunk
            time.sleep(0.02)
    else:
        while n < total:
            b = s.recv(1 << 16)
            if not b:
                end = "EOF"
                break
            n += len(b)
except ConnectionResetError:
    end = "ECONNRESET"
except BrokenPipeError:
    end = "EPIPE"
except OSError as e:
    end = errno.errorcode.get(e.errno or 0, str(e))
print(json.dumps({"n": n, "end": end}), flush=True)
"""


def _listen(pod: Pod) -> socket.socket:
    with netns.entered(pod.netns_path):
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("0.0.0.0", PORT))
    lst.listen(4)
    lst.settimeout(15)
    return lst


@pytest.fixture
def nodes() -> Iterator[tuple[AgentNode, AgentNode, Pod, Pod]]:
    with cluster_nodes("node1", "node2") as (_cluster, (n1, n2)):
        a = n1.add_pod("a", "shop", "sa-a")
        b = n2.add_pod("b", "shop", "sa-b")
        n1.enroll_namespace("shop")
        n1.start_agent()
        n2.start_agent()
        yield n1, n2, a, b


def _kill(node: AgentNode) -> None:
    assert node.agent is not None
    node.agent.kill()
    node.agent.wait(10)
    node.agent = None


def _client(n1: AgentNode, a: Pod, b: Pod, mode: str) -> subprocess.Popen[bytes]:
    return n1.tb.spawn(
        a,
        [PY, "-c", CLIENT, mode, b.ip4, str(PORT), str(TOTAL), str(CHUNK)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def test_upload_cut_by_the_client_agents_death_resets_the_servers_socket(
    nodes: tuple[AgentNode, AgentNode, Pod, Pod],
) -> None:
    n1, n2, a, b = nodes
    lst = _listen(b)
    proc = _client(n1, a, b, "upload")
    conn, _ = lst.accept()
    conn.settimeout(10)
    n, end = 0, "complete"
    try:
        while n < TOTAL:
            data = conn.recv(1 << 16)
            if not data:
                end = "EOF"
                break
            n += len(data)
            if n >= 512 << 10 and n1.agent is not None:
                _kill(n1)  # the HBONE client side: its connection to node 2 is lost
    except ConnectionResetError:
        end = "ECONNRESET"
    finally:
        conn.close()
        lst.close()
        proc.kill()
        proc.wait(5)
    rec = [
        c for c in n2.connections() if c["direction"] == "inbound" and c["dst"].endswith(f":{PORT}")
    ]
    print(f"\nupload cut after {n} of {TOTAL} bytes: server saw {end}; n2 record {rec}")
    assert 0 < n < TOTAL
    assert end == "ECONNRESET", (n, end, n2.log_tail())
    assert rec and rec[-1]["response_flag"] == "DC", rec  # downstream (the client side) gone


def test_download_cut_by_the_server_agents_death_resets_the_clients_socket(
    nodes: tuple[AgentNode, AgentNode, Pod, Pod],
) -> None:
    n1, n2, a, b = nodes
    lst = _listen(b)
    proc = _client(n1, a, b, "download")
    conn, _ = lst.accept()
    conn.settimeout(10)
    sent = 0
    try:
        while sent < 1 << 20:
            conn.sendall(b"d" * CHUNK)
            sent += CHUNK
            time.sleep(0.01)
        time.sleep(0.5)
        _kill(n2)  # the HBONE server side: node 1 loses the connection mid-stream
        out, err = proc.communicate(timeout=15)
    finally:
        conn.close()
        lst.close()
        if proc.poll() is None:
            proc.kill()
    result = json.loads(out.decode().strip().splitlines()[-1])
    rec = [
        c
        for c in n1.connections()
        if c["direction"] == "outbound" and c["dst"].endswith(f":{PORT}")
    ]
    print(f"\ndownload cut: client got {result}; n1 record {rec}")
    assert 0 < result["n"] < TOTAL, (result, err)
    assert result["end"] == "ECONNRESET", (result, n1.log_tail())
    assert rec and rec[-1]["response_flag"] == "UC", rec  # upstream (the tunnel) gone
