"""Which workloads a policy reaches (istiod's selection).

A policy in the root namespace reaches every namespace; elsewhere only its own.
A selector picks workloads by labels (every label must match); no selector means
every workload in reach.  ``targetRefs`` attach a policy to a Gateway (waypoint)
or a Service instead: the node never enforces those (ztunnel ignores them); they
are recorded here for the waypoint translation to come.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from agent.policy.model import Labels, TargetRef, WorkloadLike


def selects(
    namespace: str, selector: Labels | None, root_namespace: str, workload: WorkloadLike
) -> bool:
    """True if a policy in ``namespace`` with ``selector`` reaches ``workload``."""
    if namespace != root_namespace and namespace != workload.namespace:
        return False
    if selector is None:
        return True
    labels = workload.labels
    return all(labels.get(k) == v for k, v in selector)


def target_refs_text(refs: Sequence[TargetRef], policy_namespace: str) -> str:
    """``Kind namespace/name, ...`` for notes about waypoint-attached policies."""
    return ", ".join(f"{r.kind} {r.namespace or policy_namespace}/{r.name}" for r in refs)


@dataclasses.dataclass(frozen=True)
class Reach:
    """The workloads a policy in ``namespace`` with ``selector`` reaches (None: all of the
    namespace, or of the mesh from the root namespace)."""

    namespace: str
    selector: Labels | None = None

    def reaches(self, workload: WorkloadLike, root_namespace: str) -> bool:
        return selects(self.namespace, self.selector, root_namespace, workload)

    def describe(self, root_namespace: str) -> str:
        where = "the mesh" if self.namespace == root_namespace else f"namespace {self.namespace}"
        if self.selector is None:
            return f"every workload in {where}"
        labels = ",".join(f"{k}={v}" for k, v in self.selector)
        return f"workloads labelled {labels} in {where}"
