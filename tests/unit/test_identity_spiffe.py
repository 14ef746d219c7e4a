"""SPIFFE ID parsing and formatting, Istio principal form."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.identity.spiffe import SpiffeId, SpiffeIdError, as_spiffe_id


def test_parse_and_format_round_trip() -> None:
    sid = SpiffeId.parse("spiffe://cluster.local/ns/default/sa/bookinfo-productpage")
    assert sid == SpiffeId("cluster.local", "default", "bookinfo-productpage")
    assert str(sid) == "spiffe://cluster.local/ns/default/sa/bookinfo-productpage"
    assert sid.principal == "cluster.local/ns/default/sa/bookinfo-productpage"
    assert SpiffeId.parse_principal(sid.principal) == sid
    assert as_spiffe_id(str(sid)) is not sid and as_spiffe_id(sid) is sid


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("cluster.local/ns/a/sa/b", "must start with 'spiffe://'"),
        ("spiffe://cluster.local/ns/a/sa", "expected the shape"),
        ("spiffe://cluster.local/ns/a/sa/b/extra", "expected the shape"),
        ("spiffe://cluster.local/namespace/a/sa/b", "expected the shape"),
        ("spiffe://cluster.local/ns/a/serviceaccount/b", "expected the shape"),
        ("spiffe:///ns/a/sa/b", "empty trust domain"),
        ("spiffe://Cluster.Local/ns/a/sa/b", "lowercase"),
        ("spiffe://cluster.local/ns//sa/b", "empty namespace"),
        ("spiffe://cluster.local/ns/a/sa/", "empty service account"),
        ("spiffe://cluster.local/ns/../sa/b", "may not be '..'"),
        ("spiffe://cluster.local/ns/a b/sa/b", "may hold only"),
        ("spiffe://cluster.local:443/ns/a/sa/b", "port"),
        ("spiffe://cluster.local/ns/a/sa/b?x=1", "query"),
        ("spiffe://cluster.local/ns/a/sa/b%41", "percent"),
        ("spiffe://user@cluster.local/ns/a/sa/b", "user"),
    ],
)
def test_parse_rejects_with_a_reason(text: str, why: str) -> None:
    with pytest.raises(SpiffeIdError, match=why.replace(".", r"\.").replace("?", r"\?")) as info:
        SpiffeId.parse(text)
    assert isinstance(info.value, ValueError)


def test_principal_form_rejects_scheme() -> None:
    with pytest.raises(SpiffeIdError, match="no 'spiffe://' prefix"):
        SpiffeId.parse_principal("spiffe://cluster.local/ns/a/sa/b")


def test_constructor_validates() -> None:
    with pytest.raises(SpiffeIdError, match="namespace"):
        SpiffeId("cluster.local", "", "b")


SEG = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789-_.", min_size=1, max_size=30
).filter(lambda s: s not in (".", ".."))
TD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=40)


@given(TD, SEG, SEG)
def test_round_trip_property(td: str, ns: str, sa: str) -> None:
    sid = SpiffeId(td, ns, sa)
    assert SpiffeId.parse(sid.uri) == sid
    assert SpiffeId.parse_principal(sid.principal) == sid


@given(st.text(max_size=80))
def test_parse_never_raises_anything_but_spiffe_id_error(text: str) -> None:
    try:
        sid = SpiffeId.parse(text)
    except SpiffeIdError:
        return
    assert sid.uri == text
