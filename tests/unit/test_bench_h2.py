"""`tether bench h2` compares hyperframe's DataFrame repr as shipped with the
agent's O(1) one.  Before, the agent's patch was applied at import, so the
"as is" measurement saved the already-patched function and compared the fix
with itself."""

from __future__ import annotations

import hyperframe.frame

from agent import bench
from agent.tunnel import h2conn


def _body(frame: hyperframe.frame.DataFrame) -> str:
    return frame._body_repr()  # type: ignore[no-any-return]


def test_the_unpatched_path_is_hyperframes_own() -> None:
    f = hyperframe.frame.DataFrame(1, data=b"\xab\xcd" * 4)
    assert _body(f) == "<8 bytes>"  # the agent's patch is in force
    with bench.data_body_repr(h2conn.HYPERFRAME_DATA_BODY_REPR):
        assert "abcd" in _body(f)  # hyperframe hex-encodes the payload
    with bench.data_body_repr(h2conn.data_body_repr):
        assert _body(f) == "<8 bytes>"
    assert _body(f) == "<8 bytes>"  # restored


def _hexlify_calls(frame: int, nbytes: int) -> int:
    """How many times the transfer hex-encoded a frame body (hyperframe's
    DATA repr does, once per DATA frame logged; the agent's does not).  A call count,
    not a time share: the bench reports the time, the test must not flake on
    a loaded machine."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    prof.runcall(bench._h2_transfer, frame, nbytes)
    raw = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    return sum(nc for (_f, _l, name), (_cc, nc, *_rest) in raw.items() if "hexlify" in name)


def test_the_two_measurements_differ_in_repr_cost() -> None:
    with bench.data_body_repr(h2conn.HYPERFRAME_DATA_BODY_REPR):
        slow = _hexlify_calls(16384, 4 << 20)
    with bench.data_body_repr(h2conn.data_body_repr):
        fast = _hexlify_calls(16384, 4 << 20)
    assert slow >= (4 << 20) // 16384, slow  # at least once per DATA frame
    # the agent's repr never hex-encodes DATA; what is left is a couple of
    # control frames whose repr is still hyperframe's
    assert fast * 10 < slow, (fast, slow)
