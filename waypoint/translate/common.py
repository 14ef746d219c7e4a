"""What every part of the translation shares: the report, names, durations,
string matchers and the one way a dict becomes an Envoy message."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from agent.policy.model import clip, clip_text
from agent.policy.parse import document_label
from waypoint.translate import protos

LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
TYPE_URLS = (LISTENER, CLUSTER, ROUTE)

# type_url -> resource name -> message
Resources = dict[str, dict[str, Message]]
Doc = Mapping[str, Any]


@dataclasses.dataclass(frozen=True, order=True)
class Issue:
    """One thing the waypoint does not apply: the document (``Kind ns/name``),
    the field path in it, and why (with what to do instead when there is a fix)."""

    document: str
    field: str
    reason: str

    def __str__(self) -> str:
        return (
            f"{self.document}: {self.field}: {self.reason}"
            if self.field
            else (f"{self.document}: {self.reason}")
        )


class Report(list[Issue]):
    """Everything not applied, in a stable order (sorted, no repeats)."""

    def add(self, doc: object, field: str, reason: str) -> None:
        label = doc if isinstance(doc, str) else document_label(doc)
        issue = Issue(label, clip_text(field, 160), clip_text(reason, 400))
        if issue not in self:
            self.append(issue)

    def for_document(self, label: str) -> list[Issue]:
        return [i for i in self if i.document == label]


def message(cls: type[Message], value: Mapping[str, Any]) -> Message:
    """``value`` (the proto3 JSON form, ``@type`` for Any) as a ``cls``; an unknown
    field or a wrong type raises here, not in Envoy."""
    msg = cls()
    json_format.ParseDict(dict(value), msg)
    return msg


def encode(msg: Message) -> bytes:
    """The bytes of a resource, stable for equal content (map fields sorted):
    what the xDS server hashes to send only resources that changed."""
    return msg.SerializeToString(deterministic=True)


def typed(type_name: str, value: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """An Any holding ``type_name`` (checked to be a known message)."""
    protos.check_type(type_name)
    return {"@type": f"type.googleapis.com/{type_name}", **(value or {})}


def ads() -> dict[str, Any]:
    return {"ads": {}, "resource_api_version": "V3"}


# ---------------------------------------------------------------------------
# durations: Istio ("1.5s", "100ms", "1h") and Gateway API GEP-2257 ("1h30m")

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s|us|µs|ns)")
_UNIT = {
    "h": Decimal(3600),
    "m": Decimal(60),
    "s": Decimal(1),
    "ms": Decimal("0.001"),
    "us": Decimal("0.000001"),
    "µs": Decimal("0.000001"),
    "ns": Decimal("0.000000001"),
}


def duration(value: object) -> str | None:
    """A proto3 JSON Duration (``"1.500s"``) for a Go-style duration, or None
    if it is not one."""
    if not isinstance(value, str) or not value or len(value) > 40:
        return None
    pos, total = 0, Decimal(0)
    for m in _DURATION_PART.finditer(value):
        if m.start() != pos:
            return None
        try:
            total += Decimal(m.group(1)) * _UNIT[m.group(2)]
        except InvalidOperation:
            return None
        pos = m.end()
    if pos != len(value) or total > Decimal(315576000000):
        return None
    total = total.quantize(Decimal("0.000000001"))
    text = format(total.normalize(), "f")
    return f"{text}s"


# ---------------------------------------------------------------------------
# string matches


def istio_string(value: str, *, ignore_case: bool = False) -> dict[str, Any]:
    """An Istio authorization string (``*``, ``x*``, ``*x``, exact) as an Envoy
    StringMatcher."""
    extra: dict[str, Any] = {"ignore_case": True} if ignore_case else {}
    if value == "*":
        return {"safe_regex": {"regex": ".+"}}
    if value.startswith("*"):
        return {"suffix": value[1:], **extra}
    if value.endswith("*"):
        return {"prefix": value[:-1], **extra}
    return {"exact": value, **extra}


def inner_wildcard(value: str) -> bool:
    return "*" in value.strip("*") or value.count("*") > 1


def string_match(spec: object) -> dict[str, Any] | None:
    """Istio's StringMatch ({exact|prefix|regex: x}) as an Envoy StringMatcher."""
    if not isinstance(spec, Mapping) or len(spec) != 1:
        return None
    ((kind, value),) = spec.items()
    if not isinstance(value, str):
        return None
    if kind == "exact":
        return {"exact": value}
    if kind == "prefix":
        return {"prefix": value}
    if kind == "regex":
        return {"safe_regex": {"regex": value}}
    return None


def re2_escape(text: str) -> str:
    return re.sub(r"([\\.^$|?*+()\[\]{}])", r"\\\1", text)


def as_list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


def sorted_unique(items: Iterable[str]) -> list[str]:
    return sorted(set(items))


def show(value: object) -> str:
    return clip(value)
