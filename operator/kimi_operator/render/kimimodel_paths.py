"""Where a KimiModel's files live inside the pods, and how a pod is pinned to a node."""

from __future__ import annotations

from typing import Any

from kimi_operator.api.base import GROUP

MOUNT = "/models"
NODE_LABEL = f"{GROUP}/node"


def model_dir(namespace: str, name: str) -> str:
    return f"{MOUNT}/{namespace}/{name}"


def pinned(node: str) -> dict[str, Any]:
    # Required affinity, not nodeName: the scheduler still accounts for the Job's resources.
    return {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}
                ]
            }
        }
    }
