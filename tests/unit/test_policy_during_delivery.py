"""A policy change while a connection is being delivered to its app.

Authorization happens before the agent connects to the app; the policy
watcher (`watcher.revalidate`) then closes only connections that are live.
A connection still connecting when the policy changed was neither: before
`context.recheck` it went live under the decision of the old policy and
stayed open (fail-open).  Each path now checks again, with the view in
force, in the step that makes it live.  No root: delivery is replaced by a
fake that changes the policy while it "connects"."""

from __future__ import annotations

import asyncio
import socket
from types import SimpleNamespace
from typing import Any

import pytest

from agent.identity.spiffe import SpiffeId
from agent.model import Snapshot, Workload
from agent.state.state import ProxyState
from agent.tunnel import inbound, outbound, plaintext
from agent.tunnel.conns import ConnTable
from agent.tunnel.context import PodRef, Tunnel

TD = "cluster.local"
DB = Workload("db", "shop", "db", "n1", ("127.0.0.1",), {"app": "db"})
WEB = SpiffeId(TD, "shop", "web")
DENY_ALL = {
    "apiVersion": "security.istio.io/v1",
    "kind": "AuthorizationPolicy",
    "metadata": {"name": "deny-all", "namespace": "shop"},
    "spec": {"selector": {"matchLabels": {"app": "db"}}, "action": "DENY", "rules": [{}]},
}


def _snap(*policies: dict[str, Any]) -> Snapshot:
    return Snapshot("n1", {"shop": {"istio.io/dataplane-mode": "ambient"}}, (DB,), (), policies)


class _Bypass:
    def __init__(self) -> None:
        self.entries: set[tuple[tuple[str, int], tuple[str, int]]] = set()

    def add(self, src: tuple[str, int], dst: tuple[str, int]) -> None:
        self.entries.add((src, dst))

    def remove(self, src: tuple[str, int], dst: tuple[str, int]) -> None:
        self.entries.discard((src, dst))


def _tunnel() -> tuple[Tunnel, PodRef, _Bypass]:
    state = ProxyState("n1", TD)
    state.apply(_snap())
    bypass = _Bypass()
    t = Tunnel(state, bypass, ConnTable())
    pod = PodRef(DB.key, "/proc/self/ns/net", DB.addresses, state.view.by_key[DB.key], None)
    return t, pod, bypass


def _deliver_while_policy_changes(
    t: Tunnel, bypass: _Bypass, apps: list[socket.socket], to: Snapshot | None = None
) -> Any:
    """A fake delivery during which the state changes to `to` (default: a
    policy denying everything to db)."""
    snap = to if to is not None else _snap(DENY_ALL)

    async def deliver(
        pod: PodRef, _b: Any, src_ip: str, dst: tuple[str, int]
    ) -> tuple[socket.socket, tuple[str, int]]:
        t.state.apply(snap)  # the change lands while we "connect"
        await asyncio.sleep(0)
        app, peer = socket.socketpair()
        apps.extend([app, peer])
        bypass.add((src_ip, 40000), dst)
        return app, (src_ip, 40000)

    return deliver


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    lst = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(lst.getsockname())
    srv, _ = lst.accept()
    lst.close()
    srv.setblocking(False)
    return cli, srv


def test_plaintext_connection_denied_by_a_change_during_delivery_never_goes_live(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t, pod, bypass = _tunnel()
    apps: list[socket.socket] = []
    monkeypatch.setattr(plaintext, "deliver", _deliver_while_policy_changes(t, bypass, apps))
    cli, srv = _tcp_pair()

    async def main() -> None:
        await asyncio.wait_for(plaintext.inbound_plain(t, pod, srv), 5)

    asyncio.run(main())
    assert not t.conns.open
    (c,) = t.conns.closed
    assert c.flag == "DENY" and c.relay is None
    assert "denied after a policy change" in (c.error or ""), c.error
    assert bypass.entries == set(), "the delivery's bypass entry is removed"
    assert apps[0].fileno() < 0, "the app connection is closed"
    cli.settimeout(5)
    with pytest.raises(ConnectionResetError):
        cli.recv(1)  # refused with a reset
    cli.close()
    apps[1].close()


def test_plaintext_connection_still_allowed_after_an_unrelated_change_goes_live(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check is with the new view, not a refusal of every change."""
    t, pod, bypass = _tunnel()
    apps: list[socket.socket] = []
    # a new view with the same (empty) policy
    monkeypatch.setattr(
        plaintext, "deliver", _deliver_while_policy_changes(t, bypass, apps, _snap())
    )
    cli, srv = _tcp_pair()

    async def main() -> None:
        task = asyncio.ensure_future(plaintext.inbound_plain(t, pod, srv))
        await asyncio.sleep(0.1)
        assert next(iter(t.conns.open.values())).kill is not None  # live
        cli.close()
        apps[1].close()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert t.conns.closed[0].flag != "DENY"


def test_hbone_stream_denied_by_a_change_during_delivery_is_answered_401(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t, pod, bypass = _tunnel()
    pod = PodRef(pod.key, pod.netns, pod.ips, pod.workload, SpiffeId(TD, "shop", "db"))
    apps: list[socket.socket] = []
    monkeypatch.setattr(inbound, "deliver", _deliver_while_policy_changes(t, bypass, apps))
    answered: list[int] = []
    conn = SimpleNamespace(
        peer={"addr": ("127.0.0.2", 5555), "local": ("127.0.0.1", 15008), "identity": WEB},
        transport=None,
        respond=lambda _s, status: answered.append(status),
    )
    stream = SimpleNamespace(
        request_headers=[(":method", "CONNECT"), (":authority", "127.0.0.1:8080")], closed=False
    )
    server = inbound.InboundHbone(t, pod)

    async def main() -> None:
        await asyncio.wait_for(server._on_connect(conn, stream), 5)  # type: ignore[arg-type]

    asyncio.run(main())
    assert answered == [401]
    (c,) = t.conns.closed
    assert c.flag == "DENY" and "denied after a policy change" in (c.error or "")
    assert bypass.entries == set()
    for s in apps:
        s.close()


def test_same_node_connection_denied_by_a_change_during_delivery_never_goes_live(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t, pod, bypass = _tunnel()
    apps: list[socket.socket] = []
    monkeypatch.setattr(outbound, "deliver", _deliver_while_policy_changes(t, bypass, apps))
    t.local[pod.key] = SimpleNamespace(pod=pod)  # type: ignore[assignment]
    src_pod = PodRef("shop/web", "/proc/self/ns/net", ("127.0.0.2",), None, WEB)
    req = SimpleNamespace(
        dst_workload=DB, src_identity=WEB, target=("127.0.0.1", 8080), authority="127.0.0.1:8080"
    )
    cli, srv = _tcp_pair()
    out = t.conns.add(src_pod.key, "outbound", ("127.0.0.2", 5555), req.target, "local")

    async def main() -> None:
        await asyncio.wait_for(
            outbound._same_node(t, src_pod, srv, ("127.0.0.2", 5555), req, out),  # type: ignore[arg-type]
            5,
        )

    asyncio.run(main())
    assert not t.conns.open
    assert len(t.conns.closed) == 2
    for c in t.conns.closed:
        assert c.flag == "DENY" and "denied after a policy change" in (c.error or ""), c
    assert bypass.entries == set()
    cli.close()
    for s in apps:
        s.close()
