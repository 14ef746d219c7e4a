"""The one change tether makes to hyperframe's behaviour, and that HTTP/2
semantics survive it (two in-memory h2 connections, CONNECT + DATA both ways)."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import hyperframe.frame

import agent.tunnel.h2conn  # noqa: F401  (installs the DataFrame repr)


def test_data_frame_repr_does_not_serialize_the_payload() -> None:
    f = hyperframe.frame.DataFrame(1, data=b"x" * (1 << 20))
    assert repr(f).endswith("<1048576 bytes>")
    assert len(repr(f)) < 100


def test_h2_connect_and_data_round_trip_with_the_patch() -> None:
    c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    s = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    c.initiate_connection()
    s.initiate_connection()
    s.receive_data(c.data_to_send())
    c.receive_data(s.data_to_send())
    c.send_headers(1, [(":method", "CONNECT"), (":authority", "10.0.0.1:80")])
    payload = bytes(range(256)) * 64
    c.send_data(1, payload)
    got = b""
    for ev in s.receive_data(c.data_to_send()):
        if isinstance(ev, h2.events.DataReceived):
            got += ev.data
            s.acknowledge_received_data(ev.flow_controlled_length, 1)
    assert got == payload
    s.send_headers(1, [(":status", "200")])
    events = c.receive_data(s.data_to_send())
    assert any(isinstance(e, h2.events.ResponseReceived) for e in events)
