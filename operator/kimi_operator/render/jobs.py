"""Pieces every batch Job of the operator shares: pinning to a node, the pod failure policy, and
the pod template's metadata."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from kimi_operator.api.base import PodMetadata


def pinned(node: str, *also: Mapping[str, Any]) -> dict[str, Any]:
    """Required affinity to ``node`` (and any further match expressions, in the same term).

    Affinity rather than nodeName: the scheduler still accounts for the Job's resources.
    """
    expressions = [*also, {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [{"matchExpressions": expressions}]}
        }
    }


def failure_policy(permanent_exit_codes: Iterable[int]) -> dict[str, Any]:
    """Exit codes a retry cannot fix end the Job at once; node loss and evictions are not counted."""
    return {
        "rules": [
            {"action": "FailJob", "onExitCodes": {"operator": "In", "values": [int(c) for c in permanent_exit_codes]}},
            {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
        ]
    }


def template_metadata(user: PodMetadata, labels: Mapping[str, str]) -> dict[str, Any]:
    """The pod's labels and annotations: the user's, with ours taking precedence."""
    return {"labels": {**user.labels, **labels}, "annotations": dict(user.annotations)}
