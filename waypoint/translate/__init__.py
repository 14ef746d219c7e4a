"""The pure translation from mesh state and Istio / Gateway API documents to
one waypoint's Envoy resources (xds-protos messages); see translate.py."""

from waypoint.translate.common import (
    CLUSTER,
    LISTENER,
    ROUTE,
    TYPE_URLS,
    Issue,
    Report,
    Resources,
    encode,
)
from waypoint.translate.translate import referenced_jwks, translate

__all__ = [
    "CLUSTER",
    "LISTENER",
    "ROUTE",
    "TYPE_URLS",
    "Issue",
    "Report",
    "Resources",
    "encode",
    "referenced_jwks",
    "translate",
]
